"""E4SRec training-step speed on real Beauty histories: plain per-sample vs prefix sharing vs all-prefix scoring.

A step is forward + backward of the full cross-entropy over all items for a batch of (prefix -> next item)
samples, the E4SRec training samples of docs/method.md. The three paths compute the same logits (tests/test_e4srec.py);
only their cost differs. Writes benchmarks/results/e4srec_speed.json.

    python benchmarks/e4srec_speed.py --data-dir ../shared/data --layers 30 --batch 16 --users 64
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
import transformers

from llmd4rec.config import E4SRecConfig
from llmd4rec.data.dataset import all_positions, leave_one_out
from llmd4rec.data.registry import load_dataset
from llmd4rec.models.e4srec import E4SRec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULT_HELP, header, write_result  # noqa: E402


def batches(inputs, targets, batch, all_prefix):
    """(user rows, their histories, sample rows, sample cols, targets) per step.

    Per-sample paths take `batch` samples; the all-prefix path takes whole users until it has `batch` samples.
    """
    samples = (targets != 0).nonzero().tolist()
    if not all_prefix:
        for i in range(0, len(samples), batch):
            rows, cols = torch.tensor(samples[i:i + batch]).T
            yield inputs, rows, cols, targets[rows, cols]
        return
    users, count = [], 0
    for u in range(inputs.shape[0]):
        users.append(u)
        count += int((targets[u] != 0).sum())
        if count >= batch or u == inputs.shape[0] - 1:
            h, t = inputs[users], targets[users]
            rows, cols = (t != 0).nonzero(as_tuple=True)
            yield h, rows, cols, t[rows, cols]
            users, count = [], 0


PATHS = {"plain": (False, False), "prefix_sharing": (True, False), "all_prefix": (True, True)}


def time_paths(model, inputs, targets, batch, steps):
    """Round-robin one step of each path at a time, so load from other processes hits all paths alike."""
    feeds = {name: batches(inputs, targets, batch, all_prefix) for name, (_, all_prefix) in PATHS.items()}
    times = {name: [] for name in PATHS}
    counts = {name: [] for name in PATHS}
    for step in range(steps + 1):  # step 0 is a warm-up
        for name, (share_prefix, all_prefix) in PATHS.items():
            h, rows, cols, y = next(feeds[name], (None,) * 4)
            if h is None:
                raise SystemExit("too few samples for the timed steps: raise --users")
            model.cfg.share_prefix, model.cfg.all_prefix = share_prefix, all_prefix
            t0 = time.perf_counter()
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model.prefix_logits(h, rows, cols), y).backward()
            if step > 0:
                times[name].append(time.perf_counter() - t0)
                counts[name].append(len(y))
    return {name: {"seconds_per_step": round(statistics.median(times[name]), 3),
                   "samples_per_step": round(statistics.mean(counts[name]), 2),
                   "samples_per_second": round(statistics.median(c / t for c, t in zip(counts[name], times[name])), 3),
                   "step_seconds": [round(t, 3) for t in times[name]]}
            for name in PATHS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=None, help="folder holding Beauty/Beauty.txt")
    ap.add_argument("--layers", type=int, default=30, help="decoder layers kept (SmolLM2 has 30)")
    ap.add_argument("--batch", type=int, default=16, help="samples per step")
    ap.add_argument("--users", type=int, default=64, help="users drawn from Beauty (their samples feed the steps)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per path, after one warm-up step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="e4srec_speed", help=RESULT_HELP)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    data = load_dataset("beauty", args.data_dir)
    split = leave_one_out(data)
    train = [s for s in split.train if len(s) >= 2]
    train = random.Random(args.seed).sample(train, min(args.users, len(train)))
    cfg = E4SRecConfig(backbone="smollm2", keep_layers=args.layers)
    inputs, targets = all_positions(train, cfg.max_len)  # every prefix -> next item (<= 50 targets per user)

    model = E4SRec(cfg, torch.randn(data.n_items + 1, 64) * 0.1).train()
    rows = time_paths(model, inputs, targets, args.batch, args.steps)
    base = rows["plain"]["samples_per_second"]
    result = header({"dataset": "beauty", "n_items": data.n_items, "users": len(train),
                     "samples": int((targets != 0).sum()), "transformers": transformers.__version__,
                     "backbone": cfg.backbone, "layers": args.layers, "dtype": cfg.dtype, "batch": args.batch,
                     "steps": args.steps, "max_len": cfg.max_len, "prompt_tokens": len(model.prompt_ids),
                     "response_tokens": len(model.response_ids), "lora_r": cfg.lora_r, "seed": args.seed,
                     "step": "forward + backward of full CE over all items (no optimizer step)",
                     "statistic": "median over timed steps (paths run round-robin, one step each in turn)",
                     "all_prefix_batch": "whole users until >= batch samples"})
    result["rows"] = rows
    result["speedup_samples_per_second"] = {k: round(v["samples_per_second"] / base, 2) for k, v in rows.items()}
    for name, row in rows.items():
        print(f"{name:15s} {row['seconds_per_step']:7.3f} s/step  {row['samples_per_second']:8.2f} samples/s  "
              f"x{result['speedup_samples_per_second'][name]}")
    write_result(args.out, result)


if __name__ == "__main__":
    main()
