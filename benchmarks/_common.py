"""Shared pieces of the benchmark scripts: the result-file header and its one writer, the command line of the
recipe benchmarks, and `builds_on`, which traces a run folder back to the result file (and command) that made it.

Every result file says what made it: `command`, the git `commit` and whether the tree was `dirty` (result files
aside), the `machine` (cores, torch threads, CPU model, load average when the script started and when it wrote),
`wall_seconds` from the script's start to its write, `date`, `config` and `builds_on`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from llmd4rec.io import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(os.environ.get("LLMD4REC_RESULTS", ROOT / "benchmarks" / "results"))
"""Where result files go: benchmarks/results, or $LLMD4REC_RESULTS (the tests write elsewhere)."""
GENERATED = ("benchmarks/results", "README.md", "docs/scaling.md")
"""Paths the benchmarks and readme_tables.py write: they do not make the code tree dirty."""

_START = time.perf_counter()
_LOAD_START = [round(x, 2) for x in os.getloadavg()]


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@functools.lru_cache(maxsize=None)
def git_state() -> tuple[str | None, bool | None]:
    """(HEAD commit, whether any file outside GENERATED differs from it); (None, None) outside a git checkout.
    Asked once per process: a benchmark's code does not change while it runs."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return None, None
    status = _git("status", "--porcelain", "--", ".", *(f":(exclude){p}" for p in GENERATED))
    return commit, bool(status)


git_state()  # asked as the benchmark starts: a commit made while it runs is not the code it ran


@functools.lru_cache(maxsize=None)
def same_code(commit: str | None) -> bool:
    """Whether `commit` holds the same code as the working tree now (result files and generated pages aside)."""
    head, dirty = git_state()
    if commit is None or head is None or dirty:
        return False
    if commit == head:
        return True
    return _git("diff", "--quiet", commit, head, "--", ".", *(f":(exclude){p}" for p in GENERATED)) == ""


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    out = {"cores": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)),
           "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
           "python": platform.python_version(), "cpu_model": cpu_model(), "loadavg_start": _LOAD_START}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def header(config: dict, builds_on: list[dict] | None = None) -> dict:
    commit, dirty = git_state()
    return {"command": shlex.join(["python"] + sys.argv), "commit": commit, "dirty": dirty, "machine": machine(),
            "config": config, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "builds_on": builds_on or []}


def _norm(path: str | os.PathLike) -> str:
    p = Path(path)
    return os.path.normpath(p if p.is_absolute() else ROOT / p)


def _made_runs(result: dict) -> list[str]:
    return [r for r in [result.get("run_dir"), *result.get("made_runs", [])] if r]


def builds_on(*run_dirs: str | os.PathLike | None) -> list[dict]:
    """What the given run folders came from: for each, the result file that made it (its `run_dir` or one of its
    `made_runs`) with its command and commit, followed by what that result built on in turn (once each)."""
    made = {}
    for path in sorted(RESULTS.glob("*.json")):
        try:
            result = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        for run in _made_runs(result):
            made[_norm(run)] = (path, result)
    out, seen = [], set()

    def add(run: str | os.PathLike) -> None:
        key = _norm(run)
        if key in seen:
            return
        seen.add(key)
        if key not in made:
            out.append({"run": str(run), "result": None, "command": None, "commit": None})
            return
        path, result = made[key]
        out.append({"run": str(run), "result": os.path.relpath(path, ROOT), "command": result.get("command"),
                    "commit": result.get("commit")})
        for entry in result.get("builds_on", []):
            if entry.get("run"):
                add(entry["run"])

    for run in run_dirs:
        if run:
            add(run)
    return out


def recipe_args(doc: str, seeds: bool = False) -> argparse.Namespace:
    """--config, --name, --resume (and --seeds) and dotted overrides: the command line of train_crm.py and
    train_llm.py."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--name", required=True, help="result file benchmarks/results/NAME.json")
    p.add_argument("--resume", help="continue a stopped benchmark run folder")
    if seeds:
        p.add_argument("--seeds", type=int, default=1,
                       help="train under this many seeds (the configured one, then seed=k crm_train.seed=k for "
                            "k = 1..N-1): metrics are the mean, with the sample std beside them")
    p.add_argument("overrides", nargs="*")
    return p.parse_args()


def mean_std(runs: list[dict]) -> dict:
    """Mean of each metric over seeds, with the sample standard deviation under `std`."""
    out: dict = {"seeds": len(runs), "std": {}}
    for split in ("valid", "test"):
        keys = runs[0][split]
        out[split] = {k: statistics.fmean(r[split][k] for r in runs) for k in keys}
        out["std"][split] = {k: statistics.stdev([r[split][k] for r in runs]) if len(runs) > 1 else 0.0
                             for k in keys}
    return out


RESULT_HELP = "result file: NAME (benchmarks/results/NAME.json) or a path ending in .json"


def result_path(name: str) -> Path:
    return RESULTS / f"{name}.json"


def write_result(target: str | os.PathLike, out: dict) -> Path:
    """The one writer of result files: `target` is a NAME (benchmarks/results/NAME.json) or a path ending in .json.
    Stamps the load average now and the seconds since the script started, then writes atomically."""
    path = Path(target) if str(target).endswith(".json") else result_path(str(target))
    out["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    out["wall_seconds"] = round(time.perf_counter() - _START, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}", flush=True)
    return path
