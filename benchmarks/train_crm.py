"""Train SASRec with a config through the CLI recipe and record accuracy and time on this machine.

Example: python benchmarks/train_crm.py --config configs/sasrec/beauty.yaml --name sasrec_beauty \
             data.data_dir=../shared/data

With --seeds N (the seed noise a claimed gain must beat) the config trains under N seeds: `metrics` holds the
means with their sample standard deviations under `std`, `rows.seed_K` each run; the first run is the configured
seed, the others seed=K crm_train.seed=K.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, mean_std, recipe_args, write_result  # noqa: E402

from llmd4rec.config import config_to_dict, load_config  # noqa: E402
from llmd4rec.runs import read_metrics  # noqa: E402
from llmd4rec.recipes import train_crm  # noqa: E402


def train(args, seed: int | None) -> tuple[dict, dict]:
    """One run of the recipe (a new folder, or the --resume'd one for the configured seed): config and figures."""
    extra = [] if seed is None else [f"seed={seed}", f"crm_train.seed={seed}"]
    name = args.name if seed is None else f"{args.name}-seed{seed}"
    run_name = f"run_name={name}-{time.strftime('%Y%m%d-%H%M%S')}"  # a new folder for every new run
    resume = args.resume if seed is None else None
    cfg = load_config(args.config, args.overrides + extra + [run_name] * (resume is None))
    run_dir = train_crm.run(cfg, resume)
    results = json.loads((run_dir / "results.json").read_text())
    epoch_seconds = [r["epoch_seconds"] for r in read_metrics(run_dir) if r.get("phase") == "crm"]
    return config_to_dict(cfg), {
        "run_dir": str(run_dir),
        "metrics": {"valid": results["valid"], "test": results["test"]},
        "best_epoch": results["best_epoch"],
        "epochs_run": len(epoch_seconds),
        "seconds_per_epoch": statistics.median(epoch_seconds),
        "train_seconds": sum(epoch_seconds),
        "total_seconds": results["train_seconds"],
    }


def main() -> None:
    args = recipe_args(__doc__, seeds=True)
    config, first = train(args, None)
    out = header(config)
    out.update({"eval": {"mode": config["eval"]["mode"], "exclude_seen": config["eval"]["exclude_seen"],
                         "users": "all"}, **first})
    if args.seeds > 1:
        rows = {"seed_0": first} | {f"seed_{k}": train(args, k)[1] for k in range(1, args.seeds)}
        spread = mean_std([r["metrics"] for r in rows.values()])
        out.update({"metrics": {"valid": spread["valid"], "test": spread["test"]}, "std": spread["std"],
                    "seeds": spread["seeds"], "rows": rows, "made_runs": [r["run_dir"] for r in rows.values()],
                    "total_seconds": sum(r["total_seconds"] for r in rows.values())})
    write_result(args.name, out)


if __name__ == "__main__":
    main()
