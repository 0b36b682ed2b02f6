"""Serving bundles: one folder with everything `serve` needs, so serving never reads a run folder or a dataset.

Layout:
  bundle.json             kind ("crm" | "llm"), dataset, n_items, max_len, package version, backbone (llm), and
                          `files`: the sha256 of each file below, verified when the bundle is loaded
  config.yaml             the run's resolved config (the model section rebuilds the architecture)
  model.safetensors       SASRec state dict; or E4SRec LoRA + W_in + W_out (+ W_txt) + `item_table` (the frozen
                          item table) and, with llm.item_text, `text_table` (the frozen item text embeddings)
  popularity.safetensors  `counts` [n_items + 1]: interactions per item, for the empty-history fallback
  items.json              [{"id": internal id, "item": original id, "title": ...}] for ids 1..n_items

An LLM bundle references its backbone (name, keep_layers, dtype) instead of copying it: the frozen decoder is
the same public checkpoint for every bundle, and only the trained parts change.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .config import Config, save_config
from .data.dataset import Dataset
from .errors import InputError
from .io import atomic_write_json, check_finite, make_temp_dir, save_tensors, sha256_file

BUNDLE_FORMAT = 2  # 2: bundle.json records every file's sha256
BUNDLE_FILES = ("model.safetensors", "popularity.safetensors", "items.json", "config.yaml")
KINDS = ("crm", "llm")


def export_bundle(run_dir: Path, out_dir: Path, model: str | None = None, data_dir: str | None = None) -> Path:
    """`llmd4rec export`: the run's model as a bundle; a distillation run exports its CRM (default) or its LLM."""
    from .loading import RUN_MODEL, load_run

    if model not in (None, *KINDS):
        raise InputError(f"--model must be crm or llm, got '{model}'")
    run = load_run(run_dir, [f"data.data_dir={data_dir}"] if data_dir else None, device="cpu", which=model)
    return write_bundle(out_dir, model or RUN_MODEL.get(run.kind, "crm"), run.model, run.cfg, run.dataset)


def _weights(kind: str, model: Any) -> dict[str, torch.Tensor]:
    if kind == "crm":
        return dict(model.state_dict())
    tables = {"item_table": model.item_table}
    if model.cfg.item_text:
        tables["text_table"] = model.text_table
    return {**model.trainable_state_dict(), **tables}


def write_bundle(out_dir: Path, kind: str, model: Any, cfg: Config, dataset: Dataset,
                 counts: torch.Tensor | None = None, extra_info: dict[str, Any] | None = None) -> Path:
    """Writes the bundle into a temporary sibling folder and renames it into place: never half a bundle.

    counts: popularity counts [n_items + 1] when they are not the dataset's (an update adds its events to the
    old bundle's); extra_info: more bundle.json keys (an update records its watermark and validation)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError("output folder exists and is not empty", out_dir)
    if model.n_items != dataset.n_items:
        raise InputError(f"model has {model.n_items} items but dataset '{dataset.name}' has {dataset.n_items}")
    weights = _weights(kind, model)
    check_finite(weights)  # a diverged model is never exported
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out_dir.parent, f".{out_dir.name}.", ".tmp")
    try:
        save_tensors(tmp / "model.safetensors", weights)
        if counts is None:
            flat = np.fromiter((i for seq in dataset.sequences for i in seq), dtype=np.int64)
            counts = torch.from_numpy(np.bincount(flat, minlength=dataset.n_items + 1)).float()
        save_tensors(tmp / "popularity.safetensors", {"counts": counts})
        save_config(cfg, tmp / "config.yaml")
        titles = dataset.titles or []
        items = [{"id": i, "item": dataset.item_ids[i],
                  **({"title": titles[i]} if i < len(titles) and titles[i] else {})} for i in range(1, dataset.n_items + 1)]
        atomic_write_json(tmp / "items.json", items)
        info: dict[str, Any] = {"format": BUNDLE_FORMAT, "kind": kind, "dataset": dataset.name,
                                "n_items": dataset.n_items, "max_len": model.max_len, "version": __version__,
                                "files": {name: sha256_file(tmp / name) for name in BUNDLE_FILES}}
        if kind == "llm":
            info["backbone"] = {"name": cfg.llm.backbone, "keep_layers": cfg.llm.keep_layers, "dtype": cfg.llm.dtype}
        info.update(extra_info or {})
        atomic_write_json(tmp / "bundle.json", info)  # written last: its presence marks a complete bundle
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
