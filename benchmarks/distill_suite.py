"""LLMD4Rec and its ablations on one dataset: baselines trained once, then one distillation run per row.

Rows: SASRec, E4SRec (the baselines), LLMD4Rec_C / LLMD4Rec_L (full method), and the ablations of the paper
(each reporting its distilled CRM and LLM): without the loop (one round: read from the full run's first round,
which is the same computation), without adaptive weights, without the embedding update, upward only
(LLM -> CRM in one phase from the fixed E4SRec teacher, as DLLM2Rec-style methods), downward only; and the
controls that say where a CRM gain comes from, each with the preset's upward schedule: control_beta0 (no KD term),
control_self (the CRM's own frozen copy as teacher), control_text_init (SASRec whose item table starts from the
text embeddings) and control_text_self (that SASRec with itself as teacher). --seeds N trains the SASRec baseline
under N seeds: the `SASRec` row is their mean, with `std` beside `valid` and `test`; the first seed's run is the
one everything else starts from.
Writes benchmarks/results/NAME.json; every run folder stays under --runs. Runs already finished there (for example
launched in parallel with `llmd4rec distill ... run_name=NAME-ABLATION`) are read, with the time they reported,
and listed in `read_back`; `total_seconds` sums every run's own time (baselines trained here included), while
`wall_seconds` is this invocation's. `phases` holds each phase's validation NDCG@10 at its start and at its best
distilled epoch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import builds_on, header, mean_std, write_result  # noqa: E402

from llmd4rec.config import config_to_dict, load_config  # noqa: E402
from llmd4rec.loading import load_distilled, load_run  # noqa: E402
from llmd4rec.recipes import distill, train_crm, train_llm  # noqa: E402

UPWARD_ONCE = ["distill.direction=upward", "distill.rounds=1"]
ABLATIONS = {
    "full": [],
    "no_loop": None,  # round 1 of the full run
    "no_weights": ["distill.adaptive_weights=false"],
    "no_embedding_update": ["distill.embedding_update=false"],
    "upward_only": ["distill.direction=upward", "distill.rounds=1"],  # the LLM teacher never changes: one phase
    "downward_only": ["distill.direction=downward"],
    "control_beta0": UPWARD_ONCE + ["distill.beta=0"],
    "control_self": UPWARD_ONCE + ["distill.teacher=self"],
    "control_text_init": None,  # a train-crm run with crm.text_init=true
    "control_text_self": UPWARD_ONCE + ["distill.teacher=self", "crm.text_init=true"],  # from control_text_init
}
CONTROLS = [k for k in ABLATIONS if k.startswith("control_")]


def phase_validation(run_dir: Path) -> dict:
    """Each distillation phase's validation NDCG@10 at its start and at its best distilled epoch, and which of the
    two it deployed, from the phases' done.json."""
    out = {}
    for done_file in sorted(run_dir.glob("round*/done.json")):
        done = json.loads(done_file.read_text())
        if "distilled" not in done:
            continue
        out[done_file.parent.name] = {"start": done["start"]["valid"]["NDCG@10"],
                                      "best_distilled": done["distilled"]["valid"]["NDCG@10"],
                                      "kept": "start" if done["kept_start"] else "distilled"}
    return out


def analyse(out: dict, crm_run: Path, llm_run: Path) -> dict:
    """Test ranks of the main rows' models: metrics of users with a head (top 20% by training interactions) or tail
    target, and the share of users each model ranks the target better than SASRec does (for E4SRec: what an
    upward phase can hand over)."""
    from llmd4rec.analysis import better_share, head_items, head_tail_metrics, split_ranks

    models = {"SASRec": load_run(crm_run), "E4SRec": load_run(llm_run)}
    full = out["runs"].get("full")
    if full:
        models["LLMD4Rec_C"] = load_run(full)
        models["LLMD4Rec_L"] = load_distilled(Path(full), models["LLMD4Rec_C"].dataset.n_items,
                                              models["LLMD4Rec_C"].cfg, which="llm")
    for name in CONTROLS:
        if name in out["runs"]:
            models[name] = load_run(out["runs"][name])
    base = models["SASRec"]
    head = head_items(base.split.train, base.split.n_items)
    ranks = {name: split_ranks(getattr(m, "model", m), base.split, base.cfg.eval) for name, m in models.items()}
    return {"head_share_of_items": 0.2,
            "head_tail": {name: head_tail_metrics(r, base.split.test_targets, head) for name, r in ranks.items()},
            "vs_SASRec": {name: better_share(r, ranks["SASRec"]) for name, r in ranks.items() if name != "SASRec"}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--name", required=True, help="result file benchmarks/results/NAME.json")
    p.add_argument("--runs", default="runs/suite")
    p.add_argument("--crm-run", help="reuse a trained SASRec run")
    p.add_argument("--llm-run", help="reuse a trained E4SRec run")
    p.add_argument("--only", nargs="*", default=list(ABLATIONS))
    p.add_argument("--seeds", type=int, default=1, help="SASRec baselines trained under this many seeds")
    p.add_argument("--no-analysis", action="store_true", help="skip the head/tail and better-than-SASRec analysis")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    base = args.overrides + [f"run_dir={args.runs}"]

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

    read_back: list[str] = []  # runs finished before this invocation: read, with the time they reported

    def read_or_run(recipe, run_name: str, *extra: str) -> Path:
        """A finished run of that name is read back (and listed in read_back), else it runs or resumes."""
        run_dir = finished(run_name)
        if run_dir is not None:
            read_back.append(run_name)
            return run_dir
        return run_or_resume(recipe, run_name, *extra)

    def baseline(given: str | None, recipe, run_name: str, *extra: str) -> tuple[Path, float | None]:
        """A given run (its time belongs to its own result file), or this suite's own, trained or read back."""
        if given:
            return Path(given), None
        run_dir = read_or_run(recipe, run_name, *extra)
        return run_dir, json.loads((run_dir / "results.json").read_text())["train_seconds"]

    crm_run, crm_seconds = baseline(args.crm_run, train_crm, f"{args.name}-sasrec")
    seeds = [baseline(None, train_crm, f"{args.name}-sasrec-seed{k}", f"seed={k}", f"crm_train.seed={k}")
             for k in range(1, args.seeds)]
    seed_runs = [crm_run] + [r for r, _ in seeds]
    llm_run, llm_seconds = baseline(args.llm_run, train_llm, f"{args.name}-e4srec", f"crm_run={crm_run}")
    out = header(config_to_dict(cfg()), builds_on(args.crm_run, args.llm_run))
    out.update({"preset": Path(args.config).name, "crm_run": str(crm_run), "llm_run": str(llm_run),
                "made_runs": [str(r) for r, given in ((crm_run, args.crm_run), (llm_run, args.llm_run)) if not given],
                "ablations": {k: ABLATIONS[k] for k in args.only}, "rows": {}, "runs": {}, "phases": {},
                "seconds": {k: s for k, s in (("sasrec", crm_seconds), ("e4srec", llm_seconds),
                                              *((f"sasrec_seed{i}", t) for i, (_, t) in enumerate(seeds, 1)))
                            if s is not None},
                "read_back": read_back})
    if args.seeds > 1:
        out["rows"]["SASRec"] = mean_std([json.loads((r / "results.json").read_text()) for r in seed_runs])
        out["seed_runs"] = [str(r) for r in seed_runs]
    text_run = None
    for name in args.only:
        if name == "control_text_init":
            text_run = read_or_run(train_crm, f"{args.name}-{name}", "crm.text_init=true")
            results = json.loads((text_run / "results.json").read_text())
            out["rows"][name] = {"valid": results["valid"], "test": results["test"]}
            out["seconds"][name] = results["train_seconds"]
            out["runs"][name] = str(text_run)
            out["made_runs"].append(str(text_run))
        elif name in CONTROLS:
            start_run = text_run if name == "control_text_self" else crm_run
            if start_run is None:
                print(f"skipping {name}: it starts from control_text_init (give both to --only)", file=sys.stderr)
                continue
            run_name = f"{args.name}-{name}"
            run_dir = read_or_run(distill, run_name, f"crm_run={start_run}", f"llm_run={llm_run}", *ABLATIONS[name])
            results = json.loads((run_dir / "results.json").read_text())
            out["rows"][name] = results["rows"]["LLMD4Rec_C"]
            distilled = results["rows"].get("LLMD4Rec_C (distilled, no fall-back)")
            if distilled:
                out["rows"][f"{name} (distilled, no fall-back)"] = distilled
            out["seconds"][name] = results["seconds"]
            out["runs"][name] = str(run_dir)
            out["made_runs"].append(str(run_dir))
            out["phases"][name] = phase_validation(run_dir)
        elif ABLATIONS[name] is None:
            full = finished(f"{args.name}-full")
            if full is None:
                continue
            first = json.loads((full / "results.json").read_text())["history"][1]
            rows = {"LLMD4Rec_C": first["crm"], "LLMD4Rec_L": first["llm"]}
            out["runs"][name] = str(full)
        else:
            run_name = f"{args.name}-{name}"
            run_dir = read_or_run(distill, run_name, f"crm_run={crm_run}", f"llm_run={llm_run}", *ABLATIONS[name])
            results = json.loads((run_dir / "results.json").read_text())
            rows = results["rows"]
            out["seconds"][name] = results["seconds"]  # the run's own time, whichever invocation ran it
            out["runs"][name] = str(run_dir)
            out["made_runs"].append(str(run_dir))
            out["phases"][name] = phase_validation(run_dir)
        if name == "full":
            out["rows"].update({k: v for k, v in rows.items() if not (k == "SASRec" and args.seeds > 1)})
        elif name not in CONTROLS:
            out["rows"][f"{name} (CRM)"] = rows["LLMD4Rec_C"]
            out["rows"][f"{name} (LLM)"] = rows["LLMD4Rec_L"]
        out["total_seconds"] = sum(out["seconds"].values())
        write_result(args.name, out)  # written as rows arrive: a stopped suite keeps them
    if not args.no_analysis:
        out["analysis"] = analyse(out, crm_run, llm_run)
        write_result(args.name, out)


if __name__ == "__main__":
    main()
