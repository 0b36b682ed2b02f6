"""Where a model's accuracy comes from: metrics of users whose target is a popular (head) or a rare (tail) item, and
how often one model ranks the target better than another (what an upward phase can hand over)."""

from __future__ import annotations

import numpy as np

from .evaluation import compute_ranks, metrics_from_ranks, split_cases


def split_ranks(model, split, cfg, which: str = "test", device="cpu") -> np.ndarray:
    """Per-user 0-based target ranks under the same protocol as evaluate_split (full ranking)."""
    inputs, targets = split_cases(split, which)
    return compute_ranks(model, inputs, targets, split.n_items, exclude_seen=cfg.exclude_seen,
                         memory_mb=cfg.memory_mb, device=device)


def head_items(train: list[list[int]], n_items: int, share: float = 0.2) -> np.ndarray:
    """Boolean [n_items + 1]: the `share` most interacted-with items of the training histories (ties by id)."""
    counts = np.bincount(np.concatenate([np.asarray(s, dtype=np.int64) for s in train if s] or [np.zeros(0, int)]),
                         minlength=n_items + 1)
    counts[0] = -1
    order = np.argsort(-counts, kind="stable")
    head = np.zeros(n_items + 1, dtype=bool)
    head[order[:int(round(share * n_items))]] = True
    head[0] = False
    return head


def head_tail_metrics(ranks: np.ndarray, targets, head: np.ndarray, ks=(5, 10, 20)) -> dict:
    """Metrics over the users whose target is a head item, and over the rest; with each group's size."""
    is_head = head[np.asarray(targets, dtype=np.int64)]
    return {"head": {**metrics_from_ranks(ranks[is_head], ks), "users": int(is_head.sum())},
            "tail": {**metrics_from_ranks(ranks[~is_head], ks), "users": int((~is_head).sum())}}


def better_share(ranks_a: np.ndarray, ranks_b: np.ndarray) -> dict[str, float]:
    """Share of users for whom model a ranks the target strictly better (lower rank) than b, equally, or worse."""
    n = max(len(ranks_a), 1)
    return {"better": float((ranks_a < ranks_b).sum() / n), "equal": float((ranks_a == ranks_b).sum() / n),
            "worse": float((ranks_a > ranks_b).sum() / n)}
