"""Two CPU processes (gloo) run the recipes as one process would: same global batches, same metrics.

Each test trains once in this process and once in 2 processes started with torch.multiprocessing.spawn (the
environment torchrun sets: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), dropout off so that both runs
take the same steps. Training can only agree up to float rounding: the batch's loss is summed in two halves and
DDP adds the halves' gradients, instead of one sum. The distributed evaluation has no such excuse: it scores every
user batch exactly as one process does, so on the same checkpoint its metrics must be equal, bit for bit.
"""

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from llmd4rec.config import load_config
from llmd4rec.evaluation import evaluate_split
from llmd4rec.io import save_tensors
from llmd4rec.models.sasrec import SASRec
from llmd4rec.pretrained import load_crm, load_data
from llmd4rec.testing import save_tiny_backbone
from llmd4rec.training import crm, llm

METRICS = [f"{m}@{k}" for m in ("HR", "NDCG", "MRR") for k in (5, 10, 20)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, recipe: str, config: str | None, overrides: list[str]) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    (crm if recipe == "crm" else llm).run(load_config(config, overrides))


def _spawn(recipe: str, config: str | None, overrides: list[str], world: int = 2) -> None:
    mp.spawn(_worker, args=(world, _free_port(), recipe, config, overrides), nprocs=world, join=True)


def _single(recipe: str, config: str | None, overrides: list[str]) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return (crm if recipe == "crm" else llm).run(load_config(config, overrides))
    finally:
        torch.set_num_threads(threads)


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _single_process_eval(model, split, cfg) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {w: evaluate_split(model, split, cfg.eval, w) for w in ("valid", "test")}
    finally:
        torch.set_num_threads(threads)


def test_sasrec_lastfm_two_processes_match_one(shared_data, tmp_path):
    """SASRec on LastFM, 2 epochs. Tolerance: per-epoch loss within 1e-4 relative and every validation metric
    within 2 users' worth (2 / 1090): float rounding may flip a near-tie for a user or two. Batch size 121 leaves
    one row for the last batch, so one rank gets an empty shard (it must still join the gradient all-reduce);
    eval.memory_mb=4 makes 12 user batches, dealt out unevenly to the ranks."""
    overrides = [f"data.data_dir={shared_data}", "crm_train.epochs=2", "crm_train.batch_size=121", "crm.dropout=0",
                 "eval.memory_mb=4", f"run_dir={tmp_path}", "device=cpu"]
    one = _single("crm", "configs/sasrec/lastfm.yaml", overrides + ["run_name=one"])
    _spawn("crm", "configs/sasrec/lastfm.yaml", overrides + ["run_name=two"])
    two = tmp_path / "two"
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-4)
    a, b = _results(one), _results(two)
    n_users = 1090
    for k in METRICS:
        assert abs(a["valid"][k] - b["valid"][k]) <= 2 / n_users, k
    assert a["best_epoch"] == b["best_epoch"]

    # the 2-process evaluation of its best checkpoint equals a 1-process evaluation of the same weights, exactly
    cfg = load_config("configs/sasrec/lastfm.yaml", overrides)
    dataset, split = load_data(cfg)
    model = load_crm(two, dataset.n_items, cfg)
    assert _single_process_eval(model, split, cfg) == {"valid": b["valid"], "test": b["test"]}


def test_tiny_e4srec_two_processes_match_one(tmp_path):
    """A random 2-layer Qwen2 through the LLM recipe, 2 epochs with gradient accumulation over 2 micro-batches
    (DDP skips the all-reduce on the first); batches of 17 samples end each epoch with a single user, so one rank's
    shard is empty. Tolerance: loss within 1e-4 relative, validation metrics within one user's worth (1 / 60); the
    2-process evaluation of the best checkpoint equals the 1-process one exactly."""
    backbone = save_tiny_backbone(tmp_path / "qwen2-tiny")
    data = ["data.synthetic_users=60", "data.synthetic_items=40", "crm.hidden=16", "crm.max_len=10"]
    cfg_crm = load_config(None, data)
    torch.manual_seed(0)
    save_tensors(tmp_path / "crm-run" / "crm" / "best.safetensors", SASRec(40, cfg_crm.crm).state_dict())
    overrides = data + [f"llm.backbone={backbone}", "llm.max_len=10", "llm.lora_dropout=0", "llm_train.epochs=2",
                        "llm_train.batch_size=17", "llm_train.max_targets_per_user=4", "llm_train.warmup_steps=2",
                        "llm_train.grad_accum=2", f"crm_run={tmp_path / 'crm-run'}", f"run_dir={tmp_path}",
                        "device=cpu"]
    one = _single("llm", None, overrides + ["run_name=one"])
    _spawn("llm", None, overrides + ["run_name=two"])
    two = tmp_path / "two"
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-4)
    a, b = _results(one), _results(two)
    for k in METRICS:
        assert abs(a["valid"][k] - b["valid"][k]) <= 1 / 60, k

    cfg = load_config(None, overrides)
    dataset, split = load_data(cfg)
    model = llm.load_llm(two, dataset.n_items, cfg)
    assert _single_process_eval(model, split, cfg) == {"valid": b["valid"], "test": b["test"]}
