"""Full-ranking evaluation: batched users, chunked items, pessimistic ties, exclude-seen recorded with every number.

A model is anything with `encode(histories) -> state` and `score_items(state, lo, hi) -> [B, hi - lo]`
scores for internal item ids lo..hi-1 (id 0 is padding and never ranked), plus an optional `max_len` and an optional
`trims_padding` (True: its cost follows the longest history in a batch, so users are batched by length).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch
from tqdm import tqdm

from .data.dataset import pad_left


class Scorer(Protocol):
    def encode(self, histories: torch.Tensor) -> Any: ...

    def score_items(self, state: Any, lo: int, hi: int) -> torch.Tensor: ...


def metrics_from_ranks(ranks: np.ndarray, ks: Sequence[int] = (5, 10, 20), prefix: str = "") -> dict[str, float]:
    """Rank is 0-based: 0 means the target alone scored highest."""
    ranks = np.asarray(ranks, dtype=np.float64)
    out: dict[str, float] = {}
    if ranks.size == 0:
        return {f"{prefix}{m}@{k}": 0.0 for k in ks for m in ("HR", "NDCG", "MRR")}
    for k in ks:
        hit = ranks < k
        out[f"{prefix}HR@{k}"] = float(hit.mean())
        out[f"{prefix}NDCG@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean())
        out[f"{prefix}MRR@{k}"] = float(np.where(hit, 1.0 / (ranks + 1.0), 0.0).mean())
    return out


def count_at_least(scores: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Per row, how many scores are >= the row's threshold [S, 1]: LongTensor [S]. Summing the comparison as
    uint8 into int32 is about twice as fast on CPU as counting a bool tensor (the hot loop of ranking)."""
    return (scores >= threshold).view(torch.uint8).sum(dim=1, dtype=torch.int32).long()


def _against(scores: torch.Tensor, threshold: torch.Tensor, finite: bool) -> torch.Tensor:
    """Which scores count against the target: at least as high, or non-finite (a NaN cannot be ordered, so it is
    taken as a loss for the target). `finite` says the block was checked finite: the cheap comparison suffices."""
    ge = scores >= threshold
    return ge if finite else ge | ~torch.isfinite(scores)


def _target_threshold(tscore: torch.Tensor) -> torch.Tensor:
    """A non-finite target score (NaN, +inf, -inf) ranks last: every rankable item counts against it."""
    return torch.where(torch.isfinite(tscore), tscore, torch.full_like(tscore, -math.inf))


def _diverged(n_bad: int, n: int, require_finite: str) -> FloatingPointError:
    return FloatingPointError(f"non-finite scores for {n_bad} of {n} users {require_finite}")


def _plan(n_items: int, memory_mb: int, n_users: int) -> tuple[int, int]:
    """Users per batch and items per chunk so that one score buffer stays within memory_mb."""
    budget = max(memory_mb, 1) * (1 << 20) // 4 // 3  # floats; the mask and comparison need room too
    n_cols = n_items + 1
    chunk = n_cols if 64 * n_cols <= budget else max(1, budget // 64)
    users = max(1, min(n_users, 1024, budget // chunk))
    return users, chunk


def _non_competitors(seen: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[B, S] distinct ids per row that never outrank the target: padding 0, the target, and `seen`
    (the history when excluding seen items, else an empty [B, 0]); repeats are replaced by -1."""
    ids = torch.cat([seen, targets[:, None], torch.zeros_like(targets)[:, None]], dim=1).sort(dim=1).values
    repeat = torch.zeros_like(ids, dtype=torch.bool)
    repeat[:, 1:] = ids[:, 1:] == ids[:, :-1]
    return ids.masked_fill(repeat, -1)


def plan_batches(model: Scorer, inputs: list[list[int]], n_items: int, memory_mb: int = 256,
                 max_len: int | None = None, users_per_batch: int | None = None,
                 items_per_chunk: int | None = None) -> tuple[list[np.ndarray], int]:
    """(user batches as index arrays, in scoring order; items per chunk) for `rank_batches`. Whoever scores a
    batch of this plan scores exactly the rows one process would, hence the same floating-point values."""
    n = len(inputs)
    ub, ic = _plan(n_items, memory_mb, n)
    ub = users_per_batch or ub
    ic = items_per_chunk or ic
    order = np.arange(n)
    if getattr(model, "trims_padding", False):  # its cost follows the longest history of a batch: batch by length
        order = np.argsort([min(len(h), max_len or len(h)) for h in inputs], kind="stable")
    return [order[start:start + ub] for start in range(0, n, ub)], ic


@torch.no_grad()
def rank_batches(model: Scorer, inputs: list[list[int]], targets: Sequence[int], n_items: int,
                 batches: list[np.ndarray], items_per_chunk: int, exclude_seen: bool = True,
                 max_len: int | None = None, device: torch.device | str = "cpu",
                 progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(ranks, bad) over all len(inputs) users, filled in for the users of `batches` only (0 elsewhere, so shards
    scored apart add up); bad is 1 for a user with a non-finite score among the rankable columns."""
    n, ic = len(inputs), items_per_chunk
    ranks = np.zeros(n, dtype=np.int64)
    bad = np.zeros(n, dtype=np.int64)
    targets = list(targets)
    # a bar on a terminal only (disable=None): a log file gets no carriage returns
    for users in tqdm(batches, desc="ranking users", unit="batch", leave=False, mininterval=2,
                      disable=None if progress else True):
        hist = [inputs[u] for u in users]
        tgt = torch.as_tensor([targets[u] for u in users], dtype=torch.long)
        state = model.encode(pad_left(hist, max_len).to(device))
        seen = pad_left(hist).to(device) if exclude_seen else torch.zeros(len(hist), 0, dtype=torch.long, device=device)
        skip = _non_competitors(seen, tgt.to(device))
        chunks = [(lo, min(lo + ic, n_items + 1)) for lo in range(0, n_items + 1, ic)]
        cached = None
        tscore = torch.empty(len(hist), dtype=torch.float32, device=device)
        tgt_dev = tgt.to(device)
        for lo, hi in chunks:
            s = model.score_items(state, lo, hi).float()
            if len(chunks) == 1:
                cached = s
            rows = ((tgt_dev >= lo) & (tgt_dev < hi)).nonzero(as_tuple=True)[0]
            tscore[rows] = s[rows, tgt_dev[rows] - lo]
        threshold = _target_threshold(tscore)[:, None]
        count = torch.zeros(len(hist), dtype=torch.long, device=device)
        nonfinite = torch.zeros(len(hist), dtype=torch.bool, device=device)
        for lo, hi in chunks:
            s = cached if cached is not None else model.score_items(state, lo, hi).float()
            finite = bool(torch.isfinite(s.sum()))  # one reduction; the per-element test only when it fails
            if not finite:  # the padding column is never ranked, whatever it holds
                nonfinite |= ~torch.isfinite(s[:, 1:] if lo == 0 else s).all(dim=1)
            # count every column against the target, then take back the non-competitors among them:
            # a handful per user, so no [B, items] mask is ever built
            count += _against(s, threshold, finite).view(torch.uint8).sum(dim=1, dtype=torch.int32).long()
            inside = (skip >= lo) & (skip < hi)
            taken = _against(torch.gather(s, 1, torch.where(inside, skip - lo, 0)), threshold, finite)
            count -= torch.count_nonzero(taken & inside, dim=1)
        ranks[users] = count.cpu().numpy()
        bad[users] = (nonfinite | ~torch.isfinite(tscore)).long().cpu().numpy()
    return ranks, bad


def check_finite(bad: np.ndarray, require_finite: str | None) -> None:
    """With require_finite (where the evaluation stands), any user flagged in `bad` raises FloatingPointError."""
    if require_finite is not None and bad.any():
        raise _diverged(int(bad.sum()), len(bad), require_finite)


def compute_ranks(model: Scorer, inputs: list[list[int]], targets: Sequence[int], n_items: int,
                  exclude_seen: bool = True, memory_mb: int = 256, max_len: int | None = None,
                  users_per_batch: int | None = None, items_per_chunk: int | None = None,
                  device: torch.device | str = "cpu", require_finite: str | None = None) -> np.ndarray:
    """0-based rank of each target: the other rankable items scoring at least as high (ties count against it).

    A constant scorer therefore gets no credit. Non-finite scores count against the target: a NaN item outranks
    it, and a non-finite target score ranks last, so a diverged model scores zero, never perfectly. A history
    item that is also the target (a repeat) stays rankable; the rest of the history is excluded when exclude_seen.
    require_finite: when given (the phase and epoch of a validation), any non-finite score raises
    FloatingPointError with that text instead.
    """
    if max_len is None:
        max_len = getattr(model, "max_len", None)
    batches, chunk = plan_batches(model, inputs, n_items, memory_mb, max_len, users_per_batch, items_per_chunk)
    ranks, bad = rank_batches(model, inputs, targets, n_items, batches, chunk, exclude_seen, max_len, device)
    check_finite(bad, require_finite)
    return ranks


def _sampled_negatives(rng: np.random.Generator, seen: set[int], n_items: int, n: int) -> list[int]:
    """n distinct items in 1..n_items outside `seen` (which grows by them), drawn by rejection; every unseen item,
    without drawing, when fewer than n are left (rejection sampling would never find the n-th)."""
    if n_items - sum(1 <= i <= n_items for i in seen) < n:
        return [i for i in range(1, n_items + 1) if i not in seen]
    negs: list[int] = []
    while len(negs) < n:
        cand = int(rng.integers(1, n_items + 1))
        if cand not in seen:
            negs.append(cand)
            seen.add(cand)
    return negs


@torch.no_grad()
def compute_sampled_ranks(model: Scorer, inputs: list[list[int]], targets: Sequence[int], n_items: int,
                          n_negatives: int = 100, seed: int = 0, max_len: int | None = None,
                          batch: int = 256, device: torch.device | str = "cpu",
                          require_finite: str | None = None) -> np.ndarray:
    """Legacy protocol: rank of the target among n seeded negatives the user has not seen (ties and non-finite
    scores count against it, as in `compute_ranks`); a user with fewer unseen items is ranked against all of them."""
    if max_len is None:
        max_len = getattr(model, "max_len", None)
    rng = np.random.default_rng(seed)
    ranks = np.empty(len(inputs), dtype=np.int64)
    n_bad = 0
    for start in range(0, len(inputs), batch):
        hist = inputs[start:start + batch]
        tgt = list(targets[start:start + batch])
        s = model.score_items(model.encode(pad_left(hist, max_len).to(device)), 0, n_items + 1).float().cpu()
        for r, (h, t) in enumerate(zip(hist, tgt)):
            negs = _sampled_negatives(rng, set(h) | {t}, n_items, n_negatives)
            row = s[r, [t, *negs]]
            n_bad += not bool(torch.isfinite(row).all())
            ranks[start + r] = int(_against(row[1:], _target_threshold(row[:1]), False).sum())
    if require_finite is not None and n_bad:
        raise _diverged(n_bad, len(inputs), require_finite)
    return ranks


def evaluate(model: Scorer, inputs: list[list[int]], targets: Sequence[int], n_items: int,
             ks: Sequence[int] = (5, 10, 20), exclude_seen: bool = True, mode: str = "full",
             n_negatives: int = 100, seed: int = 0, memory_mb: int = 256, max_len: int | None = None,
             device: torch.device | str = "cpu", require_finite: str | None = None,
             ranker: Callable[..., np.ndarray] = compute_ranks) -> dict[str, float]:
    """Averaged over all users given. Sampled-mode keys carry a 'sampled_' prefix so they are never mistaken.
    ranker: full ranking with `compute_ranks`'s signature (a sharded caller passes one that shares the users out)."""
    if mode == "full":
        ranks = ranker(model, inputs, targets, n_items, exclude_seen=exclude_seen,
                              memory_mb=memory_mb, max_len=max_len, device=device, require_finite=require_finite)
        return metrics_from_ranks(ranks, ks)
    if mode == "sampled":
        ranks = compute_sampled_ranks(model, inputs, targets, n_items, n_negatives=n_negatives, seed=seed,
                                      max_len=max_len, device=device, require_finite=require_finite)
        return metrics_from_ranks(ranks, ks, prefix="sampled_")
    raise ValueError(f"unknown evaluation mode '{mode}' (full or sampled)")


def metric_key(cfg, name: str = "NDCG@10") -> str:
    """The key of a metric under an EvalConfig's mode (sampled-mode keys carry the 'sampled_' prefix)."""
    return ("sampled_" if cfg.mode == "sampled" else "") + name


def metric_keys(cfg, metrics: Sequence[str] = ("HR", "NDCG"), ks: Sequence[int] | None = None) -> list[str]:
    """The table columns of an EvalConfig: each metric at each cutoff (`ks`, default the configured eval.ks),
    metric by metric, under the config's mode; one definition, so every table of a run shows the same columns."""
    return [metric_key(cfg, f"{m}@{k}") for m in metrics for k in (cfg.ks if ks is None else ks)]


def split_cases(split, which: str) -> tuple[list[list[int]], list[int]]:
    """(inputs, targets) of the split's 'valid' or 'test' cases."""
    if which == "valid":
        return split.valid_inputs, split.valid_targets
    return split.test_inputs, split.test_targets


def evaluate_split(model: Scorer, split, cfg, which: str = "test", device: torch.device | str = "cpu",
                   require_finite: str | None = None, ranker: Callable[..., np.ndarray] = compute_ranks
                   ) -> dict[str, float]:
    """Evaluate on the split's 'valid' or 'test' cases with an EvalConfig. Training passes `require_finite`
    (where it stands: phase and epoch) so that a diverged model stops the run instead of being ranked."""
    inputs, targets = split_cases(split, which)
    return evaluate(model, inputs, targets, split.n_items, ks=cfg.ks, exclude_seen=cfg.exclude_seen,
                    mode=cfg.mode, n_negatives=cfg.n_negatives, seed=cfg.seed, memory_mb=cfg.memory_mb,
                    device=device, require_finite=require_finite, ranker=ranker)
