"""LLMD4Rec and its ablations on one dataset: baselines trained once, then one distillation run per row.

Rows: SASRec, E4SRec (the baselines), LLMD4Rec_C / LLMD4Rec_L (full method), and the ablations of the paper
(each reporting its distilled CRM and LLM): without the loop (one round: read from the full run's first round,
which is the same computation), without adaptive weights, without the embedding update, upward only
(LLM -> CRM in one phase from the fixed E4SRec teacher, as DLLM2Rec-style methods), downward only.
Writes benchmarks/results/NAME.json; every run folder stays under --runs. Runs already finished there (for example
launched in parallel with `llmd4rec distill ... run_name=NAME-ABLATION`) are read, with the time they reported.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header  # noqa: E402

from llmd4rec.config import config_to_dict, load_config  # noqa: E402
from llmd4rec.distill import loop  # noqa: E402
from llmd4rec.training import crm, llm  # noqa: E402

ABLATIONS = {
    "full": [],
    "no_loop": None,  # round 1 of the full run
    "no_weights": ["distill.adaptive_weights=false"],
    "no_embedding_update": ["distill.embedding_update=false"],
    "upward_only": ["distill.direction=upward", "distill.rounds=1"],  # the LLM teacher never changes: one phase
    "downward_only": ["distill.direction=downward"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--name", required=True, help="result file benchmarks/results/NAME.json")
    p.add_argument("--runs", default="runs/suite")
    p.add_argument("--crm-run", help="reuse a trained SASRec run")
    p.add_argument("--llm-run", help="reuse a trained E4SRec run")
    p.add_argument("--only", nargs="*", default=list(ABLATIONS))
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    base = args.overrides + [f"run_dir={args.runs}"]
    path = Path(__file__).resolve().parent / "results" / f"{args.name}.json"
    t0 = time.perf_counter()

    def cfg(*extra: str):
        return load_config(args.config, base + list(extra))

    def finished(run_name: str) -> Path | None:
        run_dir = Path(args.runs) / run_name
        return run_dir if (run_dir / "results.json").exists() else None

    def run_or_resume(recipe, run_name: str, *extra: str) -> Path:
        """A stopped run of that name is resumed, not started again over its files."""
        run_dir = Path(args.runs) / run_name
        resume = str(run_dir) if (run_dir / "config.yaml").exists() else None
        return recipe.run(cfg(f"run_name={run_name}", *extra), resume)

    crm_run = args.crm_run or finished(f"{args.name}-sasrec") or run_or_resume(crm, f"{args.name}-sasrec")
    llm_run = args.llm_run or finished(f"{args.name}-e4srec") or run_or_resume(
        llm, f"{args.name}-e4srec", f"crm_run={crm_run}")
    out = header(config_to_dict(cfg()))
    out.update({"preset": Path(args.config).name, "crm_run": str(crm_run), "llm_run": str(llm_run),
                "ablations": {k: ABLATIONS[k] for k in args.only}, "rows": {}, "seconds": {}})
    for name in args.only:
        t = time.perf_counter()
        if ABLATIONS[name] is None:
            full = finished(f"{args.name}-full")
            if full is None:
                continue
            first = json.loads((full / "results.json").read_text())["history"][1]
            rows = {"LLMD4Rec_C": first["crm"], "LLMD4Rec_L": first["llm"]}
        else:
            run_name = f"{args.name}-{name}"
            run_dir = finished(run_name) or run_or_resume(loop, run_name, f"crm_run={crm_run}",
                                                          f"llm_run={llm_run}", *ABLATIONS[name])
            results = json.loads((run_dir / "results.json").read_text())
            rows = results["rows"]
            t -= results.get("seconds", 0.0)  # a run finished earlier (or by a parallel launch) reports its own time
        if name == "full":
            out["rows"].update(rows)
        else:
            out["rows"][f"{name} (CRM)"] = rows["LLMD4Rec_C"]
            out["rows"][f"{name} (LLM)"] = rows["LLMD4Rec_L"]
        out["seconds"][name] = time.perf_counter() - t
        out["total_seconds"] = time.perf_counter() - t0
        path.write_text(json.dumps(out, indent=2) + "\n")  # written as rows arrive: a stopped suite keeps them
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
