"""Two CPU processes (gloo) run the recipes as one process would: same global batches, same metrics.

Each test trains once in this process and once in 2 processes started with torch.multiprocessing.spawn (the
environment torchrun sets: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), dropout off so that both runs
take the same steps. Training can only agree up to float rounding: the batch's loss is summed in two halves and
DDP adds the halves' gradients, instead of one sum. The distributed evaluation has no such excuse: it scores every
user batch exactly as one process does, so on the same checkpoint its metrics must be equal, bit for bit.
"""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from llmd4rec.config import load_config
from llmd4rec.distributed import free_port
from llmd4rec.evaluation import evaluate_split
from llmd4rec.io import save_tensors
from llmd4rec.models.sasrec import SASRec
from llmd4rec.loading import load_crm, load_data, load_llm
from llmd4rec.testing import save_tiny_backbone
from llmd4rec.recipes import distill, train_crm, train_llm
from llmd4rec.training import llm

METRICS = [f"{m}@{k}" for m in ("HR", "NDCG", "MRR") for k in (5, 10, 20)]
RECIPES = {"crm": train_crm, "llm": train_llm, "distill": distill}


class Killed(Exception):
    pass


def _worker(rank: int, world: int, port: int, recipe: str, config: str | None, overrides: list[str],
            resume: str | None, kill_at_eval: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    if kill_at_eval:  # every rank stops as that evaluation begins, as if the job were killed there
        real, calls = llm.evaluate_split, []

        def evaluate_or_die(*args, **kwargs):
            calls.append(1)
            if len(calls) == kill_at_eval:
                raise Killed
            return real(*args, **kwargs)

        llm.evaluate_split = evaluate_or_die
    RECIPES[recipe].run(load_config(config, overrides), resume=resume)


def _spawn(recipe: str, config: str | None, overrides: list[str], world: int = 2, resume: str | None = None,
           kill_at_eval: int = 0) -> None:
    mp.spawn(_worker, args=(world, free_port(), recipe, config, overrides, resume, kill_at_eval), nprocs=world,
             join=True)


def _single(recipe: str, config: str | None, overrides: list[str]) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return RECIPES[recipe].run(load_config(config, overrides))
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
    overrides = [f"data.data_dir={shared_data}", "crm_train.epochs=2", "crm_train.users_per_batch=121", "crm.dropout=0",
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


CHUNKED = ["llm_train.loss=ce_chunked", "llm_train.item_chunk=16"]
PARALLEL = {"ddp": [], "fsdp": ["llm_train.fsdp=true"] + CHUNKED, "zero2": ["llm_train.zero_stage=2"],
            "zero3": ["llm_train.zero_stage=3"] + CHUNKED}


@pytest.mark.parametrize("parallel", list(PARALLEL))
def test_tiny_e4srec_two_processes_match_one(tmp_path, parallel):
    """A random 2-layer Qwen2 through the LLM recipe, 2 epochs with gradient accumulation over 2 micro-batches
    (DDP skips the all-reduce on the first); batches of 17 samples end each epoch with a single user, so one rank's
    shard is empty. With FSDP or ZeRO-3 each rank holds half of every layer, the prompt runs inline in the packed
    rows, and checkpoints are gathered into full tensors; ZeRO-2 partitions the gradients and Adam moments. The
    FSDP and ZeRO-3 runs stream W_out's softmax over item chunks (ce_chunked) against the one process's full CE.
    The DeepSpeed runs are killed as epoch 2's validation begins and resumed from epoch 1's checkpoint, whose Adam
    moments go back into ZeRO's partitions. Tolerance: loss within 1e-4 relative, validation metrics within one
    user's worth (1 / 60); the 2-process evaluation of the best checkpoint equals the 1-process one exactly."""
    zero = {"zero2": 2, "zero3": 3}.get(parallel, 0)
    if zero:
        pytest.importorskip("deepspeed")
    backbone = save_tiny_backbone(tmp_path / "qwen2-tiny")
    data = ["data.synthetic_users=60", "data.synthetic_items=40", "crm.hidden=16", "crm.max_len=10"]
    cfg_crm = load_config(None, data)
    torch.manual_seed(0)
    save_tensors(tmp_path / "crm-run" / "crm" / "best.safetensors", SASRec(40, cfg_crm.crm).state_dict())
    overrides = data + [f"llm.backbone={backbone}", "llm.max_len=10", "llm.lora_dropout=0", "llm_train.epochs=2",
                        "llm_train.samples_per_batch=17", "llm_train.max_targets_per_user=4",
                        "llm_train.warmup_steps=2", "llm_train.grad_accum=2", f"crm_run={tmp_path / 'crm-run'}", f"run_dir={tmp_path}",
                        "device=cpu"]
    one = _single("llm", None, overrides + ["run_name=one"])
    two = tmp_path / "two"
    if zero:
        with pytest.raises(mp.ProcessRaisedException, match="Killed"):
            _spawn("llm", None, overrides + ["run_name=two"] + PARALLEL[parallel], kill_at_eval=2)
        assert len(_losses(two)) == 1
    _spawn("llm", None, overrides + ["run_name=two"] + PARALLEL[parallel], resume=str(two) if zero else None)
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-4)
    a, b = _results(one), _results(two)
    assert (b["world_size"], b["fsdp"], b["zero_stage"]) == (2, parallel == "fsdp", zero)
    for k in METRICS:
        assert abs(a["valid"][k] - b["valid"][k]) <= 1 / 60, k

    cfg = load_config(None, overrides)
    dataset, split = load_data(cfg)
    model = load_llm(two, dataset.n_items, cfg)
    assert _single_process_eval(model, split, cfg) == {"valid": b["valid"], "test": b["test"]}


def test_distill_round_two_processes_match_one(tmp_path):
    """The whole LLMD4Rec loop (SASRec and E4SRec baselines, one downward and one upward phase with their teacher
    caches) on 2 processes: one run folder written by rank 0, every phase's metrics within one user's worth (1 / 80)
    of the single-process run, and the same caches."""
    backbone = save_tiny_backbone(tmp_path / "qwen2-tiny")
    overrides = ["data.synthetic_users=80", "data.synthetic_items=50", "crm.hidden=16", "crm.dropout=0",
                 "crm.max_len=10", "llm.max_len=10", f"llm.backbone={backbone}", "llm.keep_layers=null",
                 "llm.lora_dropout=0", "crm_train.epochs=2", "crm_train.users_per_batch=24", "llm_train.epochs=1",
                 "llm_train.samples_per_batch=20", "llm_train.max_targets_per_user=3", "distill.rounds=1",
                 "distill.cache_users_per_batch=20",
                 "distill.crm_epochs=1", "distill.cache_topk=8", f"run_dir={tmp_path}", "device=cpu"]
    one = _single("distill", None, overrides + ["run_name=one"])
    _spawn("distill", None, overrides + ["run_name=two"])
    two = tmp_path / "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "qwen2-tiny", "two"]  # one folder per run
    a, b = _results(one), _results(two)
    assert b["world_size"] == 2
    for row in a["rows"]:
        for w in ("valid", "test"):
            for k in METRICS:
                assert abs(a["rows"][row][w][k] - b["rows"][row][w][k]) <= 1 / 80, (row, w, k)
    for phase in ("crm0", "llm0", "round1-down", "round1-up"):
        assert (two / phase / "done.json").exists(), phase
        assert sorted(f.name for f in (two / phase).glob("rng*.safetensors")) == \
            ["rng.rank0-of-2.safetensors", "rng.rank1-of-2.safetensors"]
    for cache in ("round1-cache-crm", "round1-cache-llm"):
        ha = json.loads((one / cache / "header.json").read_text())
        hb = json.loads((two / cache / "header.json").read_text())
        assert ha["n_samples"] == hb["n_samples"] and ha["mode"] == hb["mode"]
    lines = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in lines if r["phase"] in ("baselines", "rounds")] == ["baselines", "rounds"]


@pytest.mark.parametrize("env, capable, message", [
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, False, "only train-llm"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "ds.json"}, True,
     "deepspeed_config_file"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"}, True,
     "offload_optimizer_device"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO3_INIT": "true"}, True, "zero3_init_flag"),
    ({"ACCELERATE_USE_FSDP": "true"}, False, "only train-llm"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, True, "version 2"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_OFFLOAD_PARAMS": "true"}, True, "fsdp_offload_params"),
    ({"ACCELERATE_MIXED_PRECISION": "bf16"}, True, "mixed_precision"),
])
def test_launch_modes_a_recipe_does_not_implement_are_refused(monkeypatch, env, capable, message):
    from llmd4rec import distributed
    from llmd4rec.errors import InputError

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(InputError, match=message):
        with distributed.session("cpu", shards=capable):
            pass


def test_fsdp_launch_is_accepted_by_the_llm_recipe(monkeypatch):
    """What accelerate launch sets for configs/accelerate/fsdp_7b.yaml passes the LLM recipe's checks."""
    import yaml

    from llmd4rec import distributed

    fsdp = yaml.safe_load(open("configs/accelerate/fsdp_7b.yaml"))["fsdp_config"]
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", str(fsdp["fsdp_version"]))
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", str(fsdp["fsdp_offload_params"]).lower())
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", str(fsdp["fsdp_activation_checkpointing"]).lower())
    with distributed.session("cpu", shards=True) as device:
        assert device.type == "cpu"
    assert not distributed.use_fsdp(False)  # one process: nothing to shard over


@pytest.mark.parametrize("name, stage", [("deepspeed_zero2.yaml", 2), ("deepspeed_zero3.yaml", 3)])
def test_deepspeed_launch_is_accepted_by_the_llm_recipe(monkeypatch, name, stage):
    """What accelerate launch sets for the shipped DeepSpeed configs passes the LLM recipe's checks and selects
    their ZeRO stage; an accumulation or clipping value that differs from the recipe's is refused."""
    import yaml

    from llmd4rec import distributed
    from llmd4rec.config import LLMTrainConfig
    from llmd4rec.errors import InputError

    ds = yaml.safe_load(open(f"configs/accelerate/{name}"))["deepspeed_config"]
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", str(ds["zero_stage"]))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", ds["offload_optimizer_device"])
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", ds["offload_param_device"])
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO3_INIT", str(ds["zero3_init_flag"]).lower())
    with distributed.session("cpu", shards=True) as device:
        assert device.type == "cpu"
    assert distributed.zero_stage(LLMTrainConfig()) == stage
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    with pytest.raises(InputError, match="grad_accum"):
        distributed.zero_stage(LLMTrainConfig(grad_accum=1))
    assert distributed.zero_stage(LLMTrainConfig(grad_accum=4)) == stage


@pytest.mark.parametrize("args, message", [
    (["train-crm", "crm_train.zero_stage=2"], "'crm_train.zero_stage' was removed (SASRec trains with DDP"),
    (["distill", "llm_train.fsdp=true"], "distill trains with DDP"),
    (["train-llm", "llm_train.zero_stage=4", "crm_run=x"], "llm_train.zero_stage' must be one of 0, 1, 2, 3"),
])
def test_sharding_a_recipe_does_not_do_is_one_line_error(tmp_path, capsys, args, message):
    from llmd4rec.cli import main

    assert main([*args, f"run_dir={tmp_path}", "device=cpu"]) == 2
    assert message in capsys.readouterr().err
