"""The bad-config faults of fault_injection.py: each bad value or command line must stop with one `error:` line,
exit code 2, no traceback, and no run folder left behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

from _fault_runs import PYTHON, ROOT, Runner


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
