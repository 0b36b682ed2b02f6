"""E4SRec's bfloat16 path and its options on tiny random decoders: the same losses, gradients and scores as float32
within bfloat16's precision, float32 scores for full ranking, LoRA on the attention projections."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("peft")

from test_e4srec import HIST, make_model  # noqa: E402

ROWS, COLS = (HIST[:, :-1] != 0).nonzero(as_tuple=True)
TARGETS = HIST[ROWS, COLS + 1]


def loss_and_grads(model):
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model.prefix_logits(HIST, ROWS, COLS), TARGETS)
    loss.backward()
    return loss.detach(), {k: p.grad for k, p in model.named_parameters() if p.requires_grad}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("targets", [["gate_proj", "up_proj", "down_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"]])
def test_bf16_matches_float32(tokenizer, attn, targets):
    """The same weights (the backbone rounded to bfloat16): loss within 1% relative, every gradient within 5% in
    norm, scores within 2% of their spread. bfloat16 keeps 8 significant bits (relative rounding 0.4%), two layers
    of rounding stay well inside these bounds."""
    ref = make_model(tokenizer, "qwen2", attn, lora_targets=targets, lora_dropout=0.0)
    half = make_model(tokenizer, "qwen2", attn, backbone_dtype=torch.bfloat16, lora_targets=targets,
                      lora_dropout=0.0)
    assert {p.dtype for p in half.parameters() if p.requires_grad} == {torch.float32}
    loss, grads = loss_and_grads(ref)
    half_loss, half_grads = loss_and_grads(half)
    assert half_loss.dtype == torch.float32
    assert abs(float(half_loss - loss)) < 0.01 * float(loss)
    assert grads.keys() == half_grads.keys() and any(targets[0] in k for k in grads)
    for k, g in grads.items():
        assert half_grads[k].dtype == torch.float32, k
        assert float(g.norm()) > 0, k
        assert rel_err(half_grads[k], g) < 0.05, k
    with torch.no_grad():
        scores, half_scores = ref.score_all(HIST), half.score_all(HIST)
    assert (half_scores - scores).abs().max() < 0.02 * (scores.max() - scores.min())


def test_bf16_runs_the_decoder_in_bf16_and_scores_in_float32(tokenizer):
    """LoRA's matmuls see bfloat16 inputs (no float32 detour through the adapters) and give bfloat16 outputs;
    W_out and the scores stay float32: bfloat16 scores over many items would tie, and ties count against the
    target in full ranking."""
    model = make_model(tokenizer, "qwen2", backbone_dtype=torch.bfloat16)
    seen = []
    lora_a = next(m for name, m in model.decoder.named_modules() if name.endswith("lora_A.default"))
    lora_a.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
    with torch.no_grad():
        scores = model.score_all(HIST)
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16)}
    assert scores.dtype == torch.float32 and model.w_out.weight.dtype == torch.float32
    assert not torch.equal(scores, scores.bfloat16().float())  # finer than bfloat16's grid
    assert model.prefix_logits(HIST, ROWS, COLS).dtype == torch.float32


def test_lora_on_attention_projections(tokenizer):
    """llm.lora_targets=q_proj,k_proj,v_proj,o_proj: only those adapters exist, they get gradients, and the all-prefix
    path still equals each prefix on its own."""
    model = make_model(tokenizer, "qwen2", lora_targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    lora = [k for k, p in model.named_parameters() if p.requires_grad and "lora_" in k]
    assert {k.split(".")[-4] for k in lora} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    _, grads = loss_and_grads(model)
    assert all(float(grads[k].norm()) > 0 for k in lora)
    with torch.no_grad():
        fast = model.prefix_logits(HIST, ROWS, COLS)
        model.cfg.all_prefix = False
        slow = model.prefix_logits(HIST, ROWS, COLS)
    assert torch.allclose(fast, slow, atol=1e-4)

