"""Checkpoints as safetensors + JSON: weights, optimizer moments, RNG states and loop counters, never pickle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from ..io import atomic_write_json, load_tensors, read_json, save_tensors


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"opt.{pid}.{name}"] = value
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    for key, value in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(folder: Path, tag: str, weights: dict[str, torch.Tensor],
                    opt: torch.optim.Optimizer | None = None, state: dict[str, Any] | None = None,
                    generators: dict[str, torch.Generator] | None = None) -> None:
    """Writes <tag>.safetensors (weights), then <tag>.state.safetensors + <tag>.json; the JSON is the commit point."""
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(folder / f"{tag}.safetensors", weights)
    extra: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    meta: dict[str, Any] = {"state": state or {}}
    for name, g in (generators or {}).items():
        extra[f"rng.{name}"] = g.get_state()
    if opt is not None:
        t, m = optimizer_tensors(opt)
        extra.update(t)
        meta["optimizer"] = m
    save_tensors(folder / f"{tag}.state.safetensors", extra)
    atomic_write_json(folder / f"{tag}.json", meta)


def has_checkpoint(folder: Path, tag: str) -> bool:
    return (folder / f"{tag}.json").exists()


def load_weights(folder: Path, tag: str) -> dict[str, torch.Tensor]:
    return load_tensors(folder / f"{tag}.safetensors")


def load_checkpoint(folder: Path, tag: str, opt: torch.optim.Optimizer | None = None,
                    generators: dict[str, torch.Generator] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and loop state; restores optimizer and RNG states in place."""
    if not has_checkpoint(folder, tag):
        raise InputError(f"no '{tag}' checkpoint in the run folder", folder)
    meta = read_json(folder / f"{tag}.json")
    weights = load_weights(folder, tag)
    extra = load_tensors(folder / f"{tag}.state.safetensors")
    torch.set_rng_state(extra["rng.torch"])
    for name, g in (generators or {}).items():
        g.set_state(extra[f"rng.{name}"])
    if opt is not None and "optimizer" in meta:
        restore_optimizer(opt, extra, meta["optimizer"])
    return weights, meta["state"]
