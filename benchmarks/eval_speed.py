"""Full-ranking evaluation speed: every Beauty test user against all items with a dense dot-product scorer.

Also checks that a tight memory budget (many item chunks) gives the same ranks as one chunk. Each budget runs in
a fresh process, so the peak memory reported for a row is that row's own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, write_result  # noqa: E402

from llmd4rec.config import load_config  # noqa: E402
from llmd4rec.evaluation import compute_ranks, metrics_from_ranks  # noqa: E402
from llmd4rec.loading import load_data  # noqa: E402


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


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def one_row(args: argparse.Namespace, memory_mb: int, ranks_file: str) -> dict:
    """One budget, alone in this (fresh) process: its peak RSS is this row's, not an earlier row's."""
    cfg = load_config(None, [f"data.name={args.dataset}", f"data.data_dir={args.data_dir}"])
    _, split = load_data(cfg)
    model = DotScorer(split.n_items, args.dim, seed=0)
    before = rss_mb()
    t0 = time.perf_counter()
    ranks = compute_ranks(model, split.test_inputs, split.test_targets, split.n_items, memory_mb=memory_mb)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    np.save(ranks_file, ranks)
    return {"seconds": seconds, "users_per_second": len(split.test_inputs) / seconds,
            "peak_rss_mb": peak, "peak_above_start_mb": peak - before,
            "test": metrics_from_ranks(ranks, cfg.eval.ks)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dataset", default="beauty")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--memory-mb", type=int, nargs="+", default=[256, 16])
    p.add_argument("--one", nargs=2, metavar=("MEMORY_MB", "RANKS_FILE"), help=argparse.SUPPRESS)  # a child
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(one_row(args, int(args.one[0]), args.one[1])))
        return
    cfg = load_config(None, [f"data.name={args.dataset}", f"data.data_dir={args.data_dir}"])
    _, split = load_data(cfg)
    rows, ranks = {}, {}
    with tempfile.TemporaryDirectory(prefix="eval-speed-") as tmp:
        for mb in args.memory_mb:
            ranks_file = str(Path(tmp) / f"ranks_{mb}.npy")
            cmd = [sys.executable, __file__, "--dataset", args.dataset, "--data-dir", args.data_dir,
                   "--dim", str(args.dim), "--threads", str(args.threads), "--one", str(mb), ranks_file]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows[f"memory_mb={mb}"] = json.loads(done.stdout.strip().splitlines()[-1])
            ranks[mb] = np.load(ranks_file)
    first = ranks[args.memory_mb[0]]
    out = header({"dataset": args.dataset, "dim": args.dim, "memory_mb": args.memory_mb, "threads": args.threads,
                  "exclude_seen": cfg.eval.exclude_seen,
                  "peak_memory": "each row in a fresh process: its ru_maxrss (peak_rss_mb, data loading included) "
                                 "and that peak above the RSS just before ranking (peak_above_start_mb)"})
    out["users"] = len(split.test_inputs)
    out["items"] = split.n_items
    out["rows"] = rows
    out["identical_ranks_across_budgets"] = all(np.array_equal(first, r) for r in ranks.values())
    print(json.dumps(rows, indent=1))
    write_result(f"eval_speed_{args.dataset}", out)


if __name__ == "__main__":
    main()
