"""Upward phase cost: one SASRec epoch plain, with the KL read from the teacher cache, and with the E4SRec
teacher run online for every batch (what the cache avoids). Also the one-off time to build the cache.

Example: python benchmarks/upward_cache_speed.py --crm-run runs/suite/llmd4rec_lastfm_cpu-sasrec \
             --llm-run runs/suite/llmd4rec_lastfm_cpu-e4srec
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULT_HELP, builds_on, header, write_result  # noqa: E402

from llmd4rec.config import config_to_dict, load_config  # noqa: E402
from llmd4rec.distill.teacher import build_cache, kd_hook, sample_index  # noqa: E402
from llmd4rec.distill.losses import kd_kl  # noqa: E402
from llmd4rec.distill.weights import target_ranks, weights_llm_to_crm  # noqa: E402
from llmd4rec.loading import load_crm, load_data, load_llm  # noqa: E402
from llmd4rec.training.crm import fit_crm  # noqa: E402
from llmd4rec.training.llm import sample_grid  # noqa: E402


def online_hook(teacher, inputs: torch.Tensor, index: torch.Tensor, cfg):
    """The same loss as kd_hook, but the frozen LLM computes the teacher logits for every batch, every epoch."""
    d = cfg.distill

    def kd(users, cols, logits, targets):
        covered = index[users, cols] >= 0
        u, c = users[covered], cols[covered]
        with torch.no_grad():  # the batch's users once each, all their prefixes in one pass: as the cache is built
            batch_users, rows = torch.unique(u, return_inverse=True)
            teacher_logits = teacher.prefix_logits(inputs[batch_users], rows, c)
            teacher_logits[:, 0] = float("-inf")
        kl = kd_kl(logits[covered], teacher_logits, d.t2, d.t_squared)
        w = weights_llm_to_crm(target_ranks(logits[covered].detach(), targets[covered]),
                               target_ranks(teacher_logits, targets[covered]))
        return d.beta * (w * kl).sum() / len(logits)

    return kd


def epoch_seconds(run_dir: Path, phase: str) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["epoch_seconds"] for r in rows if r.get("phase") == phase and "epoch_seconds" in r]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--crm-run", required=True)
    p.add_argument("--llm-run", required=True)
    p.add_argument("--skip-online", action="store_true", help="skip the (slow) online-teacher epoch")
    p.add_argument("--epochs", type=int, default=3, help="epochs timed for plain and cached (the median is reported)")
    p.add_argument("--out", default="upward_cache_speed", help=RESULT_HELP)
    args = p.parse_args()
    cfg = load_config(Path(args.llm_run) / "config.yaml", ["eval.memory_mb=256"])
    dataset, split = load_data(cfg)
    n = dataset.n_items
    teacher = load_llm(Path(args.llm_run), n, cfg)
    inputs, targets = sample_grid(split.train, cfg.crm.max_len, 0)
    index = sample_index(targets)
    work = Path(tempfile.mkdtemp(prefix="upward-speed-"))
    rows = {}
    try:
        t0 = time.perf_counter()
        cache = build_cache(work / "cache", teacher, "llm", inputs, targets, n, cfg.distill.t2,
                            cfg.distill.cache_topk, torch.device("cpu"), cfg.distill.cache_users_per_batch)
        rows["cache_build"] = {"seconds": time.perf_counter() - t0, "samples": len(cache), "mode": cache.mode}
        hooks = {"plain": None, "cached_teacher": kd_hook(cache, index, cfg.distill.beta, cfg.distill.t_squared,
                                                          True, "crm")}
        if not args.skip_online:
            hooks["online_teacher"] = online_hook(teacher, inputs, index, cfg)
        for name, kd in hooks.items():
            torch.manual_seed(0)
            crm = load_crm(Path(args.crm_run), n, cfg)
            epochs = 1 if name == "online_teacher" else args.epochs
            fit_crm(crm, split, cfg, work, phase=name, kd=kd,
                    train_cfg=dataclasses.replace(cfg.crm_train, epochs=epochs, patience=epochs))
            times = epoch_seconds(work, name)
            rows[name] = {"epoch_seconds": statistics.median(times), "all_epochs": times}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = header(config_to_dict(cfg), builds_on(args.crm_run, args.llm_run))
    out.update({"dataset": dataset.name, "crm_run": args.crm_run, "llm_run": args.llm_run, "rows": rows,
                "cached_over_plain": rows["cached_teacher"]["epoch_seconds"] / rows["plain"]["epoch_seconds"]})
    if "online_teacher" in rows:
        out["online_over_plain"] = rows["online_teacher"]["epoch_seconds"] / rows["plain"]["epoch_seconds"]
    print(json.dumps(rows, indent=1))
    write_result(args.out, out)


if __name__ == "__main__":
    main()
