"""Several processes, one recipe: thin helpers over torch.distributed for runs under torchrun / accelerate launch.

Both launchers start one process per GPU (or per CPU slot) and set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; `session` turns those into a process group. With WORLD_SIZE unset or 1 the helpers change nothing, so
a single process runs exactly the code it always ran. The run folder must be on storage every process can read
(rank 0 writes the checkpoints, every rank reads them back).
"""

from __future__ import annotations

import inspect
import math
import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from . import evaluation, launcher
from .data.dataset import pad_left
from .errors import InputError
from .runs import pick_device

T = TypeVar("T")


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


@contextmanager
def session(device_name: str, shards: bool = False, group: bool = False) -> Iterator[torch.device]:
    """This process's device; when launched with WORLD_SIZE > 1 also the process group (nccl on GPUs, gloo on CPU),
    destroyed on exit unless it existed before. Each process takes the GPU numbered by its LOCAL_RANK.
    shards: the recipe shards with FSDP or DeepSpeed ZeRO when asked; the others refuse such a launch.
    group: a process group even for a single process (DeepSpeed needs one)."""
    launcher.refuse_unsupported_modes(shards)
    device = pick_device(device_name)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not group:
        yield device
        return
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    owned = not dist.is_initialized()
    if owned:  # long timeout: the others wait at a barrier while rank 0 alone downloads a backbone or builds a cache
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=4))
    try:
        yield device
    finally:
        if owned:
            dist.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (downloads, caches), then the others, which then find its files."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def on_main(fn: Callable[[], T]) -> T:
    """fn() on rank 0 only, its result (a picklable value) handed to every rank; if it raised, every rank raises."""
    if world_size() == 1:
        return fn()
    box: list[Any] = [None]
    error: BaseException | None = None
    if is_main():
        try:
            box[0] = ("ok", fn())
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the others have heard of it
            error, box[0] = e, ("error", f"{e.__class__.__name__}: {e}")
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    status, value = box[0]
    if status == "error":
        raise RuntimeError(f"rank 0 failed: {value}")
    return value


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Elementwise sum over ranks (a copy, on t's device); nccl needs the tensor on this rank's GPU."""
    if world_size() == 1:
        return t.clone()
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    out = t.to(dev, copy=True)
    dist.all_reduce(out)
    return out.to(t.device)


@torch.no_grad()
def sharded_ranks(model, inputs: list[list[int]], targets: Sequence[int], n_items: int, exclude_seen: bool = True,
                  memory_mb: int = 256, max_len: int | None = None, users_per_batch: int | None = None,
                  items_per_chunk: int | None = None, device: torch.device | str = "cpu",
                  require_finite: str | None = None) -> np.ndarray:
    """`evaluation.compute_ranks` with its user batches dealt out to the ranks whole (batch b to rank b mod world)
    and the ranks summed back, so every rank returns the ranks one process would: each batch is scored with exactly
    the same rows, hence the same floating-point values."""
    world = world_size()
    if max_len is None:
        max_len = getattr(model, "max_len", None)
    batches, chunk = evaluation.plan_batches(model, inputs, n_items, memory_mb, max_len, users_per_batch,
                                             items_per_chunk)
    mine = batches[rank()::world]
    if len(mine) < math.ceil(len(batches) / world):  # every rank runs the model equally often (FSDP records the
        # order of forward calls and prefetches by it in the next backward): one extra encode, its result unused
        model.encode(pad_left([inputs[u] for u in batches[0]], max_len).to(device))
    ranks, bad = evaluation.rank_batches(model, inputs, targets, n_items, mine, chunk, exclude_seen, max_len, device,
                                         progress=is_main())
    both = all_sum(torch.from_numpy(np.stack([ranks, bad]))).numpy()
    evaluation.check_finite(both[1], require_finite)
    return both[0]


def evaluate_split(model, split, cfg, which: str = "test", device: torch.device | str = "cpu",
                   require_finite: str | None = None) -> dict[str, float]:
    """`evaluation.evaluate_split` with full ranking shared out over the ranks (`sharded_ranks`)."""
    return evaluation.evaluate_split(model, split, cfg, which, device, require_finite, ranker=sharded_ranks)


def shard(counts: torch.Tensor) -> tuple[int, int]:
    """[lo, hi): this rank's contiguous slice of rows whose sample counts are `counts`, each rank getting about
    the same number of samples. Contiguous, so this rank's samples are one block of the batch's row-major order."""
    world = world_size()
    if world == 1:
        return 0, len(counts)
    before = counts.cumsum(0) - counts
    owner = (before * world // max(int(counts.sum()), 1)).clamp(max=world - 1)
    r = rank()
    return int((owner < r).sum()), int((owner <= r).sum())


def offset_rng() -> None:
    """Give ranks > 0 their own torch RNG stream (dropout masks must differ between shards); rank 0 keeps its own."""
    if rank() > 0:
        torch.manual_seed(torch.initial_seed() + rank())


def touch(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """0 with every parameter in its graph: a rank whose shard of a batch is empty still gives each parameter a
    (zero) gradient, so DistributedDataParallel's all-reduce hooks fire on it like on the others."""
    return sum((p.sum() for p in params), torch.zeros(())) * 0.0


def ddp(module: torch.nn.Module) -> torch.nn.parallel.DistributedDataParallel:
    """DistributedDataParallel without the per-step buffer broadcast: buffers (E4SRec's item table) are the same on
    every rank, and broadcasting them each step would cost a catalogue-sized copy (newer torch renamed the keyword)."""
    DDP = torch.nn.parallel.DistributedDataParallel
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else \
        "broadcast_buffers"
    return DDP(module, **{no_sync: False})


def refuse_sharding(recipe: str, **train_configs) -> None:
    """A recipe that trains with DDP only stops at once when a config asks it to shard (fsdp, zero_stage)."""
    for key, tc in train_configs.items():
        if tc.fsdp or tc.zero_stage:
            raise InputError(f"{recipe} trains with DDP: {key}.fsdp and {key}.zero_stage are for train-llm")


# ---- FSDP (train-llm): torch's fully_shard, one decoder layer per unit ----

def use_fsdp(requested: bool) -> bool:
    """FSDP when several processes run and either the config (llm_train.fsdp) or `accelerate launch` asks for it."""
    return world_size() > 1 and (requested or launcher.env_true("ACCELERATE_USE_FSDP"))


def shard_model(model) -> None:
    """Shard E4SRec's decoder layers and then the rest (embeddings, W_in, W_out) over the ranks, in place.

    A layer's full weights exist only while it runs forward or backward, so the caller puts the prompt inline into
    every packed row (model.inline_prompt): each layer then runs once per step (the KV-cache pass would run it
    twice, and FSDP frees a layer's weights after its first backward)."""
    from torch.distributed.fsdp import fully_shard

    reshard = not launcher.env_false("FSDP_RESHARD_AFTER_FORWARD")  # false: ZeRO-2-like, weights kept until backward
    for layer in model.decoder.layers:
        fully_shard(layer, reshard_after_forward=reshard)
    fully_shard(model, reshard_after_forward=reshard)


def _fsdp_units(model) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def gathered(model) -> Iterator[None]:
    """Full weights on every rank for the block (evaluation): each rank then scores its own user batches without
    the all-gathers a sharded forward needs. The evaluator still runs the model equally often on every rank: FSDP
    records the order of forward calls and prefetches by it in the next backward. A no-op if nothing is sharded."""
    units = _fsdp_units(model)
    for m in units:
        m.unshard()
        m.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for m in units:
            m.reshard()
            m.set_reshard_after_forward(True)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) parameter or optimizer state as one full tensor on every rank (a collective)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A full tensor laid out like `param`: this rank's shard when param is sharded, else full unchanged."""
    if not hasattr(param, "device_mesh"):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements)


def trainable_state(model) -> dict[str, torch.Tensor]:
    """model.trainable_state_dict() as full tensors. Under FSDP every rank must call it (the shards are gathered);
    under ZeRO-3 call it inside `zero3_gathered`."""
    return {k: full_tensor(v) for k, v in model.trainable_state_dict().items()}


def load_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    """model.load_trainable_state_dict(state), each full tensor laid out like its parameter (sharded or not); a
    tensor that does not fit its parameter goes through as it is, for the model to refuse."""
    own = dict(model.named_parameters())
    model.load_trainable_state_dict({k: like(v.to(own[k].device), own[k]) if k in own and v.shape == own[k].shape
                                     else v for k, v in state.items()})


# ---- DeepSpeed ZeRO (train-llm) ----

def zero_stage(tc) -> int:
    """The ZeRO stage asked for by llm_train.zero_stage or by `accelerate launch` with a DeepSpeed config; 0: none.
    Accumulation and clipping come from the recipe: an accelerate config that says otherwise is refused."""
    stage = tc.zero_stage
    if launcher.env_true("ACCELERATE_USE_DEEPSPEED"):
        stage = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", stage or 2))
        for var, key, value in (("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "grad_accum", tc.grad_accum),
                                ("ACCELERATE_GRADIENT_CLIPPING", "grad_clip", tc.grad_clip)):
            if var in os.environ and float(os.environ[var]) != float(value):
                raise InputError(f"the accelerate config asks for {var.removeprefix('ACCELERATE_').lower()}="
                                 f"{os.environ[var]} but llm_train.{key}={value}: the recipe's value is used, so "
                                 f"drop the key from the accelerate config or set llm_train.{key}")
    if stage not in (0, 1, 2, 3):
        raise InputError(f"llm_train.zero_stage must be 0 (off), 1, 2 or 3, got {stage}")
    return stage


def zero_engine(model: torch.nn.Module, opt: torch.optim.Optimizer, stage: int, tc,
                masters: dict[str, torch.Tensor] | None = None, external: Iterable[torch.nn.Parameter] = ()):
    """(DeepSpeed's engine around `model`, its state as `ZeroAdamState`), ZeRO partitioning `opt` (a torch AdamW).

    With a bfloat16 or float16 backbone DeepSpeed runs in that precision: it casts every parameter to it (ZeRO needs
    one dtype) and keeps float32 master weights and Adam moments of the trainable ones. The masters are set from
    `masters` (name -> tensor, e.g. a resumed checkpoint) or the trainable weights as they were before the cast,
    and Adam moments already in `opt` (a resumed run) go into ZeRO's partitions. The caller sets the accumulation
    boundary for every micro-batch (its batches vary in size). external: parameters the model's forward reads
    outside their own module's call, which ZeRO-3 must then gather for it."""
    try:
        import deepspeed
        from deepspeed.utils import logger
    except ImportError:
        raise InputError("DeepSpeed is not installed: pip install --no-build-isolation deepspeed") from None
    import logging

    logger.setLevel(logging.WARNING)
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    masters = {k: (masters[k] if masters else p).detach().float().cpu().clone() for k, p in named}
    carried = {i: opt.state[p] for i, (_, p) in enumerate(named) if p in opt.state}
    dtype = model.dtype
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": tc.grad_accum,
              "train_batch_size": tc.grad_accum * world_size(), "gradient_clipping": tc.grad_clip,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
              "bf16": {"enabled": dtype == torch.bfloat16}, "fp16": {"enabled": dtype == torch.float16},
              "steps_per_print": 2 ** 31}
    engine, zopt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    if stage == 3:
        for p in external:
            deepspeed.zero.register_external_parameter(model, p)
    for k, p in named:
        _set_zero_full(p, masters[k].to(p.device))
    if carried:
        step = next(iter(carried.values()))["step"]
        for flat in _zero_flat_partitions(zopt):
            zopt.optimizer.state[flat] = {"step": step.clone(), "exp_avg": torch.zeros_like(flat),
                                          "exp_avg_sq": torch.zeros_like(flat)}
        if hasattr(zopt, "_lazy_init_hp_params_optimizer_state"):  # stages 1-2 map parameters to that state lazily
            zopt._lazy_init_hp_params_optimizer_state()
        for i, state in carried.items():
            p = named[i][1]
            for key in ("exp_avg", "exp_avg_sq"):
                _set_zero_full(p, state[key].to(p.device, torch.float32), key)
    return engine, ZeroAdamState(zopt, named)


def _set_zero_full(param: torch.Tensor, full: torch.Tensor, key: str | None = None) -> None:
    """Set a parameter's float32 master weight (key None) or Adam moment `key` from its full value."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state, \
        safe_set_local_fp32_param, safe_set_local_optimizer_state

    if not hasattr(param, "ds_id"):
        safe_set_full_fp32_param(param, full) if key is None else safe_set_full_optimizer_state(param, full, key)
        return
    # ZeRO-3: this rank's slice of the zero-padded flat tensor (DeepSpeed's full setters miss the padding)
    n = param.ds_tensor.numel()
    flat = torch.nn.functional.pad(full.flatten(), (0, n * world_size() - full.numel()))
    mine = flat[rank() * n:(rank() + 1) * n]
    safe_set_local_fp32_param(param, mine) if key is None else safe_set_local_optimizer_state(param, mine, key)


def _zero_flat_partitions(zopt) -> list[torch.Tensor]:
    """The float32 flat tensors ZeRO's wrapped optimizer steps on (this rank's partition of each parameter group)."""
    if hasattr(zopt, "fp32_partitioned_groups_flat"):  # stage 3
        return list(zopt.fp32_partitioned_groups_flat)
    return list(zopt.single_partition_of_fp32_groups)  # stages 1 and 2


class ZeroAdamState:
    """ZeRO's partitioned float32 master weights and Adam state, read back as full tensors: the trainable weights
    and torch AdamW's state_dict (one tensor per parameter, one group). Checkpoints thus keep one format, and a
    ZeRO run resumes on one process or the other way round. Every rank must call both (they gather)."""

    def __init__(self, zopt, named: list[tuple[str, torch.Tensor]]):
        self.zopt, self.named = zopt, named

    def master_weights(self) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param

        return {k: safe_get_full_fp32_param(p).detach().cpu().clone() for k, p in self.named}

    def state_dict(self) -> dict:
        from deepspeed.utils import safe_get_full_optimizer_state

        hyper = {k: v for k, v in self.zopt.optimizer.param_groups[0].items() if k != "params"}
        groups = [{**hyper, "params": list(range(len(self.named)))}]
        flat_state = [s for s in self.zopt.optimizer.state.values() if s]
        if not flat_state:  # not stepped yet
            return {"state": {}, "param_groups": groups}
        step = flat_state[0]["step"].detach().cpu()
        state = {i: {"step": step.clone(), **{k: safe_get_full_optimizer_state(p, k).detach().cpu().clone()
                                      for k in ("exp_avg", "exp_avg_sq")}}
                 for i, (_, p) in enumerate(self.named)}
        return {"state": state, "param_groups": groups}


@contextmanager
def zero3_gathered(model, modify: bool = False) -> Iterator[None]:
    """Full parameters on every rank for the block when ZeRO-3 partitions them (reading or, with modify, loading
    trainable weights; rank 0's values win); a no-op otherwise."""
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
        yield
