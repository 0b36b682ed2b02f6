"""Full-softmax cross-entropy over a large catalogue without the batch x items score matrix.

Both models score items with one linear map (SASRec: the item table, E4SRec: W_out); for millions of items the
scores of a batch no longer fit, so the log-sum-exp is streamed over item chunks (`crm_train.loss=ce_chunked`,
`llm_train.loss=ce_chunked`).
"""

from __future__ import annotations

import torch


class ChunkedLogSumExp(torch.autograd.Function):
    """logsumexp over items 1..N of h @ w.T + b [P, N+1] (column 0, padding, left out), streamed over item chunks.

    Backward recomputes each chunk's scores instead of keeping them, so memory is P x chunk floats whatever the
    catalogue size, at the price of one more h @ w_chunk.T per chunk. b may be None (no bias). bf16: the three
    matmuls run on bfloat16 copies of h and w (models/bf16.py), the softmax stays float32.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, chunk: int,
                bf16: bool = False) -> torch.Tensor:
        hm, wm = (h.bfloat16(), w.bfloat16()) if bf16 else (h, w)
        lse = h.new_full((h.shape[0],), float("-inf"), dtype=torch.float32)
        for lo in range(1, w.shape[0], chunk):
            lse = torch.logaddexp(lse, _scores(hm, wm, b, lo, lo + chunk).logsumexp(1))
        ctx.save_for_backward(hm, wm, b, lse)
        ctx.chunk, ctx.dtypes = chunk, (h.dtype, w.dtype)
        return lse

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, w, b, lse = ctx.saved_tensors
        grad_h = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        grad_b = None if b is None else torch.zeros_like(b)
        for lo in range(1, w.shape[0], ctx.chunk):
            hi = lo + ctx.chunk
            p = _scores(h, w, b, lo, hi).sub_(lse[:, None]).exp_().mul_(grad[:, None])  # softmax x upstream grad
            if grad_b is not None:
                grad_b[lo:hi] = p.sum(0)
            p = p.to(h.dtype)
            grad_h += (p @ w[lo:hi]).float()
            grad_w[lo:hi] = (p.T @ h).float()
        return grad_h.to(ctx.dtypes[0]), grad_w.to(ctx.dtypes[1]), grad_b, None, None


def _scores(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, lo: int, hi: int) -> torch.Tensor:
    s = (h @ w[lo:hi].T).float()
    return s if b is None else s.add_(b[lo:hi])


def chunked_cross_entropy(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, targets: torch.Tensor,
                          chunk: int, bf16: bool = False) -> torch.Tensor:
    """Per-row cross-entropy of the scores h @ w.T + b over items 1..N, item chunk by item chunk."""
    if chunk < 1:
        raise ValueError(f"item_chunk must be at least 1, got {chunk}")
    target_scores = (h * w[targets]).sum(-1) + (0 if b is None else b[targets])
    return ChunkedLogSumExp.apply(h, w, b, chunk, bf16) - target_scores
