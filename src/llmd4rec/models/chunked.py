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
    catalogue size, at the price of one more h @ w_chunk.T per chunk. b may be None (no bias).
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, chunk: int) -> torch.Tensor:
        lse = h.new_full((h.shape[0],), float("-inf"))
        for lo in range(1, w.shape[0], chunk):
            lse = torch.logaddexp(lse, _scores(h, w, b, lo, lo + chunk).logsumexp(1))
        ctx.save_for_backward(h, w, b, lse)
        ctx.chunk = chunk
        return lse

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, w, b, lse = ctx.saved_tensors
        grad_h, grad_w = torch.zeros_like(h), torch.zeros_like(w)
        grad_b = None if b is None else torch.zeros_like(b)
        for lo in range(1, w.shape[0], ctx.chunk):
            hi = lo + ctx.chunk
            p = _scores(h, w, b, lo, hi).sub_(lse[:, None]).exp_().mul_(grad[:, None])  # softmax x upstream grad
            grad_h.addmm_(p, w[lo:hi])
            grad_w[lo:hi] = p.T @ h
            if grad_b is not None:
                grad_b[lo:hi] = p.sum(0)
        return grad_h, grad_w, grad_b, None


def _scores(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, lo: int, hi: int) -> torch.Tensor:
    s = h @ w[lo:hi].T
    return s if b is None else s.add_(b[lo:hi])


def chunked_cross_entropy(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, targets: torch.Tensor,
                          chunk: int) -> torch.Tensor:
    """Per-row cross-entropy of the scores h @ w.T + b over items 1..N, item chunk by item chunk."""
    if chunk < 1:
        raise ValueError(f"item_chunk must be at least 1, got {chunk}")
    target_scores = (h * w[targets]).sum(-1) + (0 if b is None else b[targets])
    return ChunkedLogSumExp.apply(h, w, b, chunk) - target_scores
