"""Train E4SRec from a SASRec run through the CLI recipe; record its metrics next to that SASRec's, and time.

Example: python benchmarks/train_llm.py --config configs/e4srec/beauty_cpu.yaml --name e4srec_beauty_cpu \
             crm_run=runs/all/sasrec_beauty/RUN data.data_dir=../shared/data
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import builds_on, header, recipe_args, write_result  # noqa: E402

from llmd4rec.config import config_to_dict, load_config  # noqa: E402
from llmd4rec.evaluation import evaluate_split  # noqa: E402
from llmd4rec.loading import load_crm, load_data  # noqa: E402
from llmd4rec.runs import read_metrics  # noqa: E402
from llmd4rec.recipes import train_llm  # noqa: E402


def main() -> None:
    args = recipe_args(__doc__)
    run_name = f"run_name={args.name}-{time.strftime('%Y%m%d-%H%M%S')}"  # a new folder for every new run
    cfg = load_config(args.config, args.overrides + [run_name] * (args.resume is None))
    run_dir = train_llm.run(cfg, args.resume)
    results = json.loads((run_dir / "results.json").read_text())
    dataset, split = load_data(cfg)
    crm_model = load_crm(Path(cfg.crm_run), dataset.n_items, cfg)
    crm_metrics = {w: evaluate_split(crm_model, split, cfg.eval, w) for w in ("valid", "test")}
    records = [r for r in read_metrics(run_dir) if r.get("phase") == "llm" and "loss" in r]
    out = header(config_to_dict(cfg), builds_on(cfg.crm_run))
    out.update({
        "run_dir": str(run_dir),
        "preset": f"{cfg.llm.backbone}, keep_layers={cfg.llm.keep_layers}, "
                  f"max_targets_per_user={cfg.llm_train.max_targets_per_user}, epochs={cfg.llm_train.epochs}",
        "eval": {"mode": cfg.eval.mode, "exclude_seen": cfg.eval.exclude_seen, "users": "all"},
        "metrics": {"valid": results["valid"], "test": results["test"]},
        "rows": {"SASRec (initialisation)": crm_metrics, "E4SRec": {"valid": results["valid"],
                                                                    "test": results["test"]}},
        "best_epoch": results["best_epoch"],
        "samples_per_epoch": records[-1]["samples"] if records else None,
        "seconds_per_epoch": sum(r["epoch_seconds"] for r in records) / max(len(records), 1),
        "total_seconds": results["train_seconds"],
    })
    write_result(args.name, out)


if __name__ == "__main__":
    main()
