"""What `auto` precision resolves to on this machine, and why: the bfloat16 and float32 matmul rates and a SASRec
training step (forward, full-softmax CE, backward) in both `crm_train.precision` settings, timed round-robin.

Example: python benchmarks/precision_probe.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULT_HELP, header, write_result  # noqa: E402

from llmd4rec import precision  # noqa: E402
from llmd4rec.config import config_to_dict, load_config  # noqa: E402
from llmd4rec.data.dataset import all_positions, padding_start  # noqa: E402
from llmd4rec.loading import load_data  # noqa: E402
from llmd4rec.models.sasrec import SASRec  # noqa: E402
from llmd4rec.training.crm import rec_loss  # noqa: E402

PRECISIONS = ("float32", "bfloat16")


def matmul_gflops(m: int, k: int, n: int, repeats: int) -> dict:
    a = {p: torch.randn(m, k).to(getattr(torch, p)) for p in PRECISIONS}
    b = {p: torch.randn(k, n).to(getattr(torch, p)) for p in PRECISIONS}
    times: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    for i in range(repeats + 1):
        for p in PRECISIONS:
            t = time.perf_counter()
            a[p] @ b[p]
            if i:  # the first round warms up
                times[p].append(time.perf_counter() - t)
    return {p: round(2 * m * k * n / statistics.median(ts) / 1e9, 2) for p, ts in times.items()}


def sasrec_steps(cfg, steps: int) -> dict:
    dataset, split = load_data(cfg)
    torch.manual_seed(cfg.seed)
    model = SASRec(dataset.n_items, cfg.crm)
    inputs, targets = all_positions(split.train, model.max_len)
    gen = torch.Generator().manual_seed(cfg.seed)
    times: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    for i in range(steps + 1):
        rows = torch.randperm(len(inputs), generator=gen)[:cfg.crm_train.users_per_batch]
        x, y = inputs[rows], targets[rows]
        start = padding_start(x)
        x, y = x[:, start:], y[:, start:]
        for p in PRECISIONS:
            tc = replace(cfg.crm_train, precision=p)
            t = time.perf_counter()
            loss, _ = rec_loss(model, model.hidden(x)[y > 0], y[y > 0], tc, gen)
            loss.backward()
            model.zero_grad()
            if i:
                times[p].append(time.perf_counter() - t)
    batches = -(-len(inputs) // cfg.crm_train.users_per_batch)
    return {p: {"seconds_per_step": round(statistics.median(ts), 4), "step_seconds": [round(t, 4) for t in ts],
                "epoch_seconds_estimate": round(statistics.median(ts) * batches, 1)} for p, ts in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/sasrec/beauty.yaml")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--out", help=RESULT_HELP)
    args = p.parse_args()
    cfg = load_config(args.config, [f"data.data_dir={args.data_dir}"])
    out = header(config_to_dict(cfg))
    units = {"amx_tile": bool(torch.cpu._is_amx_tile_supported()),
             "avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()),
             "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    out["machine"]["bf16_units"] = units
    out["auto_resolves_to"] = precision.resolve("auto", "cpu")
    n = cfg.crm_train.users_per_batch
    step = sasrec_steps(cfg, args.steps)
    out["rows"] = {
        "matmul_4096x576x1536": {"gflops": matmul_gflops(4096, 576, 1536, 5)},
        "sasrec_step": {"users_per_batch": n, **step},
    }
    out["bf16_over_float32_step_time"] = round(step["bfloat16"]["seconds_per_step"]
                                               / step["float32"]["seconds_per_step"], 3)
    write_result(args.out or "precision_probe", out)
    print(out["auto_resolves_to"], out["rows"]["matmul_4096x576x1536"], out["bf16_over_float32_step_time"])


if __name__ == "__main__":
    main()
