"""Load a finished run folder back: its config, data split and best model, for evaluate, export and distill."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import Config, load_config
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


def load_data(cfg: Config) -> tuple[Dataset, Split]:
    from .data.registry import load_dataset

    from .data.text import attach_item_text, read_text_table

    dataset = load_dataset(cfg.data.name, cfg.data.data_dir, synthetic_users=cfg.data.synthetic_users,
                           synthetic_items=cfg.data.synthetic_items, seed=cfg.data.seed)
    if cfg.data.item_text:
        attach_item_text(dataset, read_text_table(cfg.data.item_text), cfg.data.item_text)
    return dataset, leave_one_out(dataset)


def load_crm(run_dir: Path, n_items: int, cfg: Config, tag: str = "best", phase: str = "crm",
             device: torch.device | str = "cpu"):
    from .models.sasrec import SASRec
    from .training.checkpoint import load_weights

    model = SASRec(n_items, cfg.crm)
    model.load_state_dict(load_weights(Path(run_dir) / phase, tag))
    return model.to(device).eval()


def load_run(run_dir: str | Path, overrides: list[str] | None = None, device: str | None = None) -> LoadedRun:
    run_dir = Path(run_dir)
    kind = run_kind(run_dir)
    cfg = load_config(run_dir / "config.yaml", overrides)
    dev = pick_device(device or cfg.device)
    dataset, split = load_data(cfg)
    if kind == "sasrec":
        model = load_crm(run_dir, dataset.n_items, cfg, device=dev)
    elif kind == "e4srec":
        from .training.llm import load_llm

        model = load_llm(run_dir, dataset.n_items, cfg, device=dev)
    elif kind == "llmd4rec":
        from .distill.loop import load_distilled

        model = load_distilled(run_dir, dataset.n_items, cfg, device=dev)
    else:
        raise InputError(f"unknown run kind '{kind}'", run_dir / "run.json")
    return LoadedRun(run_dir, kind, cfg, dataset, split, model)
