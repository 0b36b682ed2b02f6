"""Optional live logging of a run's metrics to TensorBoard and/or MLflow (`report_to`), through those libraries,
besides metrics.jsonl (which stays the record: resumes, plots and benchmarks read it). Only rank 0 reports."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from .errors import InputError

_NEEDS = {"tensorboard": "tensorboard", "mlflow": "mlflow"}
_ACTIVE: dict[Path, list[Any]] = {}  # run folder -> its open reporters


def check_available(names: list[str]) -> None:
    """Before a run folder exists: every asked-for library is installed."""
    for name in names:
        if importlib.util.find_spec(_NEEDS[name]) is None:
            raise InputError(f"report_to={name} needs the {_NEEDS[name]} package: pip install {_NEEDS[name]}")


class _TensorBoard:
    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # a watched run shows each epoch as it ends


class _MLflow:
    def __init__(self, run_dir: Path, params: dict[str, Any]):
        import mlflow

        self.mlflow = mlflow
        self.run = mlflow.start_run(run_name=run_dir.name)
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics({k.replace("@", "_at_"): v for k, v in scalars.items()}, step=step)


def start(run_dir: Path, names: list[str], params: dict[str, Any]) -> None:
    """Open the reporters of a run (rank 0); `params` is the flat config, recorded by MLflow."""
    _ACTIVE[Path(run_dir)] = [_TensorBoard(Path(run_dir)) if n == "tensorboard" else _MLflow(Path(run_dir), params)
                              for n in dict.fromkeys(names)]


def _flatten(record: dict[str, Any], prefix: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def report(run_dir: Path, record: dict[str, Any]) -> None:
    """One metrics.jsonl record as scalars `<phase>/<key>[/<metric>]` at step `epoch`."""
    reporters = _ACTIVE.get(Path(run_dir))
    if not reporters:
        return
    rest = {k: v for k, v in record.items() if k not in ("phase", "epoch")}
    scalars = _flatten(rest, f"{record.get('phase', 'train')}/")
    for r in reporters:
        r.log(scalars, int(record.get("epoch", 0)))
