"""Load a finished run folder back: its config, data split and best model, for evaluate, export and distill."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import Config, load_config, shape_mismatches
from .data.dataset import Dataset, Split, leave_one_out
from .errors import InputError
from .runs import pick_device, run_kind


@dataclass
class LoadedRun:
    run_dir: Path
    kind: str
    cfg: Config
    dataset: Dataset
    split: Split
    model: Any


REUSED = {"crm_run": ("sasrec", ("data", "crm")), "llm_run": ("e4srec", ("data", "crm", "llm"))}


def check_reused_runs(cfg: Config) -> None:
    """crm_run / llm_run must be runs of their kind on the same data with the same model shapes: checked from their
    config.yaml before a run folder exists, so a mismatch is one line, not a size error deep inside torch."""
    for key, (kind, sections) in REUSED.items():
        folder = getattr(cfg, key)
        if folder is None:
            continue
        path = Path(folder)
        if not path.is_dir():
            raise InputError(f"{key}: no such run folder", path)
        if not (path / "config.yaml").is_file():  # a bare checkpoint folder: its shapes are checked when loaded
            continue
        found = run_kind(path) if (path / "run.json").is_file() else kind
        if found != kind:
            raise InputError(f"{key} must be a '{kind}' run, this folder holds a '{found}' run", path)
        wrong = shape_mismatches(cfg, load_config(path / "config.yaml"), sections)
        if wrong:
            raise InputError(f"{key} was trained on other data or model shapes ({'; '.join(wrong)})", path)


def load_data(cfg: Config) -> tuple[Dataset, Split]:
    from .data.registry import load_dataset

    from .data.text import attach_item_text, read_text_table

    dataset = load_dataset(cfg.data.name, cfg.data.data_dir, synthetic_users=cfg.data.synthetic_users,
                           synthetic_items=cfg.data.synthetic_items, seed=cfg.data.seed)
    if cfg.data.item_text:
        attach_item_text(dataset, read_text_table(cfg.data.item_text), cfg.data.item_text)
    split = leave_one_out(dataset)
    if not split.test_targets:
        raise InputError(f"no user has 3 or more interactions ({dataset.n_users} users, {dataset.n_interactions} "
                         "interactions): leave-one-out has nothing to validate or test on", dataset.source or None)
    if dataset.duplicates_dropped:
        print(f"note: {dataset.duplicates_dropped} duplicate (user, item, timestamp) rows dropped, "
              f"{dataset.n_interactions} interactions kept ({dataset.source})", file=sys.stderr, flush=True)
    return dataset, split


def load_crm(run_dir: Path, n_items: int, cfg: Config, tag: str = "best", phase: str = "crm",
             device: torch.device | str = "cpu"):
    from .models.sasrec import SASRec
    from .training.checkpoint import load_weights

    model = SASRec(n_items, cfg.crm)
    try:
        model.load_state_dict(load_weights(Path(run_dir) / phase, tag))
    except RuntimeError as e:  # a run of another catalogue or model shape
        raise InputError(f"its SASRec weights do not fit {n_items} items and the crm section "
                         f"({str(e).splitlines()[-1].strip()})", Path(run_dir) / phase / f"{tag}.safetensors") from None
    return model.to(device).eval()


RUN_MODEL = {"sasrec": "crm", "e4srec": "llm"}  # run kind -> the one model such a run holds; "llmd4rec" has both


def load_run(run_dir: str | Path, overrides: list[str] | None = None, device: str | None = None,
             which: str | None = None) -> LoadedRun:
    """A run's best model; `which` ("crm" or "llm") picks a distillation run's side (default crm), and must name
    the one model of any other run."""
    run_dir = Path(run_dir)
    kind = run_kind(run_dir)
    if kind not in (*RUN_MODEL, "llmd4rec"):
        raise InputError(f"unknown run kind '{kind}'", run_dir / "run.json")
    if kind in RUN_MODEL and which not in (None, RUN_MODEL[kind]):
        raise InputError(f"a '{kind}' run has no {which} model; it holds its {RUN_MODEL[kind]}", run_dir)
    cfg = load_config(run_dir / "config.yaml", overrides)
    dev = pick_device(device or cfg.device)
    dataset, split = load_data(cfg)
    if kind == "sasrec":
        model = load_crm(run_dir, dataset.n_items, cfg, device=dev)
    elif kind == "e4srec":
        from .training.llm import load_llm

        model = load_llm(run_dir, dataset.n_items, cfg, device=dev)
    else:
        from .distill.loop import load_distilled

        model = load_distilled(run_dir, dataset.n_items, cfg, device=dev, which=which or "crm")
    return LoadedRun(run_dir, kind, cfg, dataset, split, model)
