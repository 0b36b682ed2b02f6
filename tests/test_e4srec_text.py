"""Text-grounded item tokens (llm.item_text): token = W_in(id) + W_txt(text); W_txt trains; an item without text
(a zero row) gets exactly its ID-only token; a run stores the text table and loads itself back."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("peft")

from test_e4srec import HIST, N_ITEMS, make_model  # noqa: E402

from llmd4rec.config import Config  # noqa: E402
from llmd4rec.errors import InputError  # noqa: E402
from llmd4rec.io import save_tensors  # noqa: E402
from llmd4rec.loading import build_llm, load_llm  # noqa: E402

D_TXT = 12
NO_TEXT = [3, 4, 5, 7]  # items without text: zero rows


def text_table(seed: int = 1) -> torch.Tensor:
    table = torch.randn(N_ITEMS + 1, D_TXT, generator=torch.Generator().manual_seed(seed))
    table[0] = 0
    table[NO_TEXT] = 0
    return table


def test_w_txt_gets_gradients_and_is_saved(tokenizer):
    model = make_model(tokenizer, "qwen2", text=text_table(), item_text=True)
    assert model.w_txt.bias is None and model.w_txt.weight.shape == (32, D_TXT)
    assert not model.text_table.requires_grad and "text_table" in dict(model.named_buffers())
    assert "w_txt.weight" in model.trainable_state_dict()
    rows, cols = (HIST[:, :-1] != 0).nonzero(as_tuple=True)
    F.cross_entropy(model.prefix_logits(HIST, rows, cols), HIST[rows, cols + 1]).backward()
    assert float(model.w_txt.weight.grad.norm()) > 0


def test_zero_text_row_gives_the_id_only_token(tokenizer):
    """Same LoRA/W_in/W_out in both models: items without text get bit-identical tokens, items with text do not,
    and a history of text-less items scores exactly as in the ID-only model."""
    plain = make_model(tokenizer, "qwen2")
    text = make_model(tokenizer, "qwen2", text=text_table(), item_text=True)
    text.load_state_dict(plain.state_dict(), strict=False)  # everything but w_txt and the text table
    text.item_table.copy_(plain.item_table)
    items = torch.arange(1, N_ITEMS + 1)
    without = torch.isin(items, torch.tensor(NO_TEXT))
    with torch.no_grad():
        a, b = plain._items(items), text._items(items)
        assert torch.equal(a[without], b[without])
        assert not (a[~without] == b[~without]).all(1).any()
        h = torch.tensor([[0, 3, 4, 5], [7, 5, 3, 4]])
        assert torch.equal(plain.score_all(h), text.score_all(h))
        assert not torch.allclose(plain.score_all(HIST[:2]), text.score_all(HIST[:2]))


def test_text_table_must_match_the_item_table(tokenizer):
    with pytest.raises(InputError, match="rows"):
        make_model(tokenizer, text=torch.zeros(N_ITEMS, D_TXT), item_text=True)
    with pytest.raises(InputError, match="item_text"):
        make_model(tokenizer, item_text=True)


def test_run_round_trip_with_text(tiny_backbone_dir, tmp_path):
    """build_llm -> the run's files (item table, text table, trainable weights) -> load_llm: identical scores."""
    cfg = Config()
    cfg.llm.backbone, cfg.llm.item_text, cfg.llm.max_len = str(tiny_backbone_dir), True, 10
    torch.manual_seed(0)
    items, text = torch.randn(N_ITEMS + 1, 8), text_table()
    model = build_llm(cfg, items, "cpu", text).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)  # LoRA B and W_txt away from their start
        scores = model.score_all(HIST)
    folder = tmp_path / "llm"
    save_tensors(folder / "item_table.safetensors", {"item_table": items})
    save_tensors(folder / "text_table.safetensors", {"text_table": text})
    save_tensors(folder / "best.safetensors", model.trainable_state_dict())
    loaded = load_llm(tmp_path, N_ITEMS, cfg)
    assert torch.equal(loaded.text_table, text)
    with torch.no_grad():
        assert torch.equal(loaded.score_all(HIST), scores)
    cfg.llm.item_text = False  # an ID-only model refuses a checkpoint with W_txt
    with pytest.raises(InputError, match="unexpected"):
        load_llm(tmp_path, N_ITEMS, cfg)


def test_a_new_text_model_scores_as_the_id_only_one(tokenizer):
    """W_txt starts at zero: before training, reading text changes no score (text enters as training asks)."""
    for head in ("linear", "tied"):
        plain = make_model(tokenizer, "qwen2", perturb=False, item_head=head)
        text = make_model(tokenizer, "qwen2", text=text_table(), perturb=False, item_text=True, item_head=head)
        assert not text.w_txt.weight.any()
        with torch.no_grad():
            assert torch.equal(plain.score_all(HIST), text.score_all(HIST))
