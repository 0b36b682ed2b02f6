"""Choose the upward strategy on validation: one upward phase (teacher fixed, start kept out) per variant, from the
same trained SASRec and E4SRec; records each variant's best distilled epoch, valid and test, and the choice.
A variant whose teacher settings (teacher, T2, cache k, ensemble weight) an earlier variant already had copies that
variant's teacher cache instead of computing it again (`distill.cache_from`; `cache_from` in its row).

    python benchmarks/upward_sweep.py --config configs/llmd4rec/ml100k_cpu.yaml --name upward_sweep_ml100k \
        --crm-run RUN --llm-run RUN --variant "distill.upward_init=scratch distill.t2=1.0" \
        --variant "distill.upward_init=continue distill.upward_lr=0.0001 distill.t2=0.2" data.data_dir=../shared/data
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULT_HELP, builds_on, header, write_result  # noqa: E402

from llmd4rec.config import config_to_dict, load_config  # noqa: E402
from llmd4rec.recipes import distill  # noqa: E402

FIXED = ["distill.direction=upward", "distill.rounds=1", "distill.keep_start=false"]


def teacher_settings(cfg) -> tuple:
    d = cfg.distill
    return d.teacher, d.t2, d.cache_topk, d.ensemble_alpha if d.teacher == "ensemble" else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--name", required=True, help=RESULT_HELP)
    p.add_argument("--crm-run", required=True)
    p.add_argument("--llm-run", required=True)
    p.add_argument("--runs", default="runs/sweep")
    p.add_argument("--variant", action="append", required=True, help="space-separated overrides of one variant")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    base = args.overrides + [f"run_dir={args.runs}", f"crm_run={args.crm_run}", f"llm_run={args.llm_run}"] + FIXED
    out = header(config_to_dict(load_config(args.config, base)), builds_on(args.crm_run, args.llm_run))
    out.update({"rows": {}, "made_runs": []})
    seen: dict[tuple, Path] = {}  # teacher settings -> the first variant run that had them
    for i, variant in enumerate(args.variant):
        run_name = f"{args.name}-{i}"
        run_dir = Path(args.runs) / run_name
        cfg = load_config(args.config, base + variant.split() + [f"run_name={run_name}"])
        source = seen.setdefault(teacher_settings(cfg), run_dir)
        if source != run_dir:
            cfg = load_config(args.config, base + variant.split() + [f"run_name={run_name}",
                                                                     f"distill.cache_from={source}"])
        if not (run_dir / "results.json").exists():
            resume = str(run_dir) if (run_dir / "config.yaml").exists() else None
            distill.run(cfg, resume)
        results = json.loads((run_dir / "results.json").read_text())
        distilled = results["rows"]["LLMD4Rec_C (distilled, no fall-back)"]
        out["rows"][variant] = {"valid": distilled["valid"], "test": distilled["test"],
                                "best_epoch": distilled.get("best_epoch"), "seconds": results["seconds"],
                                "run_dir": str(run_dir), "cache_from": cfg.distill.cache_from}
        out["made_runs"].append(str(run_dir))
        out["start"] = results["rows"]["SASRec"]
        out["chosen_on_valid"] = max(out["rows"], key=lambda k: out["rows"][k]["valid"]["NDCG@10"])
        write_result(args.name, out)


if __name__ == "__main__":
    main()
