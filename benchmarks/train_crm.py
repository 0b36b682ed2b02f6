"""Train SASRec with a config through the CLI recipe and record accuracy and time on this machine.

Example: python benchmarks/train_crm.py --config configs/sasrec/beauty.yaml --name sasrec_beauty \
             data.data_dir=../shared/data
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, recipe_args, write_result  # noqa: E402

from llmd4rec.config import config_to_dict, load_config  # noqa: E402
from llmd4rec.runs import read_metrics  # noqa: E402
from llmd4rec.recipes import train_crm  # noqa: E402


def main() -> None:
    args = recipe_args(__doc__)
    run_name = f"run_name={args.name}-{time.strftime('%Y%m%d-%H%M%S')}"  # a new folder for every new run
    cfg = load_config(args.config, args.overrides + [run_name] * (args.resume is None))
    run_dir = train_crm.run(cfg, args.resume)
    results = json.loads((run_dir / "results.json").read_text())
    records = [r for r in read_metrics(run_dir) if r.get("phase") == "crm"]
    epoch_seconds = [r["epoch_seconds"] for r in records]
    out = header(config_to_dict(cfg))
    out.update({
        "run_dir": str(run_dir),
        "eval": {"mode": cfg.eval.mode, "exclude_seen": cfg.eval.exclude_seen, "users": "all"},
        "metrics": {"valid": results["valid"], "test": results["test"]},
        "best_epoch": results["best_epoch"],
        "epochs_run": len(records),
        "seconds_per_epoch": statistics.median(epoch_seconds),
        "train_seconds": sum(epoch_seconds),
        "total_seconds": results["train_seconds"],
    })
    write_result(args.name, out)


if __name__ == "__main__":
    main()
