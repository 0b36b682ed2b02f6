"""ce_chunked is the full-softmax cross-entropy, computed item chunk by item chunk: same value, same gradients."""

import pytest
import torch

from llmd4rec.config import SASRecConfig, CRMTrainConfig, load_config
from llmd4rec.errors import InputError
from llmd4rec.models.sasrec import SASRec
from llmd4rec.models.chunked import ChunkedLogSumExp, chunked_cross_entropy
from llmd4rec.training.crm import rec_loss


@pytest.mark.parametrize("bias", [False, True])  # SASRec's item table has none, E4SRec's W_out has one
@pytest.mark.parametrize("chunk", [1, 7, 50, 1000])  # one item per chunk, a ragged last chunk, exact fit, one chunk
def test_chunked_logsumexp_matches_full(chunk, bias):
    g = torch.Generator().manual_seed(0)
    h = (3 * torch.randn(13, 8, generator=g)).requires_grad_()
    w = torch.randn(51, 8, generator=g).requires_grad_()
    b = torch.randn(51, generator=g).requires_grad_() if bias else None
    inputs = (h, w, b) if bias else (h, w)
    upstream = torch.randn(13, generator=g)
    full = (h @ w.T + (b if bias else 0))[:, 1:].logsumexp(1)
    grads_full = torch.autograd.grad((full * upstream).sum(), inputs)
    chunked = ChunkedLogSumExp.apply(h, w, b, chunk)
    grads_chunked = torch.autograd.grad((chunked * upstream).sum(), inputs)
    assert torch.allclose(chunked, full, atol=1e-5, rtol=0)
    for x, y in zip(grads_chunked, grads_full):  # float32 sums in another order: 1e-5 of the gradient's size
        assert torch.allclose(x, y, atol=1e-5, rtol=1e-5)
    for padding_grad in grads_chunked[1:]:  # padding item: never a competitor, no gradient
        assert padding_grad[0].abs().max() == 0


def test_e4srec_chunked_loss_equals_full_ce_in_value_and_gradients(tiny_backbone_dir):
    """E4SRec's forward with targets (llm_train.loss=ce_chunked) is the cross-entropy of its logits."""
    from llmd4rec.models.e4srec import E4SRec

    cfg = load_config(None, [f"llm.backbone={tiny_backbone_dir}", "llm.keep_layers=null", "llm.max_len=6",
                             "llm.lora_dropout=0"]).llm
    torch.manual_seed(0)
    model = E4SRec(cfg, torch.randn(41, 8))
    x = torch.tensor([[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11], [0, 0, 0, 0, 12, 13]])
    rows, cols = (x > 0).nonzero(as_tuple=True)
    targets = torch.randint(1, 41, (len(rows),))
    results = []
    for chunked in (False, True):
        model.zero_grad()
        if chunked:
            loss = model(x, rows, cols, targets, item_chunk=16).mean()
        else:
            logits = model(x, rows, cols)
            logits[:, 0] = float("-inf")
            loss = torch.nn.functional.cross_entropy(logits, targets)
        loss.backward()
        results.append((loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}))
    (full, grads_full), (chunked, grads_chunked) = results
    assert torch.allclose(chunked, full, atol=1e-5, rtol=0)
    for k in grads_full:
        assert torch.allclose(grads_chunked[k], grads_full[k], atol=1e-5, rtol=0), k


def test_chunked_cross_entropy_needs_a_positive_chunk():
    with pytest.raises(ValueError, match="item_chunk"):
        chunked_cross_entropy(torch.randn(2, 4), torch.randn(5, 4), None, torch.tensor([1, 2]), 0)


def _loss_and_grads(model, x, y, overrides, want_logits=False):
    valid = y > 0
    model.zero_grad()
    loss, _ = rec_loss(model, model.hidden(x)[valid], y[valid], load_config(None, overrides).crm_train,
                       torch.Generator(), want_logits=want_logits)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


def _sasrec_batch(tie_weights=True):
    torch.manual_seed(0)
    model = SASRec(60, SASRecConfig(hidden=16, n_heads=2, dropout=0.0, max_len=8, tie_weights=tie_weights)).train()
    x = torch.tensor([[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11], [0, 0, 0, 0, 12, 13]])
    y = torch.tensor([[0, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 60], [0, 0, 0, 0, 13, 14]])
    return model, x, y


@pytest.mark.parametrize("tie_weights", [True, False])
def test_ce_chunked_equals_ce_in_value_and_gradients(tie_weights):
    model, x, y = _sasrec_batch(tie_weights)
    fp32 = ["crm_train.precision=float32"]
    full, grads_full = _loss_and_grads(model, x, y, fp32 + ["crm_train.loss=ce"])
    chunked, grads_chunked = _loss_and_grads(model, x, y, fp32 + ["crm_train.loss=ce_chunked", "crm_train.item_chunk=16"])
    assert torch.allclose(chunked, full, atol=1e-5, rtol=0)
    for k in grads_full:
        assert torch.allclose(grads_chunked[k], grads_full[k], atol=1e-5, rtol=0), k


@pytest.mark.parametrize("loss", [["crm_train.loss=ce"], ["crm_train.loss=ce_chunked", "crm_train.item_chunk=16"]])
@pytest.mark.parametrize("want_logits", [False, True])  # row-blocked CE, or materialised logits for a KD term
def test_bf16_scores_match_float32_within_bfloat16_rounding(loss, want_logits, monkeypatch):
    """bfloat16 rounds h and w to 8 significant bits before the matmuls: loss and gradients move by well under 1%,
    whichever path computes them; the row blocks are exercised by a block size smaller than the batch."""
    from llmd4rec.models import bf16

    monkeypatch.setattr(bf16, "ROW_BLOCK", 5)
    model, x, y = _sasrec_batch()
    ref, grads_ref = _loss_and_grads(model, x, y, loss + ["crm_train.precision=float32"], want_logits)
    low, grads_low = _loss_and_grads(model, x, y, loss + ["crm_train.precision=bfloat16"], want_logits)
    assert abs(float(low - ref)) < 2e-3 * float(ref)
    for k in grads_ref:
        err = (grads_low[k] - grads_ref[k]).norm() / grads_ref[k].norm().clamp(min=1e-12)
        assert err < 1e-2, (k, float(err))
    assert float((grads_low["item_emb.weight"] - grads_ref["item_emb.weight"]).abs().max()) > 0  # bf16 really ran


def test_bf16_cross_entropy_with_bias_matches_float32():
    from llmd4rec.models.bf16 import bf16_cross_entropy

    g = torch.Generator().manual_seed(1)
    h = (2 * torch.randn(300, 8, generator=g)).requires_grad_()
    w = torch.randn(41, 8, generator=g).requires_grad_()
    b = torch.randn(41, generator=g).requires_grad_()
    t = torch.randint(1, 41, (300,), generator=g)
    logits = h @ w.T + b
    logits[:, 0] = float("-inf")
    ref = torch.nn.functional.cross_entropy(logits, t, reduction="none")
    grads_ref = torch.autograd.grad(ref.sum(), (h, w, b))
    low = bf16_cross_entropy(h, w, b, t)
    grads_low = torch.autograd.grad(low.sum(), (h, w, b))
    assert abs(float(low.detach().mean() / ref.detach().mean()) - 1) < 1e-2  # scores of size ~20 here: bf16 moves each by ~0.1
    for a, r in zip(grads_low, grads_ref):
        assert (a - r).norm() / r.norm() < 1e-2
    assert grads_low[1][0].abs().max() == 0 and grads_low[2][0] == 0  # padding never competes


def test_item_chunk_must_be_positive():
    model = SASRec(10, SASRecConfig(hidden=8, n_heads=1, max_len=4))
    with pytest.raises(InputError, match="'crm_train.item_chunk' must be at least 1"):  # refused at load
        load_config(None, ["crm_train.loss=ce_chunked", "crm_train.item_chunk=0"])
    cfg = CRMTrainConfig(loss="ce_chunked", item_chunk=0)  # built in code: the loss still refuses it
    with pytest.raises(ValueError, match="item_chunk"):
        rec_loss(model, torch.randn(2, 8), torch.tensor([1, 2]), cfg, torch.Generator())
