"""The mechanics of fault_injection.py: a `python -m llmd4rec` subprocess killed on a timer or a file's appearance,
the run-folder facts compared with the uninterrupted reference (metrics, weight digests, log records), and the
file damage applied between a kill and the resume."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from _common import ROOT

PYTHON = sys.executable
SECONDS_KEYS = ("epoch_seconds", "train_seconds", "seconds")


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
