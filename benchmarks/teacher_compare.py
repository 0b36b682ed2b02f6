"""What a teacher knows that SASRec does not: SASRec, SASRec with a text-initialised item table, the paper's
ID-only E4SRec and E4SRec with text-grounded item tokens, on one dataset, backbone and training budget.

Each row has valid and test metrics, its training seconds, test metrics on head / tail targets (top 20% of items by
training interactions / the rest) and, for every row but SASRec, the share of test users whose target it ranks
better than SASRec does: what an upward phase can hand over. Both E4SRec rows start from the same SASRec run's item
table; the E4SRec config (--config) sets the backbone, its depth and the budget, and `llm.item_text` is set here.
The rows named A+B rank the product of experts of two trained rows (distill.ensemble_alpha, the upward phase's
`distill.teacher=ensemble`): a teacher that validates no better than its CRM alone has little to hand over.

Example: python benchmarks/teacher_compare.py --config configs/e4srec/ml100k_text_cpu.yaml --name e4srec_text_ml100k_cpu \
             --runs runs/teacher data.data_dir=../shared/data
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import builds_on, header, write_result  # noqa: E402

from llmd4rec.analysis import better_share, head_items, head_tail_metrics, split_ranks  # noqa: E402
from llmd4rec.config import config_to_dict, load_config  # noqa: E402
from llmd4rec.distill.teacher import LogProbEnsemble  # noqa: E402
from llmd4rec.evaluation import metrics_from_ranks  # noqa: E402
from llmd4rec.loading import load_run  # noqa: E402
from llmd4rec.recipes import train_crm, train_llm  # noqa: E402

ROWS = {  # row -> (recipe, overrides)
    "SASRec": (train_crm, []),
    "SASRec_text_init": (train_crm, ["crm.text_init=true"]),
    "E4SRec": (train_llm, ["llm.item_text=false"]),
    "E4SRec_text": (train_llm, ["llm.item_text=true"]),
}
ENSEMBLES = (("SASRec", "E4SRec"), ("SASRec", "E4SRec_text"), ("SASRec_text_init", "E4SRec_text"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="an E4SRec config (its crm section is SASRec's)")
    p.add_argument("--name", required=True, help="result file benchmarks/results/NAME.json")
    p.add_argument("--runs", default="runs/teacher")
    p.add_argument("--crm-run", help="reuse a trained SASRec run for the SASRec row and the E4SRec item tables")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()

    def cfg(*extra: str):
        return load_config(args.config, args.overrides + [f"run_dir={args.runs}", *extra])

    runs: dict[str, Path] = {}

    def train(row: str, *extra: str) -> Path:
        """The row's run folder: read back when finished, resumed when stopped, else trained."""
        recipe, overrides = ROWS[row]
        run_dir = Path(args.runs) / f"{args.name}-{row}"
        if not (run_dir / "results.json").exists():
            resume = str(run_dir) if (run_dir / "config.yaml").exists() else None
            recipe.run(cfg(f"run_name={run_dir.name}", *overrides, *extra), resume)
        return run_dir

    runs["SASRec"] = Path(args.crm_run) if args.crm_run else train("SASRec")
    runs["SASRec_text_init"] = train("SASRec_text_init")
    for row in ("E4SRec", "E4SRec_text"):
        runs[row] = train(row, f"crm_run={runs['SASRec']}")

    base = cfg()
    out = header(config_to_dict(base), builds_on(args.crm_run))
    out.update({"backbone": base.llm.backbone, "keep_layers": base.llm.keep_layers,
                "runs": {k: str(v) for k, v in runs.items()},
                "made_runs": [str(v) for k, v in runs.items() if not (k == "SASRec" and args.crm_run)],
                "rows": {}})
    loaded = {row: load_run(run_dir) for row, run_dir in runs.items()}
    split = loaded["SASRec"].split
    head = head_items(split.train, split.n_items)
    ranks = {row: split_ranks(run.model, split, base.eval) for row, run in loaded.items()}
    for row, run_dir in runs.items():
        results = json.loads((run_dir / "results.json").read_text())
        out["rows"][row] = {"valid": results["valid"], "test": results["test"],
                            "best_epoch": results.get("best_epoch"), "train_seconds": results["train_seconds"],
                            **head_tail_metrics(ranks[row], split.test_targets, head)}
        if row != "SASRec":
            out["rows"][row]["vs_SASRec"] = better_share(ranks[row], ranks["SASRec"])
    for crm_row, llm_row in ENSEMBLES:
        mix = LogProbEnsemble(loaded[crm_row].model, loaded[llm_row].model, base.distill.ensemble_alpha).eval()
        valid = metrics_from_ranks(split_ranks(mix, split, base.eval, "valid"), base.eval.ks)
        ranks[name := f"{crm_row}+{llm_row}"] = split_ranks(mix, split, base.eval)
        out["rows"][name] = {"valid": valid, "test": metrics_from_ranks(ranks[name], base.eval.ks),
                             **head_tail_metrics(ranks[name], split.test_targets, head),
                             "vs_SASRec": better_share(ranks[name], ranks["SASRec"])}
    out["ensemble_alpha"] = base.distill.ensemble_alpha
    out["head_share_of_items"] = 0.2
    out["metrics"] = {w: out["rows"]["E4SRec_text"][w] for w in ("valid", "test")}
    write_result(args.name, out)


if __name__ == "__main__":
    main()
