"""Full-ranking evaluation: batched users, chunked items, pessimistic ties, exclude-seen recorded with every number.

A model is anything with `encode(histories) -> state` and `score_items(state, lo, hi) -> [B, hi - lo]`
scores for internal item ids lo..hi-1 (id 0 is padding and never ranked), plus an optional `max_len` and an optional
`trims_padding` (True: its cost follows the longest history in a batch, so users are batched by length).
"""

from __future__ import annotations

import math
from typing import Any, Protocol, Sequence

import numpy as np
import torch

from . import distributed
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


@torch.no_grad()
def compute_ranks(model: Scorer, inputs: list[list[int]], targets: Sequence[int], n_items: int,
                  exclude_seen: bool = True, memory_mb: int = 256, max_len: int | None = None,
                  users_per_batch: int | None = None, items_per_chunk: int | None = None,
                  device: torch.device | str = "cpu") -> np.ndarray:
    """0-based rank of each target: the other rankable items scoring at least as high (ties count against it).

    A constant scorer therefore gets no credit, and a NaN target score ranks last. A history item that is
    also the target (a repeat) stays rankable; the rest of the history is excluded when exclude_seen.

    Under torch.distributed the user batches are dealt out to the ranks whole (batch b to rank b mod world) and the
    ranks summed back, so every rank returns the ranks one process would: each batch is scored with exactly the
    same rows, hence the same floating-point values.
    """
    if max_len is None:
        max_len = getattr(model, "max_len", None)
    n = len(inputs)
    ub, ic = _plan(n_items, memory_mb, n)
    ub = users_per_batch or ub
    ic = items_per_chunk or ic
    ranks = np.zeros(n, dtype=np.int64)
    world, me = distributed.world_size(), distributed.rank()
    order = np.arange(n)
    if getattr(model, "trims_padding", False):  # its cost follows the longest history of a batch: batch by length
        order = np.argsort([min(len(h), max_len or len(h)) for h in inputs], kind="stable")
    targets = list(targets)
    starts = list(range(me * ub, n, world * ub))
    rounds = math.ceil(math.ceil(n / ub) / world)
    if world > 1 and len(starts) < rounds:  # every rank runs the model equally often (a sharded model needs it);
        model.encode(pad_left([inputs[u] for u in order[:ub]], max_len).to(device))  # this extra result is unused
    for start in starts:
        users = order[start:start + ub]
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
        tscore = torch.nan_to_num(tscore, nan=-math.inf)
        count = torch.zeros(len(hist), dtype=torch.long, device=device)
        for lo, hi in chunks:
            s = cached if cached is not None else model.score_items(state, lo, hi).float()
            # count every column at least as high, then take back the non-competitors among them:
            # a handful per user, so no [B, items] mask is ever built
            count += count_at_least(s, tscore[:, None])
            inside = (skip >= lo) & (skip < hi)
            taken = torch.gather(s, 1, torch.where(inside, skip - lo, 0)) >= tscore[:, None]
            count -= torch.count_nonzero(taken & inside, dim=1)
        ranks[users] = count.cpu().numpy()
    if world > 1:
        ranks = distributed.all_sum(torch.from_numpy(ranks)).numpy()
    return ranks


@torch.no_grad()
def compute_sampled_ranks(model: Scorer, inputs: list[list[int]], targets: Sequence[int], n_items: int,
                          n_negatives: int = 100, seed: int = 0, max_len: int | None = None,
                          batch: int = 256, device: torch.device | str = "cpu") -> np.ndarray:
    """Legacy protocol: rank of the target among n seeded negatives the user has not seen (ties count against)."""
    if max_len is None:
        max_len = getattr(model, "max_len", None)
    rng = np.random.default_rng(seed)
    ranks = np.empty(len(inputs), dtype=np.int64)
    for start in range(0, len(inputs), batch):
        hist = inputs[start:start + batch]
        tgt = list(targets[start:start + batch])
        s = model.score_items(model.encode(pad_left(hist, max_len).to(device)), 0, n_items + 1).float().cpu()
        for r, (h, t) in enumerate(zip(hist, tgt)):
            seen = set(h) | {t}
            negs: list[int] = []
            while len(negs) < n_negatives:
                cand = int(rng.integers(1, n_items + 1))
                if cand not in seen:
                    negs.append(cand)
                    seen.add(cand)
                if len(seen) > n_items:
                    break
            ts = s[r, t]
            ts = -math.inf if torch.isnan(ts) else ts
            ranks[start + r] = int((s[r, negs] >= ts).sum())
    return ranks


def evaluate(model: Scorer, inputs: list[list[int]], targets: Sequence[int], n_items: int,
             ks: Sequence[int] = (5, 10, 20), exclude_seen: bool = True, mode: str = "full",
             n_negatives: int = 100, seed: int = 0, memory_mb: int = 256, max_len: int | None = None,
             device: torch.device | str = "cpu") -> dict[str, float]:
    """Averaged over all users given. Sampled-mode keys carry a 'sampled_' prefix so they are never mistaken."""
    if mode == "full":
        ranks = compute_ranks(model, inputs, targets, n_items, exclude_seen=exclude_seen,
                              memory_mb=memory_mb, max_len=max_len, device=device)
        return metrics_from_ranks(ranks, ks)
    if mode == "sampled":
        ranks = compute_sampled_ranks(model, inputs, targets, n_items, n_negatives=n_negatives, seed=seed,
                                      max_len=max_len, device=device)
        return metrics_from_ranks(ranks, ks, prefix="sampled_")
    raise ValueError(f"unknown evaluation mode '{mode}' (full or sampled)")


def evaluate_split(model: Scorer, split, cfg, which: str = "test", device: torch.device | str = "cpu") -> dict[str, float]:
    """Evaluate on the split's 'valid' or 'test' cases with an EvalConfig."""
    inputs = split.valid_inputs if which == "valid" else split.test_inputs
    targets = split.valid_targets if which == "valid" else split.test_targets
    return evaluate(model, inputs, targets, split.n_items, ks=cfg.ks, exclude_seen=cfg.exclude_seen,
                    mode=cfg.mode, n_negatives=cfg.n_negatives, seed=cfg.seed, memory_mb=cfg.memory_mb,
                    device=device)
