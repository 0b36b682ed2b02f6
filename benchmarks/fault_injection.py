"""Fault injection: kill runs at random times and damage their files, then check that `--resume` either finishes
with exactly the uninterrupted run's metrics or stops with one clear line (exit code 2, no traceback).

Phases, each a subprocess `python -m llmd4rec ...` on LastFM (from --data-dir) with small epochs and a tiny random
Qwen2 backbone built in the work folder:
  crm      train-crm, SASRec hidden 32, 4 epochs;
  llm      train-llm from the reference CRM run, 2 epochs (checkpoints every 50 steps and at each epoch end);
  distill  one LLMD4Rec round reusing the reference CRM and LLM runs (crm_run=, llm_run=).

Fault kinds: `sigkill` (SIGKILL at a time drawn uniformly over the reference's duration, or when a file appears,
then resume until done; some are killed twice), `corrupt` (flip bytes), `truncate` (cut the file short) and `torn`
(a checkpoint's weights and metadata from different saves, as a crash between its files would leave them) applied
to checkpoints, metadata JSON and teacher-cache arrays of a finished run or of a run stopped by SIGKILL.

Bad configs (`--bad-configs`, on by default): every bad value or command line the issue tracker listed (a wrong
choice, a value out of range, a model shape that does not fit, a reused run of another dataset, a bad port, a
damaged bundle.json) run as a command; each must stop with exactly one `error:` line, exit code 2, no traceback,
and leave no run folder behind.

Example: python benchmarks/fault_injection.py --faults 20 --seed 0 --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULT_HELP, ROOT, header, write_result  # noqa: E402
from _fault_bad_configs import run_bad_configs  # noqa: E402
from _fault_runs import (Runner, damage, describe_state, error_lines, log_records, results_metrics,  # noqa: E402
                         tear, warning_lines, weight_digests)

from llmd4rec.testing import save_tiny_backbone  # noqa: E402


def phase_args(phase: str, data_dir: str, backbone: Path, refs: dict[str, Path]) -> list[str]:
    common = ["data.name=lastfm", f"data.data_dir={data_dir}", "crm.hidden=32", "device=cpu"]
    if phase == "crm":
        return ["train-crm", "--config", "configs/sasrec/lastfm.yaml", *common, "crm_train.epochs=4",
                "crm_train.patience=100"]
    llm = [f"llm.backbone={backbone}", "llm.keep_layers=null", "llm_train.samples_per_batch=16",
           "llm_train.max_targets_per_user=2"]
    if phase == "llm":
        return ["train-llm", "--config", "configs/e4srec/beauty_cpu.yaml", *common, *llm, f"crm_run={refs['crm']}",
                "llm_train.epochs=2", "llm_train.patience=5"]
    return ["distill", "--config", "configs/llmd4rec/synthetic.yaml", *common, *llm, f"crm_run={refs['crm']}",
            f"llm_run={refs['llm']}", "distill.rounds=1", "distill.crm_epochs=2", "distill.llm_epochs=1",
            "distill.cache_topk=64", "distill.positions=last_k", "distill.last_k=2", "distill.cache_users_per_batch=16"]


# ---------------------------------------------------------------------------------------------- the plan

def plan(n: int) -> list[dict]:
    """The fault list: every kind on every phase in the first 20, then random SIGKILLs."""
    base = [
        {"kind": "sigkill", "phase": "crm"},
        {"kind": "sigkill", "phase": "llm"},
        {"kind": "sigkill", "phase": "distill"},
        {"kind": "corrupt", "phase": "crm", "on": "finished", "target": ["crm/last.safetensors"]},
        {"kind": "sigkill", "phase": "llm", "when": "llm/item_table.safetensors",
         "why": "item table saved, no checkpoint yet"},
        {"kind": "sigkill", "phase": "distill", "when": "round1-cache-llm/meta.json",
         "why": "round1-down finished, round1-up not started"},
        {"kind": "torn", "phase": "crm", "on": "killed", "when": "rotated:crm", "target": ["crm"]},
        {"kind": "truncate", "phase": "llm", "on": "finished", "target": ["llm/last.json"]},
        {"kind": "sigkill", "phase": "crm", "kills": 2},
        {"kind": "sigkill", "phase": "llm", "kills": 2},
        {"kind": "sigkill", "phase": "distill"},
        {"kind": "corrupt", "phase": "llm", "on": "killed", "when": "rotated:llm",
         "target": ["llm/last.state.safetensors"]},
        {"kind": "corrupt", "phase": "distill", "on": "killed", "when": "round1-up/last.json",
         "target": ["round1-cache-llm/logits.npy"]},
        {"kind": "truncate", "phase": "distill", "on": "killed", "when": "round1-down/last.json",
         "target": ["round1-cache-crm/logits.npy"]},
        {"kind": "corrupt", "phase": "distill", "on": "finished", "target": ["round1-up/done.json"]},
        {"kind": "corrupt", "phase": "crm", "on": "finished", "target": ["crm/best.safetensors"],
         "expect": "detect"},
        {"kind": "sigkill", "phase": "crm"},
        {"kind": "corrupt", "phase": "distill", "on": "killed", "when": "round1-up/last.json",
         "target": ["round1-cache-llm/header.json"]},
        {"kind": "sigkill", "phase": "distill", "kills": 2},
        {"kind": "corrupt", "phase": "crm", "on": "finished", "target": ["crm/last.json", "crm/last.prev.json"],
         "expect": "detect"},
    ]
    extra = [{"kind": "sigkill", "phase": p} for p in ("llm", "crm", "distill")]
    return [dict(base[i]) if i < len(base) else dict(extra[(i - len(base)) % len(extra)]) for i in range(n)]


def run_fault(i: int, spec: dict, runner: Runner, refs: dict[str, Path], ref_info: dict, args_of: dict,
              faults_dir: Path, rng: random.Random) -> dict:
    phase = spec["phase"]
    run_dir = faults_dir / f"f{i:02d}-{spec['kind']}-{phase}"
    log = faults_dir / f"f{i:02d}.log"
    base = args_of[phase]
    ref_seconds = ref_info[phase]["seconds"]
    row = {"fault": i, "kind": spec["kind"], "phase": phase, "expect": spec.get("expect", "recover")}
    t_fault = time.perf_counter()
    attempts = []
    # 1. bring the run to the damaged state
    if spec.get("on") == "finished":
        shutil.copytree(refs[phase], run_dir)
        row["target_state"] = "finished run (copy of the reference)"
    else:
        kills = spec.get("kills", 1) if spec["kind"] == "sigkill" else 1
        for k in range(kills):
            if "when" in spec and k == 0:
                a = runner.run(base, run_dir, log, kill_when=spec["when"])
                a["trigger"] = f"file {spec['when']} appeared" + (f" ({spec['why']})" if "why" in spec else "")
            else:
                horizon, redraws = ref_seconds, 0
                while True:
                    t_kill = rng.uniform(0.0, horizon)
                    a = runner.run(base, run_dir, log, kill_after=t_kill)
                    if a["killed"] or k > 0 or redraws == 3:
                        break
                    # it finished first (the machine got faster): nothing was injected, so start over in a fresh
                    # folder with a time drawn over the duration just observed
                    horizon, redraws = a["seconds"], redraws + 1
                    shutil.rmtree(run_dir)
                a["trigger"] = (f"random time {t_kill:.2f}s, uniform over {horizon:.2f}s (the reference's "
                                f"{ref_seconds:.2f}s" + (f", redrawn {redraws}x" if redraws else "") + ")")
            a["state_after"] = describe_state(run_dir)
            attempts.append(a)
        row["kill_times_s"] = [round(a["seconds"], 2) for a in attempts if a["killed"]]
        row["triggers"] = [a["trigger"] for a in attempts]
        row["state_at_kill"] = [a["state_after"] for a in attempts]
        row["killed"] = attempts[0]["killed"]  # the fault landed (a later kill may find the resume finished)
        row["target_state"] = "stopped by SIGKILL"
    # 2. the damage
    if spec["kind"] in ("corrupt", "truncate"):
        row["target"] = spec["target"]
        row["damage"] = [damage(run_dir / t, spec["kind"], rng) if (run_dir / t).exists() else f"{t} missing"
                         for t in spec["target"]]
    elif spec["kind"] == "torn":
        row["target"] = [f"{spec['target'][0]}/last.safetensors"]
        row["damage"] = [tear(run_dir / spec["target"][0])]
    else:
        row["target"] = [f"{phase} process"]
    # 3. resume until done (a fault may be detected instead: then it stops at once)
    final, resumes = None, 0
    for _ in range(3):
        final = runner.run(base, run_dir, log)
        attempts.append(final)
        resumes += 1
        if final["rc"] == 0 or error_lines(final["stderr"]):
            break
    row["resumes"] = resumes
    row["rc"] = final["rc"]
    row["warnings"] = [w for a in attempts for w in warning_lines(a["stderr"])]
    errs = error_lines(final["stderr"])
    row["error"] = errs[-1] if errs else None
    row["traceback"] = "Traceback" in final["stderr"]
    row["recovered"] = final["rc"] == 0
    row["detected_cleanly"] = final["rc"] == 2 and len(errs) == 1 and not row["traceback"]
    if row["recovered"]:
        row["metrics_equal"] = results_metrics(run_dir) == ref_info[phase]["metrics"]
        ref_w, got_w = ref_info[phase]["weights"], weight_digests(run_dir)
        row["weights_equal"] = all(got_w.get(k) == v for k, v in ref_w.items())
        ref_log, got_log = ref_info[phase]["log"], log_records(run_dir)
        row["log_equal"] = ref_log == got_log
        if not row["log_equal"]:
            row["log_diff_phases"] = sorted(str(p) for p in set(ref_log) | set(got_log)
                                            if ref_log.get(p) != got_log.get(p))
        if not row["metrics_equal"]:
            row["metrics_got"] = results_metrics(run_dir)
    else:
        row["metrics_equal"] = False
        if final["rc"] != 2 or row["traceback"]:
            row["stderr_tail"] = final["stderr"][-2000:]
    row["ok"] = (row["recovered"] and row["metrics_equal"]) if row["expect"] == "recover" else row["detected_cleanly"]
    row["seconds"] = round(time.perf_counter() - t_fault, 2)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--faults", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="fault_injection", help=RESULT_HELP)
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--work", help="work folder (default: a temporary one, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--no-bad-configs", dest="bad_configs", action="store_false",
                   help="skip the bad-config faults (one-line refusals, see the docstring)")
    args = p.parse_args()
    if not (Path(args.data_dir) / "LastFM" / "LastFM.txt").exists():
        sys.exit(f"error: LastFM not found under {args.data_dir} (pass --data-dir)")
    rng = random.Random(args.seed)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="llmd4rec-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1"}
    t_all = time.perf_counter()
    try:
        backbone = work / "tiny-qwen2"
        if not backbone.exists():
            save_tiny_backbone(backbone)
        runner = Runner(work, env)
        refs = {ph: work / "ref" / ph for ph in ("crm", "llm", "distill")}
        args_of: dict[str, list[str]] = {}
        ref_info: dict[str, dict] = {}
        for ph in ("crm", "llm", "distill"):  # the uninterrupted references, in dependency order
            args_of[ph] = phase_args(ph, args.data_dir, backbone, refs)
            shutil.rmtree(refs[ph], ignore_errors=True)
            refs[ph].parent.mkdir(parents=True, exist_ok=True)
            r = runner.run(args_of[ph], refs[ph], work / "ref" / f"{ph}.log")
            if r["rc"] != 0:
                sys.exit(f"reference {ph} failed (rc {r['rc']}):\n{r['stderr'][-3000:]}")
            ref_info[ph] = {"seconds": r["seconds"], "metrics": results_metrics(refs[ph]),
                            "weights": weight_digests(refs[ph]), "log": log_records(refs[ph])}
            print(f"reference {ph}: {r['seconds']:.1f}s", flush=True)
        bad_rows = run_bad_configs(runner, refs, work) if args.bad_configs else []
        faults_dir = work / "faults"
        faults_dir.mkdir(exist_ok=True)
        rows = []
        for i, spec in enumerate(plan(args.faults)):
            row = run_fault(i, spec, runner, refs, ref_info, args_of, faults_dir, rng)
            rows.append(row)
            print(f"fault {i:2d} {row['kind']:8s} {row['phase']:7s} target={','.join(row['target'])}: "
                  f"rc={row['rc']} recovered={row['recovered']} metrics_equal={row['metrics_equal']} "
                  f"ok={row['ok']} ({row['seconds']:.0f}s)" + (f" | {row['error']}" if row['error'] else ""),
                  flush=True)
        recover = [r for r in rows if r["expect"] == "recover"]
        summary = {
            "faults_tried": len(rows),
            "by_kind": {k: sum(r["kind"] == k for r in rows) for k in ("sigkill", "corrupt", "truncate", "torn")},
            "by_phase": {ph: sum(r["phase"] == ph for r in rows) for ph in ("crm", "llm", "distill")},
            "sigkills_landed": sum(bool(r.get("kill_times_s")) for r in rows if r.get("target_state") ==
                                   "stopped by SIGKILL"),
            "runs_stopped_by_sigkill": sum(r.get("target_state") == "stopped by SIGKILL" for r in rows),
            "runs_recovered": sum(r["recovered"] for r in rows),
            "expected_to_recover": len(recover),
            "recovered_with_equal_metrics": sum(r["recovered"] and r["metrics_equal"] for r in rows),
            "expected_detections": len(rows) - len(recover),
            "detected_cleanly": sum(r["detected_cleanly"] for r in rows),
            "tracebacks": sum(r["traceback"] for r in rows),
            "all_equal": all(r["metrics_equal"] for r in recover),
            "all_ok": all(r["ok"] for r in rows),
            "weights_equal": sum(r.get("weights_equal", False) for r in recover),
            "logs_equal": sum(r.get("log_equal", False) for r in recover),
            "bad_configs_tried": len(bad_rows),
            "bad_configs_one_line_exit_2": sum(r["ok"] for r in bad_rows),
            "bad_config_tracebacks": sum(r["traceback"] for r in bad_rows),
            "all_bad_configs_ok": all(r["ok"] for r in bad_rows),
            "total_seconds": round(time.perf_counter() - t_all, 1),
        }
        out = header({"dataset": "lastfm", "data_dir": args.data_dir, "seed": args.seed, "faults": args.faults,
                      "backbone": "tiny random Qwen2 (2 layers, hidden 32, byte-level tokenizer)",
                      "threads": 1, "commands": {ph: ["python", "-m", "llmd4rec", *a] for ph, a in args_of.items()},
                      "reference_seconds": {ph: round(v["seconds"], 2) for ph, v in ref_info.items()}})
        out.update({"faults": rows, "bad_configs": bad_rows, "summary": summary})
        print(json.dumps(summary, indent=2))
        write_result(args.out, out)
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
