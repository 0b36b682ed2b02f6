"""Full-ranking evaluation speed: every Beauty test user against all items with a dense dot-product scorer.

Also checks that a tight memory budget (many item chunks) gives the same ranks as one chunk.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header  # noqa: E402

from llmd4rec.config import load_config  # noqa: E402
from llmd4rec.evaluation import compute_ranks, metrics_from_ranks  # noqa: E402
from llmd4rec.pretrained import load_data  # noqa: E402


class DotScorer:
    """Mean of the history's item vectors dotted with every item vector: a stand-in for any two-tower model."""

    max_len = 50

    def __init__(self, n_items: int, dim: int, seed: int):
        self.n_items = n_items
        self.items = torch.randn(n_items + 1, dim, generator=torch.Generator().manual_seed(seed))

    def encode(self, histories: torch.Tensor) -> torch.Tensor:
        mask = (histories > 0).float().unsqueeze(-1)
        return (self.items[histories] * mask).sum(1) / mask.sum(1).clamp(min=1)

    def score_items(self, state: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        return state @ self.items[lo:hi].T


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dataset", default="beauty")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--memory-mb", type=int, nargs="+", default=[256, 16])
    args = p.parse_args()
    torch.set_num_threads(2)
    cfg = load_config(None, [f"data.name={args.dataset}", f"data.data_dir={args.data_dir}"])
    _, split = load_data(cfg)
    model = DotScorer(split.n_items, args.dim, seed=0)
    rows, ranks = {}, {}
    for mb in args.memory_mb:
        before = peak_rss_mb()
        t0 = time.perf_counter()
        ranks[mb] = compute_ranks(model, split.test_inputs, split.test_targets, split.n_items, memory_mb=mb)
        rows[f"memory_mb={mb}"] = {"seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(),
                                   "peak_rss_growth_mb": peak_rss_mb() - before,
                                   "users_per_second": len(split.test_inputs) / (time.perf_counter() - t0),
                                   "test": metrics_from_ranks(ranks[mb], cfg.eval.ks)}
    first = ranks[args.memory_mb[0]]
    out = header({"dataset": args.dataset, "dim": args.dim, "memory_mb": args.memory_mb,
                  "exclude_seen": cfg.eval.exclude_seen})
    out["users"] = len(split.test_inputs)
    out["items"] = split.n_items
    out["rows"] = rows
    out["identical_ranks_across_budgets"] = all(np.array_equal(first, r) for r in ranks.values())
    path = Path(__file__).resolve().parent / "results" / f"eval_speed_{args.dataset}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
