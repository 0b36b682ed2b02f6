"""MostPop on a dataset: full-ranking metrics over all users, the floor every model must clear."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULT_HELP, header, write_result  # noqa: E402

from llmd4rec.config import config_to_dict, load_config  # noqa: E402
from llmd4rec.evaluation import evaluate_split  # noqa: E402
from llmd4rec.models.popularity import MostPop  # noqa: E402
from llmd4rec.loading import load_data  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dataset", default="beauty")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--out", help=RESULT_HELP)
    args = p.parse_args()
    cfg = load_config(None, [f"data.name={args.dataset}", f"data.data_dir={args.data_dir}"])
    _, split = load_data(cfg)
    model = MostPop(split.train, split.n_items)
    out = header(config_to_dict(cfg))
    out["eval"] = {"mode": cfg.eval.mode, "exclude_seen": cfg.eval.exclude_seen, "users": len(split.test_targets)}
    out["metrics"] = {w: evaluate_split(model, split, cfg.eval, w) for w in ("valid", "test")}
    write_result(args.out or f"mostpop_{args.dataset}", out)
    print(json.dumps(out["metrics"]["test"], indent=1))


if __name__ == "__main__":
    main()
