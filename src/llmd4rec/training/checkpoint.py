"""Checkpoints as safetensors + JSON: weights, optimizer moments, RNG states and loop counters, never pickle.

A checkpoint `<tag>` is three files: `<tag>.safetensors` (weights), `<tag>.state.safetensors` (optimizer moments
and RNG states) and `<tag>.json` (loop state), each tensor file with a `.sha256` sidecar. The JSON is written last
and is the commit point: it records the sha256 of both tensor files and a checksum of itself, so a checkpoint
torn by a crash between its files, truncated or bit-flipped on disk is detected when it is loaded.

The `last` checkpoint keeps its predecessor as `last.prev` (hard links, rotated just before a new one is
written); when the newest fails its checks, `load_checkpoint` warns in one line and resumes from the previous one.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from ..distributed import full_tensor, like
from ..errors import InputError
from ..io import atomic_write_bytes, atomic_write_json, load_tensors, read_json, read_sidecar, save_tensors, \
    write_error

PREV = ".prev"
_FAILED: set[tuple[str, str]] = set()  # (folder, tag) found damaged by load_checkpoint in this process


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state as flat tensors + JSON. Sharded (FSDP) moments are gathered: every rank must call it."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"opt.{pid}.{name}"] = full_tensor(value)
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    params = [p for group in opt.param_groups for p in group["params"]]
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            p = params[int(pid)]
            state.setdefault(int(pid), {})[name] = like(value, p) if value.shape == p.shape else value
    for key, value in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _meta_checksum(meta: dict[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()


def _files(folder: Path, tag: str) -> list[Path]:
    """The data files of a checkpoint, sidecars included, in the order they are written."""
    out = []
    for stem in (tag, f"{tag}.state"):
        out += [folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.sha256"]
    return out


def _read_meta(folder: Path, tag: str) -> dict[str, Any]:
    path = folder / f"{tag}.json"
    meta = read_json(path)
    if not isinstance(meta, dict) or not isinstance(meta.get("state"), dict):
        raise InputError("checkpoint metadata is malformed", path)
    if "checksum" in meta and meta["checksum"] != _meta_checksum(meta):
        raise InputError("checksum mismatch: the checkpoint metadata is corrupt", path)
    return meta


def _digests(meta: dict[str, Any]) -> tuple[str | None, str | None]:
    files = meta.get("files") if isinstance(meta.get("files"), dict) else {}
    return files.get("weights"), files.get("state")


def _committed(folder: Path, tag: str) -> bool:
    """True when <tag> is a complete checkpoint: metadata intact and both tensor files the ones it committed to
    (sidecars compared, data not re-hashed: cheap enough to run before every save)."""
    try:
        meta = _read_meta(folder, tag)
    except InputError:
        return False
    weights, state = _digests(meta)
    if weights is None or state is None:  # written before digests were recorded: trust it as before
        return all(p.exists() for p in _files(folder, tag))
    try:
        return (read_sidecar(folder / f"{tag}.safetensors") == weights
                and read_sidecar(folder / f"{tag}.state.safetensors") == state)
    except InputError:
        return False


def _link_or_copy(src: Path, dst: Path) -> None:
    """dst becomes src's content atomically; a hard link when the file system allows (files are only ever
    replaced by rename, never rewritten in place, so the link keeps the old content)."""
    tmp = dst.with_name(f".{dst.name}.link.tmp")
    try:
        tmp.unlink(missing_ok=True)
        os.link(src, tmp)
        os.replace(tmp, dst)
    except OSError:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        atomic_write_bytes(dst, src.read_bytes())


def _rotate(folder: Path, tag: str) -> None:
    """<tag> -> <tag>.prev. The old <tag>.prev is decommitted first (its JSON removed), its files replaced, then
    its JSON copied last: a crash at any point leaves <tag> itself untouched and complete."""
    if (str(folder), tag) in _FAILED or not _committed(folder, tag):
        return  # never replace a good previous checkpoint with a broken one
    prev = f"{tag}{PREV}"
    try:
        (folder / f"{prev}.json").unlink(missing_ok=True)
        for src, dst in zip(_files(folder, tag), _files(folder, prev)):
            _link_or_copy(src, dst)
        meta = (folder / f"{tag}.json").read_bytes()
    except OSError as e:
        raise write_error(e, folder / f"{prev}.json") from None
    atomic_write_bytes(folder / f"{prev}.json", meta)


def save_checkpoint(folder: Path, tag: str, weights: dict[str, torch.Tensor],
                    opt: torch.optim.Optimizer | tuple | None = None, state: dict[str, Any] | None = None,
                    generators: dict[str, torch.Generator] | None = None, keep_previous: bool | None = None) -> None:
    """Writes <tag>.safetensors (weights), then <tag>.state.safetensors + <tag>.json; the JSON is the commit point.

    opt: the optimizer, or its `optimizer_tensors` already taken (under FSDP every rank gathers, rank 0 writes).

    keep_previous (default: only for tag "last"): first keep the current <tag> as <tag>.prev, the fallback of
    `load_checkpoint`. A failed write (disk full, permissions) raises InputError; the files already on disk stay.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(e, folder) from None
    if keep_previous if keep_previous is not None else tag == "last":
        _rotate(folder, tag)
    digest_w = save_tensors(folder / f"{tag}.safetensors", weights)
    extra: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # dropout on the GPU draws from this one
        extra["rng.cuda"] = torch.cuda.get_rng_state()
    meta: dict[str, Any] = {"state": state or {}}
    for name, g in (generators or {}).items():
        extra[f"rng.{name}"] = g.get_state()
    if opt is not None:
        t, m = opt if isinstance(opt, tuple) else optimizer_tensors(opt)
        extra.update(t)
        meta["optimizer"] = m
    digest_s = save_tensors(folder / f"{tag}.state.safetensors", extra)
    meta["files"] = {"weights": digest_w, "state": digest_s}
    meta = json.loads(json.dumps(meta))  # the checksum is of what the JSON file holds (tuples become lists)
    meta["checksum"] = _meta_checksum(meta)
    atomic_write_json(folder / f"{tag}.json", meta)
    _FAILED.discard((str(folder), tag))


def has_checkpoint(folder: Path, tag: str) -> bool:
    folder = Path(folder)
    return (folder / f"{tag}.json").exists() or (folder / f"{tag}{PREV}.json").exists()


def load_weights(folder: Path, tag: str) -> dict[str, torch.Tensor]:
    """The weights file alone, checked against its sidecar. Not against <tag>.json: a crash between the two leaves
    complete new weights under old metadata, which a weights-only reader (best, export) can still use."""
    return load_tensors(Path(folder) / f"{tag}.safetensors")


def _check_optimizer(opt: torch.optim.Optimizer, extra: dict[str, torch.Tensor], meta: dict[str, Any],
                     path: Path) -> None:
    """The checkpoint's optimizer state must fit this model's parameters (a resume with another model config
    would otherwise fail deep inside torch)."""
    params = [p for group in opt.param_groups for p in group["params"]]
    groups = meta.get("param_groups", [])
    n_saved = sum(len(g.get("params", [])) for g in groups) if isinstance(groups, list) else -1
    if n_saved != len(params) or len(groups) != len(opt.param_groups):
        raise InputError(f"checkpoint holds optimizer state for {n_saved} parameters, this model has "
                         f"{len(params)}: resume with the run's own config", path)
    for key, value in extra.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            if not pid.isdigit() or int(pid) >= len(params):
                raise InputError(f"checkpoint optimizer entry '{key}' does not fit this model", path)
            p = params[int(pid)]
            if value.dim() > 0 and tuple(value.shape) != tuple(p.shape):
                raise InputError(f"checkpoint parameter {pid} has shape {tuple(value.shape)}, this model's "
                                 f"{tuple(p.shape)}: resume with the run's own config", path)


def _read_checkpoint(folder: Path, tag: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    if not (folder / f"{tag}.json").exists():
        raise InputError("checkpoint metadata missing", folder / f"{tag}.json")
    meta = _read_meta(folder, tag)
    digest_w, digest_s = _digests(meta)
    weights = load_tensors(folder / f"{tag}.safetensors", expected_sha256=digest_w)
    extra = load_tensors(folder / f"{tag}.state.safetensors", expected_sha256=digest_s)
    if "rng.torch" not in extra:
        raise InputError("checkpoint state has no RNG state", folder / f"{tag}.state.safetensors")
    return meta, weights, extra


def load_checkpoint(folder: Path, tag: str, opt: torch.optim.Optimizer | None = None,
                    generators: dict[str, torch.Generator] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and loop state; restores optimizer and RNG states in place.

    When <tag> is missing, torn, truncated or corrupt, <tag>.prev is used instead (with a one-line warning on
    stderr); when neither is usable, InputError names both problems.
    """
    folder = Path(folder)
    if not has_checkpoint(folder, tag):
        raise InputError(f"no '{tag}' checkpoint in the run folder", folder)
    problems = []
    for i, name in enumerate((tag, f"{tag}{PREV}")):
        try:
            meta, weights, extra = _read_checkpoint(folder, name)
            if opt is not None and "optimizer" in meta:
                _check_optimizer(opt, extra, meta["optimizer"], folder / f"{name}.json")
            for gname in generators or {}:
                if f"rng.{gname}" not in extra:
                    raise InputError(f"checkpoint has no state for generator '{gname}'", folder / f"{name}.json")
        except InputError as e:
            problems.append(str(e))
            continue
        if i > 0:
            _FAILED.add((str(folder), tag))
            print(f"warning: {problems[0]}; resuming from the previous checkpoint {folder / name}",
                  file=sys.stderr, flush=True)
        torch.set_rng_state(extra["rng.torch"])
        if "rng.cuda" in extra and torch.cuda.is_available():
            torch.cuda.set_rng_state(extra["rng.cuda"])
        for gname, g in (generators or {}).items():
            g.set_state(extra[f"rng.{gname}"])
        if opt is not None and "optimizer" in meta:
            restore_optimizer(opt, extra, meta["optimizer"])
        return weights, meta["state"]
    raise InputError(f"no usable '{tag}' checkpoint ({'; '.join(problems)}); remove this folder to restart "
                     "its phase from the beginning", folder)

