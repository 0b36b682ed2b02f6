"""Run folders: resolved config, metrics.jsonl and checkpoints, each written so a crash loses nothing (the results
tables are `tables.py`'s)."""

from __future__ import annotations

import json
import os
import random
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import reporting
from .config import Config, config_history, flat_keys, load_config, resume_changes, resumed_line, save_config
from .errors import InputError
from .io import atomic_write_json, atomic_write_text, read_json, write_error


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    """The device of `device=` (auto | cpu | mps | cuda | cuda:N), checked to exist on this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"config key 'device' must be auto, cpu, mps, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise InputError(f"device={name}, but this machine has {torch.cuda.device_count()} CUDA devices "
                         f"(torch {torch.__version__}): use device=cpu or device=auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"device={name}, but MPS is not available here: use device=cpu or device=auto")
    return device


def _probe_writable(path: Path) -> None:
    probe = path / ".write-test"
    probe.write_text("ok")
    probe.unlink()


def resume_config(run_dir: str | Path, config_path: str | None = None, overrides: list[str] | None = None
                  ) -> Config:
    """The config of a resumed run: its own config.yaml, then --config and overrides on top, which may only
    repeat it or make the changes `resume_changes` allows."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise InputError("not a run folder (no config.yaml)", run_dir)
    saved = load_config(path, saved=True)
    cfg = load_config(config_path, overrides, base=saved)
    resume_changes(saved, cfg)
    return cfg


_START_FILES = {"config.yaml", "run.json", ".write-test"}


def _holds_a_run(path: Path) -> bool:
    """True once a run has written anything besides its start files: a start that failed before (no metrics, no
    checkpoint) does not block its run_name."""
    try:
        return any(p.name not in _START_FILES for p in path.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return True


def _fresh_folder(cfg: Config, kind: str) -> Path:
    """runs/<kind>-<dataset>-<date-time.milliseconds>, created here; a name taken meanwhile (runs started in the
    same millisecond) gets -2, -3, ..."""
    now = time.time()
    dataset = re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.data.name).strip("._") or "data"
    stem = f"{kind}-{dataset}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}.{int(now * 1000) % 1000:03d}"
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        path = Path(cfg.run_dir) / (stem if n == 1 else f"{stem}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            n += 1


def make_run_dir(cfg: Config, kind: str, resume: str | None = None) -> Path:
    reporting.check_available(cfg.report_to)
    path = _make_run_dir(cfg, kind, resume)
    if cfg.report_to:
        reporting.start(path, cfg.report_to, {k: v for k, (v, _) in flat_keys(cfg).items()})
    return path


def _make_run_dir(cfg: Config, kind: str, resume: str | None = None) -> Path:
    """A new folder runs/<kind>-<dataset>-<time> or runs/<run_name> (or the one being resumed), checked writable
    before any work. A run_name whose folder already holds a run is refused: a new run never mixes its metrics and
    checkpoints into another's (a folder left by a start that failed before writing anything is reused).

    A resumed folder must hold a run of the same kind (a train-crm run cannot be resumed by distill); a lost or
    damaged run.json is written again. `cfg` may differ from its config.yaml only as `resume_changes` allows;
    the changes are recorded as a comment line at the top of config.yaml."""
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
        changes = resume_changes(load_config(path / "config.yaml", saved=True), cfg)
        if changes:
            save_config(cfg, path / "config.yaml", config_history(path / "config.yaml") + [resumed_line(changes)])
        return path
    if cfg.run_name:
        path = Path(cfg.run_dir) / cfg.run_name
        if _holds_a_run(path):  # never train over another run's files
            raise InputError("this run folder already holds a run: continue it with --resume, or choose another "
                             "run_name", path)
    try:
        path = Path(cfg.run_dir) / cfg.run_name if cfg.run_name else _fresh_folder(cfg, kind)
        path.mkdir(parents=True, exist_ok=True)
        _probe_writable(path)
    except OSError as e:
        raise InputError(f"run folder is not writable ({e.strerror})", path if cfg.run_name else cfg.run_dir) from None
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
    reporting.report(Path(run_dir), record)


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
