"""The KL of a distillation step against a cached teacher: two autograd Functions with hand-written forward and
backward passes, one per teacher-cache mode (docs/architecture.md, "The distillation hot path"). They are the hot loop of every
distillation phase, kept apart from the cache's file format (`cache.py`) so each can change without the other.

Student logits are in the `score_all` layout [b, n_items + 1]; column 0 (padding) gets no mass and no gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .weights import target_ranks


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


_EXP_FLOOR = -80.0
_BLOCK_ELEMENTS = 1 << 18  # rows are processed in blocks of about 1 MB of floats, so each block's passes hit the cache


def _blocks(n_rows: int, width: int) -> list[slice]:
    rows = max(1, _BLOCK_ELEMENTS // max(width, 1))
    return [slice(a, min(a + rows, n_rows)) for a in range(0, n_rows, rows)]


class _TopKBucketKL(torch.autograd.Function):
    """KL(teacher || student) over k + 1 buckets (the teacher's top-k items and the tail), per sample.

    Written out by hand because this runs for every training position of an upward phase: a few passes over the
    [b, n_items + 1] logits, block by block while the block is in cache, against about twenty full-size passes for
    the same formula in autograd ops. The tail is summed in its own max-shifted exponentials (no 1 - top-k
    cancellation, no underflow), and the k + 1 bucket log-probabilities are formed in float64.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, idx: torch.Tensor, log_pt: torch.Tensor, T: float,
                targets: torch.Tensor | None):
        dtype = torch.promote_types(logits.dtype, torch.float32)
        b, width = logits.shape
        ranks = torch.zeros(b if targets is not None else 0, dtype=torch.long, device=logits.device)
        e_tail = torch.empty(b, width, dtype=dtype, device=logits.device)
        z_top = torch.empty(idx.shape, dtype=torch.float64, device=logits.device)
        m_tail = torch.empty(b, 1, dtype=dtype, device=logits.device)
        for rows in _blocks(b, width):
            if targets is not None:  # the student's target ranks while the block is in cache
                ranks[rows] = target_ranks(logits.detach()[rows], targets[rows])
            z = logits.detach()[rows].to(dtype) * (1.0 / T)
            z[:, 0] = float("-inf")  # padding takes no mass
            z_top[rows] = z.gather(1, idx[rows])
            z.scatter_(1, idx[rows], float("-inf"))  # z now holds the tail items only
            m_tail[rows] = z.amax(dim=1, keepdim=True)
            torch.clamp(z.sub_(m_tail[rows]), min=_EXP_FLOOR, out=e_tail[rows]).exp_()  # no (slow) denormals
        tail_sum = e_tail.sum(dim=1, keepdim=True).double()
        buckets = torch.cat([z_top, m_tail.double() + tail_sum.log()], dim=1)
        lse = buckets.logsumexp(dim=1, keepdim=True)
        log_ps = buckets - lse
        log_pt = log_pt.double()
        p_t = log_pt.exp()
        kl = torch.where(p_t > 0, p_t * (log_pt - log_ps), torch.zeros((), dtype=torch.float64,
                                                                       device=p_t.device)).sum(1)
        ctx.save_for_backward(e_tail, idx, p_t, log_ps, tail_sum, m_tail, lse)
        ctx.T, ctx.dtype = T, logits.dtype
        ctx.mark_non_differentiable(ranks)
        return kl.to(dtype), ranks

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor, _):
        e_tail, idx, p_t, log_ps, tail_sum, m_tail, lse = ctx.saved_tensors  # used once: e_tail becomes the gradient
        g = grad.double()[:, None] / ctx.T
        # d KL / d z_j = mass * p_s(j) - p_t(bucket of j) * p_s(j | bucket), a tail item's share of the tail being
        # e_j / tail_sum; mass = sum of p_t, 1 up to the rounding of the stored teacher
        mass = p_t.sum(dim=1, keepdim=True)
        tail_coef = ((mass * (m_tail.double() - lse).exp() - p_t[:, -1:] / tail_sum) * g).to(e_tail.dtype)
        out = e_tail.mul_(tail_coef)
        out.scatter_(1, idx, ((mass * log_ps[:, :-1].exp() - p_t[:, :-1]) * g).to(e_tail.dtype))
        out[:, 0] = 0.0
        return out.to(ctx.dtype), None, None, None, None


class _FullRowKL(torch.autograd.Function):
    """KL(teacher || student) over all items from a stored fp16 teacher row, per sample; the same formula as
    `losses.kd_kl`, forward and backward written out for the hot loop (block by block, a third of the passes)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, teacher: torch.Tensor, T: float, targets: torch.Tensor | None):
        dtype = torch.promote_types(logits.dtype, torch.float32)
        b, width = logits.shape
        ranks = torch.zeros(b if targets is not None else 0, dtype=torch.long, device=logits.device)
        p_t = torch.empty(b, width - 1, dtype=dtype, device=logits.device)
        p_s = torch.empty(b, width, dtype=dtype, device=logits.device)  # full width: the gradient is made in place
        kl = torch.empty(b, dtype=dtype, device=logits.device)
        for rows in _blocks(b, width):
            if targets is not None:  # the student's target ranks while the block is in cache
                ranks[rows] = target_ranks(logits.detach()[rows], targets[rows])
            lt = teacher[rows].to(dtype).mul_(1.0 / T).clamp_(min=_EXP_FLOOR)  # stored max-shifted: the max is 0
            pt = torch.exp(lt, out=p_t[rows])
            total_t = pt.sum(dim=1, keepdim=True)
            pt.div_(total_t)
            log_pt = lt.sub_(total_t.log_())
            z = logits.detach()[rows].to(dtype) * (1.0 / T)
            z[:, 0] = float("-inf")
            z.sub_(z.amax(dim=1, keepdim=True))
            ps = torch.clamp(z, min=_EXP_FLOOR, out=p_s[rows]).exp_()
            ps[:, 0] = 0.0
            total = ps.sum(dim=1, keepdim=True)
            ps.div_(total)
            log_ps = z.sub_(total.log_())[:, 1:]
            kl[rows] = log_pt.sub_(log_ps).mul_(pt).sum(dim=1)
        ctx.save_for_backward(p_t, p_s)
        ctx.T, ctx.dtype = T, logits.dtype
        ctx.mark_non_differentiable(ranks)
        return kl, ranks

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor, _):
        p_t, p_s = ctx.saved_tensors  # used once: overwritten in place
        g = (grad / ctx.T)[:, None]
        mass = p_t.sum(dim=1, keepdim=True)  # 1 up to rounding
        for rows in _blocks(*p_s.shape):
            p_s[rows].mul_(mass[rows] * g[rows])[:, 1:].sub_(p_t[rows].mul_(g[rows]))
        return p_s.to(ctx.dtype), None, None, None


def full_row_kl(student_logits: torch.Tensor, teacher: torch.Tensor, T: float,
                targets: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample KL(teacher || student) against stored max-shifted teacher rows [b, n_items], and the student's
    target ranks from the same pass (an empty tensor when targets is None)."""
    return _FullRowKL.apply(student_logits, teacher, T, targets)


def topk_bucket_kl(student_logits: torch.Tensor, idx: torch.Tensor, topk_val: torch.Tensor, log_tail: torch.Tensor,
                   T: float, targets: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample KL over k + 1 buckets from the teacher's top-k item ids `idx` [b, k], their max-shifted logits
    `topk_val` [b, k] and the log of the tail mass `log_tail` [b, 1]; and the student's target ranks."""
    log_top = F.log_softmax(topk_val.float() / T, dim=1) + _log1mexp(log_tail)
    log_pt = torch.cat([log_top, log_tail], dim=1)
    return _TopKBucketKL.apply(student_logits, idx, log_pt, T, targets)
