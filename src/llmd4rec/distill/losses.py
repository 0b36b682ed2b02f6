"""The distillation terms of docs/method.md ("The losses"), one value per sample: forward KL(teacher || student) at
a temperature, and the ranking alternative of the upward direction (`rank_distill`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
          t_squared: bool = False, ignore_first_column: bool = True,
          mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample KL(softmax(teacher/T) || softmax(student/T)), summed over items: shape [S].

    Equals `kl_div(log_softmax(student/T), softmax(teacher/T)).sum(-1)`; the teacher is detached.
    Both distributions live on the same columns: by default column 0 (padding in the `score_all`
    layout) is dropped, so it takes no probability mass; pass `ignore_first_column=False` for logits
    that hold real items only. `mask` (bool, broadcastable to [S, N] over the full width N, True =
    keep) removes further columns from both distributions. Computed from log-softmax in float32 (float64
    when given), so large logits and low T (0.2) neither overflow nor give NaN. `t_squared` multiplies
    by T^2 (Hinton's gradient-scale correction; off by default, docs/method.md).
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(f"kd_kl wants two [S, N] tensors of one shape, got {tuple(student_logits.shape)} "
                         f"and {tuple(teacher_logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    s = _at_least_fp32(student_logits) / temperature
    t = _at_least_fp32(teacher_logits.detach()) / temperature
    if mask is not None:
        keep = torch.broadcast_to(mask.to(device=s.device, dtype=torch.bool), s.shape)
        s = s.masked_fill(~keep, float("-inf"))
        t = t.masked_fill(~keep, float("-inf"))
    if ignore_first_column:
        s, t = s[:, 1:], t[:, 1:]
    kl = kl_from_log_probs(F.log_softmax(t, dim=-1), F.log_softmax(s, dim=-1))
    return kl * (temperature ** 2) if t_squared else kl


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def kl_from_log_probs(log_pt: torch.Tensor, log_ps: torch.Tensor) -> torch.Tensor:
    """sum_j p_t(j) * (log p_t(j) - log p_s(j)) over the last axis, from normalised log-probabilities.

    Buckets the teacher gives no mass (masked, -inf logits) contribute 0 instead of 0 * (-inf - -inf) = NaN;
    the gradient through the unused branch of `where` is 0 * finite, so it stays NaN-free as well.
    """
    p_t = log_pt.exp()
    terms = torch.where(p_t > 0, p_t * (log_pt - log_ps), torch.zeros((), device=log_pt.device))
    return terms.sum(dim=-1)


def rank_distill(student_logits: torch.Tensor, top_idx: torch.Tensor, top_vals: torch.Tensor, temperature: float,
                 position_lambda: float) -> torch.Tensor:
    """Per-sample -sum_k w_k log p_student(i_k) over the teacher's K best items i_1..i_K: shape [S].

    A student trained with a full softmax learns from the teacher's short list as weighted soft labels instead of
    matching its whole distribution (DLLM2Rec's finding: an LLM teacher's tail is noise to a CRM). The weights sum to
    1 per sample: the mean of three distributions over the K items, each normalised, namely position exp(-k /
    position_lambda) (k = 0 for the best), the teacher's confidence softmax(top_vals / temperature), and
    consistency, uniform over the items that are also in the student's own top K (left out of the mean when there
    are none). `student_logits` [S, N + 1] in the score_all layout (column 0, padding, takes no mass); `top_idx`
    [S, K] item ids in 1..N; `top_vals` [S, K] the teacher's logits of those items. Weights carry no gradient.
    """
    if top_idx.shape != top_vals.shape or top_idx.shape[0] != student_logits.shape[0]:
        raise ValueError(f"rank_distill wants top_idx and top_vals [S, K] for student logits [S, N + 1], got "
                         f"{tuple(top_idx.shape)}, {tuple(top_vals.shape)} and {tuple(student_logits.shape)}")
    k = top_idx.shape[1]
    s = _at_least_fp32(student_logits)[:, 1:]
    log_p = F.log_softmax(s, dim=1).gather(1, top_idx - 1)
    with torch.no_grad():
        position = torch.exp(-torch.arange(k, device=s.device, dtype=s.dtype) / position_lambda)
        position = (position / position.sum()).expand(len(s), k)
        confidence = F.softmax(_at_least_fp32(top_vals) / temperature, dim=1)
        own_top = s.topk(min(k, s.shape[1]), dim=1).indices + 1
        consistent = (top_idx[:, :, None] == own_top[:, None, :]).any(-1).to(s.dtype)
        n_consistent = consistent.sum(1, keepdim=True)
        w = position + confidence + consistent / n_consistent.clamp(min=1)
        w = w / (2 + (n_consistent > 0).to(s.dtype))
    return -(w * log_p).sum(1)
