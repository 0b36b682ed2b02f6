"""E4SRec training-step speed on real Beauty histories: plain per-sample vs prefix sharing vs all-prefix scoring,
and the all-prefix step on a bfloat16 backbone.

A step is forward + backward of the full cross-entropy over all items for a batch of (prefix -> next item)
samples, the E4SRec training samples of docs/method.md. The three float32 paths compute the same logits
(tests/test_e4srec.py); only their cost differs. `all_prefix_bf16` is the same step with llm.dtype=bfloat16 (float32
LoRA/W_in/W_out masters, float32 logits and cross-entropy; tests/test_e4srec_precision.py bounds the difference) and
the attention kernel of --bf16-attention; `all_prefix_eager` is float32 with that kernel, which separates the
kernel's share of the gain from the dtype's. --profile adds each all-prefix row's top operators (torch.profiler,
self CPU time of one step). Writes benchmarks/results/e4srec_speed.json.

    python benchmarks/e4srec_speed.py --data-dir ../shared/data --layers 30 --batch 16 --users 64 --profile
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


# row -> (model, attention kernel, share_prefix, all_prefix)
PATHS = {"plain": ("float32", "sdpa", False, False), "prefix_sharing": ("float32", "sdpa", True, False),
         "all_prefix": ("float32", "sdpa", True, True), "all_prefix_eager": ("float32", "eager", True, True),
         "all_prefix_bf16": ("bfloat16", None, True, True)}


def train_step(model, attention, share_prefix, all_prefix, h, rows, cols, y) -> None:
    if attention:
        model.decoder.set_attn_implementation(attention)
    model.cfg.share_prefix, model.cfg.all_prefix = share_prefix, all_prefix
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model.prefix_logits(h, rows, cols), y).backward()


def time_paths(models, inputs, targets, batch, steps):
    """Round-robin one step of each path at a time, so load from other processes hits all paths alike."""
    feeds = {name: batches(inputs, targets, batch, path[3]) for name, path in PATHS.items()}
    times = {name: [] for name in PATHS}
    counts = {name: [] for name in PATHS}
    for step in range(steps + 1):  # step 0 is a warm-up
        for name, (dtype, *path) in PATHS.items():
            h, rows, cols, y = next(feeds[name], (None,) * 4)
            if h is None:
                raise SystemExit("too few samples for the timed steps: raise --users")
            t0 = time.perf_counter()
            train_step(models[dtype], *path, h, rows, cols, y)
            if step > 0:
                times[name].append(time.perf_counter() - t0)
                counts[name].append(len(y))
    return {name: {"seconds_per_step": round(statistics.median(times[name]), 3),
                   "samples_per_step": round(statistics.mean(counts[name]), 2),
                   "samples_per_second": round(statistics.median(c / t for c, t in zip(counts[name], times[name])), 3),
                   "step_seconds": [round(t, 3) for t in times[name]]}
            for name in PATHS}


def profile_paths(models, inputs, targets, batch, top):
    """Top operators by self CPU time in one all-prefix step of each dtype/kernel (the first batch, warm)."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for name, (dtype, *path) in PATHS.items():
        if not path[2]:
            continue
        h, rows, cols, y = next(batches(inputs, targets, batch, True))
        train_step(models[dtype], *path, h, rows, cols, y)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            train_step(models[dtype], *path, h, rows, cols, y)
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events)
        out[name] = {"self_cpu_seconds": round(total / 1e6, 3),
                     "aten_calls": sum(e.count for e in events if e.key.startswith("aten::")),
                     "top": [{"op": e.key, "self_seconds": round(e.self_cpu_time_total / 1e6, 4),
                              "share": round(e.self_cpu_time_total / total, 3), "calls": e.count}
                             for e in events[:top]]}
    return out


def cpu_matrix_units() -> dict:
    """Model name and the bfloat16 instruction sets: bf16 GEMM runs about 2.5x float32 with AVX512_BF16 alone and
    an order of magnitude faster with AMX, so the ratio this benchmark reports depends on them."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    return {"cpu": model, "bf16_flags": sorted(f for f in flags if f in ("avx512_bf16", "amx_bf16", "amx_tile"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=None, help="folder holding Beauty/Beauty.txt")
    ap.add_argument("--layers", type=int, default=30, help="decoder layers kept (SmolLM2 has 30)")
    ap.add_argument("--batch", type=int, default=16, help="samples per step")
    ap.add_argument("--users", type=int, default=64, help="users drawn from Beauty (their samples feed the steps)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per path, after one warm-up step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bf16-attention", default="eager", choices=["eager", "sdpa"],
                    help="llm.attention of the bfloat16 row")
    ap.add_argument("--profile", action="store_true", help="record the all-prefix rows' top operators")
    ap.add_argument("--top", type=int, default=12, help="operators kept per profiled row")
    ap.add_argument("--out", default="e4srec_speed", help=RESULT_HELP)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    data = load_dataset("beauty", args.data_dir)
    split = leave_one_out(data)
    train = [s for s in split.train if len(s) >= 2]
    train = random.Random(args.seed).sample(train, min(args.users, len(train)))
    cfg = E4SRecConfig(backbone="smollm2", keep_layers=args.layers)
    half = E4SRecConfig(backbone="smollm2", keep_layers=args.layers, dtype="bfloat16", attention=args.bf16_attention)
    inputs, targets = all_positions(train, cfg.max_len)  # every prefix -> next item (<= 50 targets per user)

    table = torch.randn(data.n_items + 1, 64) * 0.1
    models = {}
    for c in (cfg, half):
        torch.manual_seed(args.seed)  # the same heads and LoRA start in both
        models[c.dtype] = E4SRec(c, table).train()
    model = models["float32"]
    rows = time_paths(models, inputs, targets, args.batch, args.steps)
    profiles = profile_paths(models, inputs, targets, args.batch, args.top) if args.profile else None
    base = rows["plain"]["samples_per_second"]
    result = header({"dataset": "beauty", "n_items": data.n_items, "users": len(train),
                     "samples": int((targets != 0).sum()), "transformers": transformers.__version__,
                     "backbone": cfg.backbone, "layers": args.layers, "dtype": cfg.dtype,
                     "bf16_row": {"dtype": half.dtype, "attention": half.attention}, "batch": args.batch,
                     "steps": args.steps, "max_len": cfg.max_len, "prompt_tokens": len(model.prompt_ids),
                     "response_tokens": len(model.response_ids), "lora_r": cfg.lora_r, "seed": args.seed,
                     "step": "forward + backward of full CE over all items (no optimizer step)",
                     "statistic": "median over timed steps (paths run round-robin, one step each in turn)",
                     "all_prefix_batch": "whole users until >= batch samples"})
    result["machine"].update(cpu_matrix_units(), omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "default"))
    result["rows"] = rows
    result["speedup_samples_per_second"] = {k: round(v["samples_per_second"] / base, 2) for k, v in rows.items()}
    result["bf16_over_float32_all_prefix"] = round(rows["all_prefix_bf16"]["samples_per_second"]
                                                   / rows["all_prefix"]["samples_per_second"], 2)
    if profiles:
        result["profile"] = profiles
    write_result(args.out, result)
    for name, row in rows.items():
        print(f"{name:17s} {row['seconds_per_step']:7.3f} s/step  {row['samples_per_second']:8.2f} samples/s  "
              f"x{result['speedup_samples_per_second'][name]}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
