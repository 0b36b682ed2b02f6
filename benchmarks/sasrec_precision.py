"""SASRec trained twice, back to back, same seed: item-score matmuls in float32, then in bfloat16
(`crm_train.precision`). Records seconds per epoch, training seconds to the best validation epoch and the metrics.

Example: python benchmarks/sasrec_precision.py --config configs/sasrec/beauty.yaml --name sasrec_beauty_bf16 \
             data.data_dir=../shared/data
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, recipe_args, write_result  # noqa: E402

from llmd4rec.config import config_to_dict, load_config  # noqa: E402
from llmd4rec.runs import read_metrics  # noqa: E402
from llmd4rec.recipes import train_crm  # noqa: E402


def one_run(args, precision: str, stamp: str) -> tuple[dict, dict]:
    cfg = load_config(args.config, args.overrides + [f"crm_train.precision={precision}",
                                                     f"run_name={args.name}-{precision}-{stamp}"])
    t0 = time.perf_counter()
    run_dir = train_crm.run(cfg)
    wall = time.perf_counter() - t0
    results = json.loads((run_dir / "results.json").read_text())
    records = [r for r in read_metrics(run_dir) if r.get("phase") == "crm"]
    seconds = [r["epoch_seconds"] for r in records]
    best = results["best_epoch"]
    return config_to_dict(cfg), {
        "run_dir": str(run_dir), "metrics": {"valid": results["valid"], "test": results["test"]},
        "best_epoch": best, "epochs_run": len(records), "seconds_per_epoch": statistics.median(seconds),
        "train_seconds_to_best": sum(seconds[:best]), "train_seconds": sum(seconds), "wall_seconds": wall,
        "valid_ndcg10_per_epoch": [r["valid"]["NDCG@10"] for r in records if "valid" in r]}


def main() -> None:
    args = recipe_args(__doc__)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows, config = {}, None
    for precision in ("float32", "bfloat16"):
        config, rows[precision] = one_run(args, precision, stamp)
    out = header(config)
    out["threads"] = torch.get_num_threads()
    out["rows"] = rows
    out["epoch_ratio"] = rows["bfloat16"]["seconds_per_epoch"] / rows["float32"]["seconds_per_epoch"]
    write_result(args.name, out)


if __name__ == "__main__":
    main()
