"""Item scores on the CPU's bfloat16 matrix units, with the softmax and everything after it in float32.

Training either model ends in `h @ w.T` over the whole catalogue and a softmax over it: the matmul and its two
gradient matmuls are most of a SASRec step. AMX/AVX-512 bf16 units run them many times faster than float32 (they
accumulate in float32; only the inputs and the product's storage are rounded to bfloat16). The log-sum-exp, the
softmax and the gradient with respect to the scores stay float32 (`crm_train.precision=bfloat16`).

Evaluation never uses this: bfloat16 scores tie far more often, and ties count against the target.
"""

from __future__ import annotations

import torch

ROW_BLOCK = 128  # rows of scores per pass: 128 x 12k float32 = 6 MB, the step's working set stays near the caches


class Bf16Scores(torch.autograd.Function):
    """h [P, d] @ w [N, d].T (+ b) as float32 scores, the products (forward and both gradients) in bfloat16."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        hb, wb = h.bfloat16(), w.bfloat16()
        ctx.save_for_backward(hb, wb)
        ctx.has_bias = b is not None
        s = (hb @ wb.T).float()
        return s if b is None else s.add_(b)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        hb, wb = ctx.saved_tensors
        gb = grad.bfloat16()
        return (gb @ wb).float(), (gb.T @ hb).float(), grad.sum(0) if ctx.has_bias else None


def bf16_scores(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    return Bf16Scores.apply(h, w, b)


class Bf16CrossEntropy(torch.autograd.Function):
    """Per-row CE over items 1..N of h @ w.T + b, in row blocks: no [P, N] float32 matrix is ever whole.

    Each block's scores come from one bf16 matmul and are turned into the softmax in float32 with a single exp per
    score; the softmax is kept in bfloat16 (what the gradient matmuls read anyway), so backward needs neither a second
    matmul nor a second exp: d loss / d scores = softmax - one-hot, scaled by the upstream gradient.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, targets: torch.Tensor):
        hb, wb = h.bfloat16(), w.bfloat16()
        probs = torch.empty(len(h), len(w), dtype=torch.bfloat16, device=h.device)
        loss = torch.empty(len(h), dtype=torch.float32, device=h.device)
        rows = torch.arange(len(h), device=h.device)
        for lo in range(0, len(h), ROW_BLOCK):
            hi = lo + ROW_BLOCK
            s = _block(hb, wb, b, lo)
            target = s[rows[lo:hi] - lo, targets[lo:hi]]
            top = s.amax(1, keepdim=True)
            z = s.sub_(top).exp_().sum(1, keepdim=True)
            loss[lo:hi] = (top + z.log()).squeeze(1) - target
            probs[lo:hi] = s.div_(z)
        ctx.save_for_backward(hb, wb, probs, targets)
        ctx.has_bias = b is not None
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        hb, wb, probs, targets = ctx.saved_tensors
        g = probs.mul_(grad.to(torch.bfloat16)[:, None])  # the saved softmax is not needed again: reuse its memory
        g[torch.arange(len(g), device=g.device), targets] -= grad.to(torch.bfloat16)
        grad_b = g.float().sum(0) if ctx.has_bias else None
        return (g @ wb).float(), (g.T @ hb).float(), grad_b, None


def _block(hb: torch.Tensor, wb: torch.Tensor, b: torch.Tensor | None, lo: int) -> torch.Tensor:
    s = (hb[lo:lo + ROW_BLOCK] @ wb.T).float()
    if b is not None:
        s += b
    s[:, 0] = float("-inf")  # padding is never a candidate
    return s


def bf16_cross_entropy(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                       targets: torch.Tensor) -> torch.Tensor:
    """Per-row full-softmax cross-entropy over items 1..N with bf16 score matmuls (column 0, padding, left out)."""
    return Bf16CrossEntropy.apply(h, w, b, targets)
