"""llm.item_head=tied: an item's output vector is its own input token W_in(id) [+ W_txt(text)] plus a bias, so the
scores are state @ tokens.T + bias by hand, the fast paths and the chunked loss agree with the plain ones, and items
that the CRM table (and their text) cannot tell apart score alike before any training."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("peft")

from test_e4srec import HIST, make_model, per_sample_logits  # noqa: E402
from test_e4srec_text import text_table  # noqa: E402


def tied(tokenizer, text: bool = False, **kw):
    model = make_model(tokenizer, "qwen2", item_head="tied", text=text_table() if text else None, item_text=text,
                       **kw)
    with torch.no_grad():
        model.item_bias.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("text", [False, True])
def test_scores_are_state_times_item_tokens_plus_bias(tokenizer, text):
    model = tied(tokenizer, text)
    assert not hasattr(model, "w_out")
    assert "item_bias" in model.trainable_state_dict()
    with torch.no_grad():
        state = model.encode(HIST)
        table = model.w_in.weight @ model.item_table.T + model.w_in.bias[:, None]  # [D, N + 1]
        if text:
            table = table + model.w_txt.weight @ model.text_table.T
        by_hand = state.float() @ table + model.item_bias
        assert torch.allclose(model.score_all(HIST), by_hand, atol=1e-5)
        assert torch.allclose(model.score_items(state, 4, 11), by_hand[:, 4:11], atol=1e-5)


def test_all_prefix_and_chunked_loss_match_the_plain_paths(tokenizer):
    model = tied(tokenizer, text=True)
    rows, cols = (HIST[:, :-1] != 0).nonzero(as_tuple=True)
    targets = HIST[rows, cols + 1]
    with torch.no_grad():
        ref = per_sample_logits(model, [HIST[r, :c + 1] for r, c in zip(rows.tolist(), cols.tolist())])
        assert torch.allclose(model.prefix_logits(HIST, rows, cols), ref, atol=1e-4)
    full = F.cross_entropy(model(HIST, rows, cols)[:, 1:], targets - 1, reduction="none")
    full.sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    chunked = model(HIST, rows, cols, targets=targets, item_chunk=7)
    assert torch.allclose(chunked, full, atol=1e-4)
    chunked.sum().backward()
    for k, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, grads[k], atol=1e-4), k


def test_items_alike_in_the_crm_table_score_alike_until_text_tells_them_apart(tokenizer):
    """Items 20 and 21 share their CRM row: the tied head gives them equal scores (the linear head's fresh rows do
    not); with text, their different text rows separate them."""
    for text in (False, True):
        model = tied(tokenizer, text)
        with torch.no_grad():
            model.item_table[21] = model.item_table[20]
            model.item_bias.zero_()
            scores = model.score_all(HIST)
        assert torch.equal(scores[:, 20], scores[:, 21]) is (not text)
    linear = make_model(tokenizer, "qwen2")
    with torch.no_grad():
        linear.item_table[21] = linear.item_table[20]
        scores = linear.score_all(HIST)
    assert not torch.allclose(scores[:, 20], scores[:, 21])


def test_kept_item_vectors_follow_every_weight_change(tokenizer):
    """Scoring without gradients keeps the item vectors; a new CRM table, an optimizer step or a load must not
    leave it stale: each time, the kept scores equal the ones computed afresh (with gradients on)."""
    model = tied(tokenizer, text=True)

    def same_as_fresh():
        with torch.no_grad():
            kept = model.score_all(HIST)
        return torch.allclose(kept, model.score_all(HIST).detach(), atol=1e-5)

    assert same_as_fresh()
    model.set_item_embeddings(torch.randn_like(model.item_table))
    assert same_as_fresh()
    opt = torch.optim.SGD([model.w_in.weight, model.w_txt.weight], lr=0.5)
    rows, cols = (HIST[:, :-1] != 0).nonzero(as_tuple=True)
    F.cross_entropy(model.prefix_logits(HIST, rows, cols), HIST[rows, cols + 1]).backward()
    opt.step()
    assert same_as_fresh()
    model.load_trainable_state_dict({k: v + 1 for k, v in model.trainable_state_dict().items()})
    assert same_as_fresh()
