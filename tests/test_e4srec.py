"""E4SRec on tiny random Qwen2/Llama decoders: the fast paths must give the plain path's logits, LoRA active."""

import logging
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config  # noqa: E402

from llmd4rec.config import E4SRecConfig  # noqa: E402
from llmd4rec.errors import InputError  # noqa: E402
from llmd4rec.io import load_tensors, save_tensors  # noqa: E402
from llmd4rec.models.backbone import load_backbone  # noqa: E402
from llmd4rec.models.e4srec import E4SRec  # noqa: E402

N_ITEMS, D_ITEM = 30, 8
ARCHS = {"llama": LlamaConfig, "qwen2": Qwen2Config}
# left-padded rows of different lengths, a single item, an empty history
HIST = torch.tensor([[0, 0, 0, 3, 4, 5, 9],
                     [1, 2, 3, 4, 5, 6, 30],
                     [0, 0, 0, 0, 0, 0, 7],
                     [0, 0, 0, 0, 0, 0, 0],
                     [0, 11, 12, 13, 14, 15, 16]])


def make_model(tokenizer, arch="llama", attn="sdpa", seed=0, backbone_dtype=torch.float32, text=None, perturb=True,
               **cfg_kw):
    torch.manual_seed(seed)
    config = ARCHS[arch](vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    backbone = AutoModelForCausalLM.from_config(config, attn_implementation=attn).to(backbone_dtype)
    cfg = E4SRecConfig(instruction="Given the history, predict:", response="\n### Response:", max_len=10, **cfg_kw)
    model = E4SRec(cfg, torch.randn(N_ITEMS + 1, D_ITEM), backbone, tokenizer, text).eval()
    with torch.no_grad():  # LoRA B and W_txt start at zero: perturb them so the equalities below exercise them
        for name, p in model.named_parameters():
            if perturb and ("lora_B" in name or name == "w_txt.weight"):
                p.normal_(0, 0.3)
    return model


def unpadded(h: torch.Tensor) -> torch.Tensor:
    return h[h != 0][None] if (h != 0).any() else h[-1:][None]


def per_sample_logits(model, histories):
    """The reference: every history alone, no padding at all."""
    return torch.cat([model.score_items(model.encode(unpadded(h), share_prefix=False), 0, N_ITEMS + 1)
                      for h in histories])


def test_shapes(tokenizer):
    model = make_model(tokenizer)
    with torch.no_grad():
        state = model.encode(HIST)
        assert state.shape == (5, 32)
        logits = model.score_all(HIST)
        assert logits.shape == (5, N_ITEMS + 1) and logits.dtype == torch.float32
        assert torch.allclose(model.score_items(state, 3, 9), logits[:, 3:9])
        assert model.prefix_hidden(HIST).shape == (5, 7, 32)
        rows, cols = (HIST != 0).nonzero(as_tuple=True)
        assert model.prefix_logits(HIST, rows, cols).shape == (len(rows), N_ITEMS + 1)
        with pytest.raises(ValueError, match="real"):
            model.prefix_logits(HIST, torch.tensor([0]), torch.tensor([0]))  # ends at padding
    assert model.n_items == N_ITEMS and model.max_len == 10


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_prefix_sharing_matches_plain(tokenizer, arch, attn):
    model = make_model(tokenizer, arch, attn)
    with torch.no_grad():
        ref = per_sample_logits(model, HIST)
        plain = model.score_items(model.encode(HIST, share_prefix=False), 0, N_ITEMS + 1)
        shared = model.score_items(model.encode(HIST, share_prefix=True), 0, N_ITEMS + 1)
    assert torch.allclose(plain, ref, atol=1e-4)
    assert torch.allclose(shared, ref, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("pack_tokens", [512, 40])  # one packed row for all users / several rows
def test_all_prefix_matches_per_prefix(tokenizer, arch, attn, pack_tokens):
    model = make_model(tokenizer, arch, attn)
    model.pack_tokens = pack_tokens
    rows, cols = (HIST != 0).nonzero(as_tuple=True)
    prefixes = [HIST[r, :c + 1] for r, c in zip(rows.tolist(), cols.tolist())]
    with torch.no_grad():
        ref = per_sample_logits(model, prefixes)
        fast = model.prefix_logits(HIST, rows, cols)
        pick = torch.tensor([0, 4, 5, len(rows) - 1])  # a few prefixes only: fewer response copies
        some = model.prefix_logits(HIST, rows[pick], cols[pick])
        model.cfg.all_prefix = False
        slow = model.prefix_logits(HIST, rows, cols)
        model.cfg.all_prefix = True
        model.inline_prompt = True  # the FSDP layout: the prompt inside every packed row
        inline = model.prefix_logits(HIST, rows, cols)
    assert torch.allclose(fast, ref, atol=1e-4)
    assert torch.allclose(some, ref[pick], atol=1e-4)
    assert torch.allclose(slow, ref, atol=1e-4)
    assert torch.allclose(inline, ref, atol=1e-4)


def test_all_prefix_gradients_match_plain(tokenizer):
    model = make_model(tokenizer, "qwen2")
    rows, cols = (HIST[:, :-1] != 0).nonzero(as_tuple=True)
    targets = HIST[rows, cols + 1]
    grads = []
    for all_prefix in (True, False):
        model.cfg.all_prefix = all_prefix
        model.zero_grad()
        torch.nn.functional.cross_entropy(model.prefix_logits(HIST, rows, cols), targets).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad})
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-5), k


def test_lora_is_active(tokenizer):
    model = make_model(tokenizer)
    with torch.no_grad():
        before = model.score_all(HIST)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.zero_()
        assert not torch.allclose(model.score_all(HIST), before, atol=1e-3)


def test_only_lora_and_heads_train(tokenizer):
    model = make_model(tokenizer)
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in k or k.split(".")[0] in ("w_in", "w_out") for k in trainable)
    assert {"w_in.weight", "w_in.bias", "w_out.weight", "w_out.bias"} <= trainable
    assert any("gate_proj.lora_A" in k for k in trainable) and any("down_proj.lora_B" in k for k in trainable)
    assert not any("q_proj" in k or "embed_tokens" in k for k in trainable)
    assert "item_table" in dict(model.named_buffers()) and not model.item_table.requires_grad
    assert set(model.trainable_state_dict()) == trainable

    table = model.item_table.clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    rows, cols = (HIST[:, :-1] != 0).nonzero(as_tuple=True)
    torch.nn.functional.cross_entropy(model.prefix_logits(HIST, rows, cols), HIST[rows, cols + 1]).backward()
    opt.step()
    assert torch.equal(model.item_table, table)


def test_bf16_backbone_trains_float32_adapters_and_small_steps_land(tokenizer):
    """With a bfloat16 backbone every trainable weight is float32: one AdamW step of 1e-5 moves every LoRA A weight
    (about 0.1 in size, where bfloat16's spacing is 4e-4 and would round such a step away), and the logits agree
    with a float32 copy of the same model to bfloat16 precision."""
    ref = make_model(tokenizer, "qwen2")
    half = make_model(tokenizer, "qwen2", backbone_dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in half.parameters() if not p.requires_grad} == {torch.bfloat16}
    rows, cols = (HIST[:, :-1] != 0).nonzero(as_tuple=True)
    with torch.no_grad():
        assert torch.allclose(half.prefix_logits(HIST, rows, cols), ref.prefix_logits(HIST, rows, cols), atol=0.1)
    before = {k: p.detach().clone() for k, p in half.named_parameters() if "lora_A" in k}
    opt = torch.optim.AdamW([p for p in half.parameters() if p.requires_grad], lr=1e-5)
    torch.nn.functional.cross_entropy(half.prefix_logits(HIST, rows, cols), HIST[rows, cols + 1]).backward()
    opt.step()
    moved = [bool((p.detach() != before[k]).all()) for k, p in half.named_parameters() if "lora_A" in k]
    assert moved and all(moved)


def test_checkpoint_round_trip(tokenizer, tmp_path):
    model = make_model(tokenizer, seed=0)
    path = tmp_path / "llm.safetensors"
    save_tensors(path, model.trainable_state_dict())
    other = make_model(tokenizer, seed=0)  # same backbone weights, fresh heads and LoRA
    with torch.no_grad():
        for name, p in other.named_parameters():
            if p.requires_grad:
                p.add_(1.0)
        other.set_item_embeddings(model.item_table)
        assert not torch.allclose(other.score_all(HIST), model.score_all(HIST))
        other.load_trainable_state_dict(load_tensors(path))
        assert torch.equal(other.score_all(HIST), model.score_all(HIST))
    with pytest.raises(InputError):
        other.load_trainable_state_dict({"w_in.weight": torch.zeros(1)})


def test_set_item_embeddings_changes_scores(tokenizer):
    model = make_model(tokenizer)
    with torch.no_grad():
        before = model.score_all(HIST)
        model.set_item_embeddings(torch.randn(N_ITEMS + 1, D_ITEM))
        assert not torch.allclose(model.score_all(HIST), before, atol=1e-3)
    with pytest.raises(ValueError):
        model.set_item_embeddings(torch.randn(N_ITEMS, D_ITEM))


def test_keeps_latest_max_len_items(tokenizer):
    model = make_model(tokenizer)
    long = torch.arange(1, 16)[None]  # 15 items, max_len 10
    with torch.no_grad():
        assert torch.allclose(model.score_all(long), model.score_all(long[:, -10:]), atol=1e-5)


def test_missing_backbone_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_backbone(str(tmp_path / "nope.gguf"))
    with pytest.raises(InputError, match="cannot load the backbone"):
        load_backbone(str(tmp_path / "no-such-model"))
    with pytest.raises(InputError, match="dtype"):
        load_backbone("smollm2", dtype="int3")
    with pytest.raises(InputError, match="llm.attention"):
        load_backbone("smollm2", attention="flash")


def _beauty_dir() -> Path:
    root = os.environ.get("LLMD4REC_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
    return Path(root) / "Beauty"


@pytest.mark.slow
@pytest.mark.skipif(not (_beauty_dir() / "Beauty.txt").is_file(), reason="Beauty data not present")
def test_real_smollm2_scores_a_beauty_history():
    with open(_beauty_dir() / "Beauty.txt") as f:
        history = [int(x) for x in next(line for line in f if len(line.split()) > 6).split()[1:]]
    n_items = 12101
    cfg = E4SRecConfig(backbone="smollm2", keep_layers=2)
    model = E4SRec(cfg, torch.randn(n_items + 1, 64)).eval()
    assert len(model.decoder.layers) == 2
    h = torch.tensor([history[:-2]])
    with torch.no_grad():
        logits = model.score_all(h)
        plain = model.score_items(model.encode(h, share_prefix=False), 0, n_items + 1)
        last = model.prefix_hidden(h)[:, -1]
    assert logits.shape == (1, n_items + 1) and torch.isfinite(logits).all()
    assert torch.allclose(logits, plain, atol=1e-4)
    assert torch.allclose(model.score_items(last, 0, n_items + 1), plain, atol=1e-4)


@pytest.mark.slow
def test_smollm2_gguf_is_unpacked_into_plain_layers_of_the_asked_dtype():
    """The GGUF's quantized blocks become dense nn.Linear weights in llm.dtype (what LoRA and the bfloat16 units
    need), asked for explicitly: transformers has no warning to give that the weights stay packed in float32."""
    from transformers.utils import logging as hf_logging

    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    hf_logging.get_logger("transformers").addHandler(handler)
    try:
        model, _ = load_backbone("smollm2", keep_layers=1, dtype="bfloat16")
    finally:
        hf_logging.get_logger("transformers").removeHandler(handler)
    linears = [m for m in model.modules() if "Linear" in type(m).__name__]
    assert linears and all(type(m) is torch.nn.Linear and m.weight.dtype == torch.bfloat16 for m in linears)
    assert not [m for m in said if "packed" in m]


def test_lora_dropout_acts_in_training_only(tokenizer):
    """peft's dropout is swapped for masks drawn from uniforms: still p, still only in training."""
    model = make_model(tokenizer, lora_dropout=0.5)
    drops = [m for n, m in model.decoder.named_modules() if n.endswith("lora_dropout.default")]
    assert drops and all(d.p == 0.5 for d in drops)
    x = torch.ones(20000)
    kept = drops[0].train()(x)
    assert set(kept.unique().tolist()) == {0.0, 2.0} and abs(float((kept > 0).float().mean()) - 0.5) < 0.02
    with torch.no_grad():
        model.eval()
        assert torch.equal(model.score_all(HIST), model.score_all(HIST))
        model.train()
        assert not torch.equal(model.score_all(HIST), model.score_all(HIST))
