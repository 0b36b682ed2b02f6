"""`llmd4rec update`: continue a served SASRec on the events that arrived after it, or keep the old one.

1. The bundle's watermark W (0 for a bundle exported from a run) and the store's newest seq U fix the window:
   the users with an event in (W, U] are the changed users, their full histories up to U the training data.
2. Items the bundle does not know get rows in the item table (growth.py), after the old ones: old ids keep meaning.
3. Each changed user's last event is held out; SASRec continues from the bundle's weights on the rest of the
   history (crm_train settings, update.epochs/lr/patience, early stopping on the held-out events), with a KL
   to the bundle's own CRM as a frozen teacher (update.kd_weight). That teacher, not a cached LLM teacher: the
   teacher caches are keyed by the positions of the distillation run's split, which new histories do not share,
   and the bundle's CRM already carries what distillation taught it, so this keeps the LLM's knowledge too.
4. The new model is kept only if its held-out NDCG@10 is at least the old bundle's (+ update.min_gain), the old
   bundle scoring a new item as a miss. Otherwise nothing is written and the command exits 2 with one line.

The held-out events stay in the store and in the users' histories (the server ranks with them); they are trained on
when the user's history changes again.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import versions
from .config import Config, load_config
from .data.dataset import Dataset, Split, all_positions
from .distill.losses import kd_kl
from .errors import InputError
from .evaluation import compute_ranks, metrics_from_ranks
from .events import SQLiteEventStore
from .export import write_bundle
from .growth import grow_sasrec, related_by_history, related_by_title
from .models.sasrec import SASRec
from .runs import seed_everything
from .serve import load_bundle


class UpdateRefused(InputError):
    """The updated model did worse on the held-out events than the bundle it started from."""


def _check(cfg: Config) -> None:
    u = cfg.update
    for key, ok in (("epochs", u.epochs >= 1), ("lr", u.lr > 0), ("patience", u.patience >= 1),
                    ("kd_weight", u.kd_weight >= 0), ("temperature", u.temperature > 0),
                    ("neighbours", u.neighbours >= 1)):
        if not ok:
            raise InputError(f"config key 'update.{key}' is out of range, got {getattr(u, key)!r}")


def slice_metrics(model: SASRec, inputs: list[list[int]], targets: list[int], cfg: Config) -> dict[str, float]:
    """Full-ranking metrics of a model that may know fewer items than the slice mentions: unknown items leave its
    inputs, and a case whose target it cannot rank is a miss."""
    n = model.n_items
    known = [r for r, t in enumerate(targets) if t <= n]
    ranks = np.full(len(targets), n + 1, dtype=np.int64)
    if known:
        ranks[known] = compute_ranks(model, [[i for i in inputs[r] if i <= n] for r in known],
                                     [targets[r] for r in known], n, exclude_seen=cfg.eval.exclude_seen,
                                     memory_mb=cfg.eval.memory_mb)
    return metrics_from_ranks(ranks, cfg.eval.ks)


def teacher_hook(teacher: SASRec, train: list[list[int]], cfg: Config):
    """fit_crm's KDHook: KL(teacher || student) over the items the teacher knows, at
    the same all-positions cells; items the teacher never saw are padding in its input."""
    n_old = teacher.n_items
    grid, _ = all_positions(train, teacher.max_len)
    grid = grid.masked_fill(grid > n_old, 0)
    weight, temperature = cfg.update.kd_weight, cfg.update.temperature

    def kd(users: torch.Tensor, cols: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            rows, inverse = users.unique(return_inverse=True)
            h = teacher.hidden(grid[rows])[inverse, cols]
            teacher_logits = h @ teacher.output_weight.T
        return weight * kd_kl(logits[:, :n_old + 1], teacher_logits, temperature).mean()

    return kd


def _target(bundle: Path, out: Path | None) -> tuple[Path, str | None]:
    """Where the new bundle goes, and the version to make current afterwards (versioned roots only)."""
    if out is not None:
        return out, None
    if not versions.is_versioned(bundle):
        raise InputError("--out is required unless the bundle is a versioned folder (with a 'current' file)", bundle)
    name = versions.next_version(bundle)
    return bundle / "versions" / name, name


def update_bundle(bundle: str | Path, events: str | Path, out: str | Path | None = None,
                  overrides: list[str] | None = None) -> dict[str, Any]:
    """Steps 1-4 of the module docstring; returns what was done (bundle path, watermark, metrics, seconds)."""
    t0 = time.perf_counter()
    root = Path(bundle)
    source = versions.bundle_path(root)
    old = load_bundle(source)
    if old.info["kind"] != "crm":
        raise InputError("update continues SASRec bundles only; export the CRM (--model crm)", source)
    target, version = _target(root, Path(out) if out is not None else None)
    cfg = load_config(source / "config.yaml", overrides, saved=True)
    _check(cfg)
    seed_everything(cfg.seed)
    if not Path(events).is_file():
        raise InputError("event store not found", events)
    store = SQLiteEventStore(events)
    try:
        watermark, upto = int(old.info.get("watermark", 0)), store.max_seq()
        if upto <= watermark:
            raise UpdateRefused(f"no events after the bundle's watermark {watermark}; nothing to learn", events)
        changed = store.changed_histories(watermark, upto)
        catalogue = store.items(upto)
        added = store.counts_since(watermark, upto)
    finally:
        store.close()

    index = {item: i for i, item in enumerate(old.ids) if i > 0}
    ids, titles = list(old.ids), list(old.titles)
    new_titles: dict[int, str | None] = {}
    for item, title in catalogue:
        if item not in index:
            index[item] = len(ids)
            new_titles[len(ids)] = title
            ids.append(item)
            titles.append(title)
    n_old, n_total = old.info["n_items"], len(ids) - 1
    histories = [[index[i] for i in h] for h in changed.values()]
    cases = [h for h in histories if len(h) >= 2]
    if not cases:
        raise UpdateRefused("no changed user has two events, so there is nothing to validate on", events)
    train = [h[:-1] for h in histories]
    inputs, targets = [h[:-1] for h in cases], [h[-1] for h in cases]

    k = cfg.update.neighbours
    related = {**related_by_history(histories, n_old, k), **related_by_title(new_titles, old.titles, k)}
    model = grow_sasrec(old.model, cfg.crm, n_total, related)
    split = Split(train, inputs, targets, inputs, targets, n_total, list(range(len(cases))))
    tc = dataclasses.replace(cfg.crm_train, epochs=cfg.update.epochs, lr=cfg.update.lr,
                             patience=cfg.update.patience, eval_every=1)
    kd = teacher_hook(old.model, train, cfg) if cfg.update.kd_weight > 0 else None
    from .training.crm import fit_crm

    with tempfile.TemporaryDirectory(prefix="llmd4rec-update-") as tmp:
        fit_crm(model, split, cfg, Path(tmp), phase="update", train_cfg=tc, kd=kd, keep_start=True)
    before = slice_metrics(old.model, inputs, targets, cfg)
    after = slice_metrics(model, inputs, targets, cfg)
    if after["NDCG@10"] < before["NDCG@10"] + cfg.update.min_gain:
        raise UpdateRefused(f"update refused: held-out NDCG@10 of {len(cases)} users would go from "
                            f"{before['NDCG@10']:.4f} to {after['NDCG@10']:.4f}; the old bundle stays", source)

    counts = torch.zeros(n_total + 1)
    counts[:n_old + 1] = old.popularity
    for item, c in added.items():
        counts[index[item]] += c
    report = {"watermark": upto, "previous_watermark": watermark, "parent": str(source), "users": len(changed),
              "held_out": len(cases), "new_items": n_total - n_old, "held_out_before": before,
              "held_out_after": after}
    dataset = Dataset(old.info["dataset"], [], n_total, ids, [], [t or "" for t in titles])
    write_bundle(target, "crm", model, cfg, dataset, counts=counts, extra_info={"watermark": upto, "update": report})
    if version is not None:
        versions.set_current(root, version)
    return {"bundle": str(target), **report, "seconds": time.perf_counter() - t0}
