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
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULT_HELP, header, write_result  # noqa: E402

from llmd4rec.testing import save_tiny_backbone  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
SECONDS_KEYS = ("epoch_seconds", "train_seconds", "seconds")


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


# ---------------------------------------------------------------------------------------------- subprocesses

class Runner:
    def __init__(self, work: Path, env: dict[str, str]):
        self.work, self.env, self.n = work, env, 0

    def start(self, args: list[str], log: Path) -> tuple[subprocess.Popen, Path, Path]:
        self.n += 1
        out, err = log.with_suffix(f".{self.n}.out"), log.with_suffix(f".{self.n}.err")
        proc = subprocess.Popen([PYTHON, "-m", "llmd4rec", *args], cwd=ROOT, env=self.env,
                                stdout=open(out, "wb"), stderr=open(err, "wb"), start_new_session=True)
        return proc, out, err

    def command(self, base: list[str], run_dir: Path) -> list[str]:
        """Resume when the folder is a run folder already, else start it (a kill can land before config.yaml)."""
        if (run_dir / "config.yaml").exists():
            return [*base, "--resume", str(run_dir)]
        return [*base, f"run_dir={run_dir.parent}", f"run_name={run_dir.name}"]

    def run(self, base: list[str], run_dir: Path, log: Path, kill_after: float | None = None,
            kill_when: str | None = None) -> dict:
        """One attempt; SIGKILL after `kill_after` seconds, or as soon as `kill_when` holds (see `condition`)."""
        proc, out, err = self.start(self.command(base, run_dir), log)
        t0 = time.perf_counter()
        killed = False
        while proc.poll() is None:
            elapsed = time.perf_counter() - t0
            if (kill_after is not None and elapsed >= kill_after) or \
                    (kill_when is not None and condition(run_dir, kill_when)):
                os.killpg(proc.pid, signal.SIGKILL)  # the process group of the child started above, nothing else
                proc.wait()
                killed = True
                break
            time.sleep(0.01)
        return {"rc": proc.returncode, "killed": killed, "seconds": time.perf_counter() - t0,
                "stderr": err.read_text(errors="replace"), "stdout": out.read_text(errors="replace")}


def condition(run_dir: Path, when: str) -> bool:
    """`path`: the file exists; `rotated:FOLDER`: FOLDER's last and last.prev are two different committed saves
    (a kill right after the rotation would find them hard links of one file)."""
    if when.startswith("rotated:"):
        folder = run_dir / when.split(":", 1)[1]
        try:
            return (folder / "last.prev.json").read_bytes() != (folder / "last.json").read_bytes()
        except OSError:
            return False
    return (run_dir / when).exists()


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def warning_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning:")]


# ---------------------------------------------------------------------------------------------- comparisons

def results_metrics(run_dir: Path) -> dict | None:
    path = run_dir / "results.json"
    if not path.exists():
        return None
    r = json.loads(path.read_text())
    keys = ("rows", "history") if "rows" in r else ("valid", "test", "best_epoch")
    return {k: r.get(k) for k in keys}


def log_records(run_dir: Path) -> dict[str, list]:
    """metrics.jsonl by phase, in order, without wall-clock fields."""
    out: dict[str, list] = {}
    path = run_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            out.setdefault(r.get("phase"), []).append({k: v for k, v in r.items() if k not in SECONDS_KEYS})
    return out


def weight_digests(run_dir: Path) -> dict[str, str]:
    out = {}
    for f in sorted(run_dir.glob("*/*.safetensors")):
        if f.name in ("best.safetensors", "last.safetensors"):
            out[str(f.relative_to(run_dir))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def describe_state(run_dir: Path) -> str:
    """Where a stopped run stands: its finished phases and each phase's last checkpoint."""
    parts = []
    if not (run_dir / "config.yaml").exists():
        return "no run folder yet"
    for folder in sorted(p for p in run_dir.iterdir() if p.is_dir()):
        if (folder / "done.json").exists():
            parts.append(f"{folder.name}: done")
        elif (folder / "last.json").exists():
            try:
                st = json.loads((folder / "last.json").read_text())["state"]
                parts.append(f"{folder.name}: last epoch {st.get('epoch')}" +
                             (f" step {st['step']}" if st.get("step") else ""))
            except (ValueError, KeyError):
                parts.append(f"{folder.name}: last (unreadable)")
        elif (folder / "header.json").exists():
            parts.append(f"{folder.name}: cache finished")
        elif (folder / "meta.json").exists():
            parts.append(f"{folder.name}: cache partial")
        else:
            parts.append(f"{folder.name}: started")
    if (run_dir / "results.json").exists():
        parts.append("results written")
    return "; ".join(parts) or "run folder, no phase yet"


# ---------------------------------------------------------------------------------------------- damage

def damage(path: Path, kind: str, rng: random.Random) -> str:
    data = bytearray(path.read_bytes())
    if kind == "truncate":
        keep = int(len(data) * rng.uniform(0.0, 0.9))
        path.write_bytes(bytes(data[:keep]))
        return f"truncated {len(data)} -> {keep} bytes"
    n = min(8, len(data))
    positions = sorted(rng.sample(range(len(data)), n))
    for p in positions:
        data[p] ^= 0xFF
    path.write_bytes(bytes(data))
    return f"flipped {n} bytes at {positions[:3]}..."


def tear(folder: Path) -> str:
    """Weights of the previous save under the newest metadata: what a crash between a checkpoint's files left
    behind before the metadata recorded its files' digests."""
    for suffix in ("safetensors", "safetensors.sha256"):
        data = (folder / f"last.prev.{suffix}").read_bytes()
        (folder / f"last.{suffix}").unlink()  # a new file: never write through a hard link into last.prev
        (folder / f"last.{suffix}").write_bytes(data)
    return "last.safetensors (+ sidecar) replaced by last.prev's"


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


def bad_config_cases(refs: dict[str, Path], bundle: Path, busy_port: int) -> list[dict]:
    """(name, argv, setup) of each bad-config fault; `setup` damages a bundle copy first."""
    crm = ["train-crm", "--config", "configs/sasrec/synthetic.yaml", "device=cpu"]
    cases = [{"name": f"train-crm {o}", "argv": [*crm, o]} for o in (
        "eval.mode=bogus", "crm_train.loss=bogus", "device=bogus", "eval.ks=0,-1", "eval.ks=5",
        "crm_train.users_per_batch=0", "crm_train.lr=-1", "crm_train.lr=nan", "crm.n_heads=3", "crm.dropout=2",
        "crm.max_len=0", "seed=-1", "report_to=wandb", "run_name=..")]
    cases += [
        {"name": "distill distill.direction=sideways", "argv": ["distill", "device=cpu", "distill.direction=sideways"]},
        {"name": "train-crm device=cuda (no CUDA here)", "argv": [*crm, "device=cuda"], "needs_no_cuda": True},
        {"name": "train-llm without crm_run", "argv": ["train-llm", "--config", "configs/e4srec/beauty_cpu.yaml",
                                                       "device=cpu"]},
        {"name": "evaluate RUN crm.hidden=64 (the run has 32)", "argv": ["evaluate", str(refs["crm"]), "crm.hidden=64"]},
        {"name": "evaluate with no arguments", "argv": ["evaluate"]},
        {"name": "distill synthetic preset with crm_run of another dataset",
         "argv": ["distill", "--config", "configs/llmd4rec/synthetic.yaml", f"crm_run={refs['crm']}", "device=cpu"]},
        {"name": "train-crm --resume with a changed model", "argv": ["train-crm", "--resume", str(refs["crm"]),
                                                                     "crm.hidden=16"]},
        {"name": "serve --port 99999", "argv": ["serve", str(bundle), "--port", "99999"]},
        {"name": "serve on a port in use", "argv": ["serve", str(bundle), "--port", str(busy_port)]},
    ]
    for name, change in (("bundle.json is [1]", lambda info: [1]),
                         ("bundle.json lacks n_items", lambda info: {k: v for k, v in info.items() if k != "n_items"}),
                         ("bundle.json lacks the model's sha256",
                          lambda info: {**info, "files": {k: v for k, v in info["files"].items()
                                                          if k != "model.safetensors"}})):
        cases.append({"name": f"serve: {name}", "bundle_change": change})
    cases.append({"name": "serve: items.json is not a list", "items_json": '{"1": "a"}'})
    return cases


def run_bad_configs(runner: Runner, refs: dict[str, Path], work: Path) -> list[dict]:
    import socket

    import torch

    bundle = work / "bundle"
    if not bundle.exists():
        subprocess.run([PYTHON, "-m", "llmd4rec", "export", str(refs["crm"]), str(bundle)], cwd=ROOT, env=runner.env,
                       check=True, capture_output=True)
    rows = []
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        for i, case in enumerate(bad_config_cases(refs, bundle, busy.getsockname()[1])):
            if case.get("needs_no_cuda") and torch.cuda.is_available():
                continue
            runs = work / "bad" / f"b{i:02d}"
            argv = case.get("argv")
            if argv is None:  # a damaged copy of the bundle
                damaged = work / "bad" / f"bundle{i:02d}"
                shutil.copytree(bundle, damaged)
                if "bundle_change" in case:
                    info = json.loads((damaged / "bundle.json").read_text())
                    (damaged / "bundle.json").write_text(json.dumps(case["bundle_change"](info)))
                else:
                    (damaged / "items.json").write_text(case["items_json"])
                argv = ["serve", str(damaged), "--port", "0"]
            elif argv[0] in ("train-crm", "train-llm", "distill") and "--resume" not in argv:
                argv = [*argv, f"run_dir={runs}"]
            t0 = time.perf_counter()
            proc = subprocess.run([PYTHON, "-m", "llmd4rec", *argv], cwd=ROOT, env=runner.env, capture_output=True,
                                  text=True, timeout=300)
            err_lines = [line for line in proc.stderr.splitlines() if line.strip()]
            row = {"fault": case["name"], "kind": "bad-config", "argv": argv, "rc": proc.returncode,
                   "error": err_lines[-1] if err_lines else None, "traceback": "Traceback" in proc.stderr,
                   "stderr_lines": len(err_lines),
                   "run_folder_left": runs.exists() and any(runs.iterdir()),
                   "seconds": round(time.perf_counter() - t0, 2)}
            row["ok"] = (proc.returncode == 2 and len(err_lines) == 1 and err_lines[0].startswith("error: ")
                         and not row["traceback"] and not row["run_folder_left"])
            if not row["ok"]:
                row["stderr_tail"] = proc.stderr[-2000:]
            rows.append(row)
            print(f"bad config {i:2d} {case['name']}: rc={row['rc']} ok={row['ok']} | {row['error']}", flush=True)
    return rows


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
