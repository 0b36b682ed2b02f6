"""Run several SASRec configurations side by side (one process each) and tabulate validation/test metrics.

Selection is by validation NDCG@10; test numbers are reported for every row but never used to choose.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULT_HELP, header, write_result  # noqa: E402

GRID = {
    "d0.2": ["crm.dropout=0.2"],
    "d0.3": ["crm.dropout=0.3"],
    "d0.5": ["crm.dropout=0.5"],
    "d0.5_h2": ["crm.dropout=0.5", "crm.n_heads=2"],
    "d0.5_lr2e-3": ["crm.dropout=0.5", "crm_train.lr=0.002"],
    "d0.4_wd0.1": ["crm.dropout=0.4", "crm_train.weight_decay=0.1"],
    "d0.5_b256": ["crm.dropout=0.5", "crm_train.users_per_batch=256"],
    "d0.3_untied": ["crm.dropout=0.3", "crm.tie_weights=false"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="configs/sasrec/beauty.yaml")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--runs", default="runs/grid")
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--only", nargs="*", help="names from the grid")
    p.add_argument("--extra", nargs="*", default=[], help="overrides added to every row")
    p.add_argument("--out", default="sasrec_grid_beauty", help=RESULT_HELP)
    args = p.parse_args()
    names = args.only or list(GRID)

    def one(name: str) -> tuple[str, dict]:
        cmd = [sys.executable, "-m", "llmd4rec", "train-crm", "--config", args.config, *GRID[name], *args.extra,
               f"data.data_dir={args.data_dir}", f"run_dir={args.runs}", f"run_name={name}"]
        log = Path(args.runs) / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False)
        res = Path(args.runs) / name / "results.json"
        return name, json.loads(res.read_text()) if res.exists() else {"error": log.read_text()[-2000:]}

    with ThreadPoolExecutor(args.parallel) as pool:
        results = dict(pool.map(one, names))
    rows = {n: {k: r.get(k) for k in ("valid", "test", "best_epoch", "train_seconds", "error") if k in r}
            for n, r in results.items()}
    out = header({"base": args.config, "grid": {n: GRID[n] for n in names}, "extra": args.extra})
    out["rows"] = rows
    write_result(args.out, out)
    for n, r in rows.items():
        if "valid" in r:
            print(f"{n:>14}: valid NDCG@10 {r['valid']['NDCG@10']:.4f}  test NDCG@10 {r['test']['NDCG@10']:.4f} "
                  f"HR@10 {r['test']['HR@10']:.4f}  epoch {r['best_epoch']}  {r['train_seconds']:.0f}s")
        else:
            print(n, "failed:", r.get("error", "")[-500:])


if __name__ == "__main__":
    main()
