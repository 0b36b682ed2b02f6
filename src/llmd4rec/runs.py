"""Run folders: resolved config, metrics.jsonl, checkpoints and results, each written so a crash loses nothing."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import Config, save_config
from .errors import InputError
from .io import atomic_write_json, atomic_write_text, read_json, write_error


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _probe_writable(path: Path) -> None:
    probe = path / ".write-test"
    probe.write_text("ok")
    probe.unlink()


def make_run_dir(cfg: Config, kind: str, resume: str | None = None) -> Path:
    """A new folder runs/<kind>-<dataset>-<time> or runs/<run_name> (or the one being resumed), checked writable
    before any work. A run_name whose folder already holds a run is refused: a new run never mixes its metrics and
    checkpoints into another's.

    A resumed folder must hold a run of the same kind (a train-crm run cannot be resumed by distill); a lost or
    damaged run.json is written again."""
    if resume:
        path = Path(resume)
        if not (path / "config.yaml").exists():
            raise InputError("not a run folder (no config.yaml)", path)
        try:
            found = read_json(path / "run.json").get("kind") if (path / "run.json").exists() else None
        except (InputError, AttributeError):
            found = None
        if found is not None and found != kind:
            raise InputError(f"this run folder holds a '{found}' run, not '{kind}': resume it with its own command",
                             path)
        try:
            _probe_writable(path)
        except OSError as e:
            raise InputError(f"run folder is not writable ({e.strerror})", path) from None
        if found is None:
            atomic_write_json(path / "run.json", {"kind": kind})
        return path
    name = cfg.run_name or f"{kind}-{cfg.data.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = Path(cfg.run_dir) / name
    if (path / "config.yaml").exists() or (path / "run.json").exists():  # never train over another run's files
        raise InputError("this run folder already holds a run: continue it with --resume, or choose another "
                         "run_name", path)
    try:
        path.mkdir(parents=True, exist_ok=cfg.run_name is not None)
        _probe_writable(path)
    except FileExistsError:
        raise InputError("run folder already exists; pass run_name=... or --resume", path) from None
    except OSError as e:
        raise InputError(f"run folder is not writable ({e.strerror})", path) from None
    save_config(cfg, path / "config.yaml")
    atomic_write_json(path / "run.json", {"kind": kind})
    return path


def run_kind(run_dir: Path) -> str:
    info = Path(run_dir) / "run.json"
    if not info.exists():
        raise InputError("not a run folder (no run.json)", run_dir)
    kind = read_json(info)
    if not isinstance(kind, dict) or not isinstance(kind.get("kind"), str):
        raise InputError("run.json is malformed (no \"kind\")", info)
    return kind["kind"]


def log_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    """Append one JSON line; flushed and fsynced so a killed run keeps every finished epoch. A line torn by an
    earlier kill is closed first, so it cannot swallow this one."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        with open(path, "a+b") as f:
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
            f.write((json.dumps(record, sort_keys=True) + "\n").encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise write_error(e, path) from None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if line:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill, or damaged on disk: the others are still good
            if isinstance(record, dict):
                out.append(record)
    return out


def truncate_metrics(run_dir: Path, phase: str, keep: int) -> None:
    """On resume, drop this phase's lines logged after the checkpoint being resumed (epochs <= keep stay)."""
    def kept(r: dict[str, Any]) -> bool:
        epoch = r.get("epoch", 0)
        return r.get("phase") != phase or (isinstance(epoch, (int, float)) and epoch <= keep)

    records = [r for r in read_metrics(run_dir) if kept(r)]
    atomic_write_text(Path(run_dir) / "metrics.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def format_table(rows: dict[str, dict[str, float]], keys: list[str]) -> str:
    """Markdown table, one row per model."""
    head = "| model | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys) + "\n"
    body = "".join(f"| {name} | " + " | ".join(f"{m.get(k, float('nan')):.4f}" for k in keys) + " |\n"
                   for name, m in rows.items())
    return head + body


def write_results(run_dir: Path, results: dict[str, Any], table: str) -> None:
    atomic_write_json(run_dir / "results.json", results)
    atomic_write_text(run_dir / "results.md", table)
