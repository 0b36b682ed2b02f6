"""Everything that turns files into models: a run folder's config, data split and best (or distilled) model,
and the model builders that recipes, `evaluate`, `export` and `serve` share. Nothing here imports a recipe."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import Config, config_to_dict, load_config, shape_mismatches
from .data.dataset import Dataset, Split, leave_one_out
from .errors import InputError
from .io import load_tensors
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
        wrong = shape_mismatches(cfg, load_config(path / "config.yaml", saved=True), sections)
        if wrong:
            raise InputError(f"{key} was trained on other data or model shapes ({'; '.join(wrong)})", path)


def reused_metrics(cfg: Config, key: str) -> dict | None:
    """The valid and test metrics a reused crm_run / llm_run recorded for its best checkpoint (the one loaded),
    when they are what scoring it here would give: same data and eval settings and, for the LLM, the same llm
    section (its dtype and attention change scores); the shapes are checked by check_reused_runs, and a SASRec's
    other settings only shape its training. A frozen model need not be scored again (on Beauty an E4SRec takes
    minutes). None otherwise, and the caller evaluates it."""
    path = Path(getattr(cfg, key))
    if not ((path / "results.json").is_file() and (path / "config.yaml").is_file()):
        return None
    mine, theirs = config_to_dict(cfg), config_to_dict(load_config(path / "config.yaml", saved=True))
    for section in ("data", "eval") if key == "crm_run" else ("data", "llm", "eval"):
        a, b = dict(mine[section]), dict(theirs[section])
        if section == "data":  # the same files may be reached by another path
            a.pop("data_dir"), b.pop("data_dir")
        if a != b:
            return None
    results = json.loads((path / "results.json").read_text())
    return {w: results[w] for w in ("valid", "test")} if all(w in results for w in ("valid", "test")) else None


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


def crm_from_weights(cfg: Config, n_items: int, weights: dict[str, torch.Tensor], source: Path):
    """SASRec with the given weights; weights of another catalogue or model shape are one line naming the file."""
    from .models.sasrec import SASRec

    model = SASRec(n_items, cfg.crm)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise InputError(f"its SASRec weights do not fit {n_items} items and the crm section "
                         f"({str(e).splitlines()[-1].strip()})", source) from None
    return model


def load_crm(run_dir: Path, n_items: int, cfg: Config, tag: str = "best", phase: str = "crm",
             device: torch.device | str = "cpu"):
    from .training.checkpoint import load_weights

    folder = Path(run_dir) / phase
    model = crm_from_weights(cfg, n_items, load_weights(folder, tag), folder / f"{tag}.safetensors")
    return model.to(device).eval()


def build_llm(cfg: Config, item_table: torch.Tensor, device: torch.device | str = "cpu",
              text_table: torch.Tensor | None = None, backbone=None, tokenizer=None):
    """E4SRec with its ID table (and, with llm.item_text, its text table); the backbone is loaded from cfg.llm
    unless given."""
    from .models.e4srec import E4SRec

    return E4SRec(cfg.llm, item_table, backbone, tokenizer, text_table).to(device)


NEEDS_CRM_RUN = "train-llm needs crm_run=RUN_DIR: the SASRec run whose item embeddings initialise E4SRec"


def crm_item_table(cfg: Config, n_items: int) -> torch.Tensor:
    """The ID table E4SRec starts from: the item embeddings of cfg.crm_run's best SASRec."""
    if not cfg.crm_run:
        raise InputError(NEEDS_CRM_RUN)
    return load_crm(Path(cfg.crm_run), n_items, cfg).item_emb.weight.detach().clone()


def load_llm(run_dir: Path, n_items: int, cfg: Config, device: torch.device | str = "cpu", phase: str = "llm",
             tag: str = "best"):
    """Rebuild E4SRec from a run: the item (and text) tables are stored in the run, so neither the CRM run nor the
    text embedding step is needed."""
    folder = Path(run_dir) / phase
    table = load_tensors(folder / "item_table.safetensors")["item_table"]
    text = load_tensors(folder / "text_table.safetensors")["text_table"] if cfg.llm.item_text else None
    model = build_llm(cfg, table, device, text)
    model.load_trainable_state_dict(load_tensors(folder / f"{tag}.safetensors"))
    return model.eval()


def llm_text_table(run_dir: Path, cfg: Config) -> torch.Tensor | None:
    """A distillation run's LLM text table (llm.item_text), stored with its baseline: its llm0, or the reused
    llm_run."""
    if not cfg.llm.item_text:
        return None
    folder = Path(cfg.llm_run) / "llm" if cfg.llm_run else Path(run_dir) / "llm0"
    return load_tensors(folder / "text_table.safetensors")["text_table"]


def distilled_weights(folder: Path) -> Path:
    """A finished downward phase's deployed LLM weights (older runs kept only their best epoch)."""
    return folder / "final.safetensors" if (folder / "final.safetensors").exists() else folder / "best.safetensors"


def distilled_table(folder: Path) -> Path:
    """A finished downward phase's deployed LLM item table."""
    final = folder / "final_item_table.safetensors"
    return final if final.exists() else folder / "item_table.safetensors"


def distilled_crm(run_dir: Path, phase: str, n_items: int, cfg: Config, device: torch.device | str = "cpu"):
    """A finished upward phase's deployed CRM (older runs kept only their best epoch)."""
    tag = "final" if (Path(run_dir) / phase / "final.safetensors").exists() else "best"
    return load_crm(run_dir, n_items, cfg, phase=phase, device=device, tag=tag)


def load_distilled(run_dir: Path, n_items: int, cfg: Config, device: torch.device | str = "cpu",
                   which: str = "crm"):
    """The final model of one side of a distillation run: its last finished round's, or the baseline if none ran."""
    run_dir = Path(run_dir)
    side = "up" if which == "crm" else "down"
    for t in range(cfg.distill.rounds, 0, -1):
        folder = run_dir / f"round{t}-{side}"
        if (folder / "done.json").exists():
            if which == "crm":
                return distilled_crm(run_dir, folder.name, n_items, cfg, device)
            model = build_llm(cfg, load_tensors(distilled_table(folder))["item_table"], device,
                              llm_text_table(run_dir, cfg))
            model.load_trainable_state_dict(load_tensors(distilled_weights(folder)))
            return model.eval()
    if which == "crm":
        return load_crm(Path(cfg.crm_run) if cfg.crm_run else run_dir, n_items, cfg,
                        phase="crm" if cfg.crm_run else "crm0", device=device)
    return load_llm(Path(cfg.llm_run) if cfg.llm_run else run_dir, n_items, cfg, device=device,
                    phase="llm" if cfg.llm_run else "llm0")


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
    cfg = load_config(run_dir / "config.yaml", overrides, saved=True)
    dev = pick_device(device or cfg.device)
    dataset, split = load_data(cfg)
    if kind == "sasrec":
        model = load_crm(run_dir, dataset.n_items, cfg, device=dev)
    elif kind == "e4srec":
        model = load_llm(run_dir, dataset.n_items, cfg, device=dev)
    else:
        model = load_distilled(run_dir, dataset.n_items, cfg, device=dev, which=which or "crm")
    return LoadedRun(run_dir, kind, cfg, dataset, split, model)
