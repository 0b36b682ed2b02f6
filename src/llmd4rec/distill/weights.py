"""Rank-based sample weights of docs/method.md ("Sample weights"): trust the teacher more where it ranks the
truth better."""

from __future__ import annotations

import math

import torch

from ..evaluation import count_at_least


@torch.no_grad()
def target_ranks(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target in `score_all` layout logits [S, N]: LongTensor [S].

    Counts the other items 1..N-1 scored at least as high as the target, so ties count against it (a
    constant scorer gets no credit), exactly as `evaluation.compute_ranks`; column 0 (padding) is never
    counted, and a NaN target score counts as -inf (ranks last).
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"target_ranks wants logits [S, N] and targets [S], got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    targets = targets.to(device=logits.device, dtype=torch.long)
    if targets.numel() and (int(targets.min()) < 1 or int(targets.max()) >= logits.shape[1]):
        raise ValueError(f"targets must be item ids in 1..{logits.shape[1] - 1}")
    t = torch.nan_to_num(logits.gather(1, targets[:, None]), nan=-math.inf)
    # count every column at least as high, then take back column 0 and the target itself (no [S, N] copies)
    count = count_at_least(logits, t)
    return count - (logits[:, :1] >= t).squeeze(1).long() - (logits.gather(1, targets[:, None]) >= t).squeeze(1).long()


def _as_float(r: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(r).to(torch.float32)


def _trust_in_teacher(r_teacher: torch.Tensor, r_student: torch.Tensor) -> torch.Tensor:
    """The one rule behind w1 and w2: above 1 where the teacher ranks the truth better than the student, below 1
    where the student is already better, 1 on equal ranks; max(r, 1) in the denominators, clipped to [0, 2]."""
    r_t, r_s = _as_float(r_teacher), _as_float(r_student)
    up = 1 + (r_s - r_t) / r_t.clamp(min=1)
    down = 1 - (r_t - r_s) / r_s.clamp(min=1)
    return torch.where(r_s > r_t, up, down).clamp(0.0, 2.0)


def weights_crm_to_llm(r_c: torch.Tensor, r_l: torch.Tensor) -> torch.Tensor:
    """w1 (CRM teaches LLM) from 0-based target ranks under the CRM (r_c) and the LLM (r_l); in [0, 2].

    r_l > r_c: 1 + (r_l - r_c) / max(r_c, 1), else 1 - (r_c - r_l) / max(r_l, 1), clipped to [0, 2].
    """
    return _trust_in_teacher(r_c, r_l)


def weights_llm_to_crm(r_c: torch.Tensor, r_l: torch.Tensor) -> torch.Tensor:
    """w2 (LLM teaches CRM); in [0, 2]. The mirror of w1: w2(r_c, r_l) == w1(r_l, r_c).

    r_c > r_l: 1 + (r_c - r_l) / max(r_l, 1), else 1 - (r_l - r_c) / max(r_c, 1), clipped to [0, 2].
    """
    return _trust_in_teacher(r_l, r_c)
