"""Several processes, one recipe: thin helpers over torch.distributed for runs under torchrun / accelerate launch.

Both launchers start one process per GPU (or per CPU slot) and set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; `session` turns those into a process group. With WORLD_SIZE unset or 1 the helpers change nothing, so
a single process runs exactly the code it always ran. The run folder must be on storage every process can read
(rank 0 writes the checkpoints, every rank reads them back).
"""

from __future__ import annotations

import inspect
import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Iterable, Iterator, TypeVar

import torch
import torch.distributed as dist

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
def session(device_name: str, fsdp_capable: bool = False) -> Iterator[torch.device]:
    """This process's device; when launched with WORLD_SIZE > 1 also the process group (nccl on GPUs, gloo on CPU),
    destroyed on exit unless it existed before. Each process takes the GPU numbered by its LOCAL_RANK.
    fsdp_capable: the recipe shards with FSDP when asked (`use_fsdp`); the others refuse an FSDP launch."""
    _refuse_unsupported_accelerate_modes(fsdp_capable)
    device = pick_device(device_name)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield device
        return
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


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("true", "1")


def _env_false(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("false", "0")


def _refuse_unsupported_accelerate_modes(fsdp_capable: bool) -> None:
    """`accelerate launch` passes its config as environment variables that only an Accelerator reads; a launch
    asking for a mode a recipe does not implement would silently get plain DDP: refuse it instead."""
    if _env_true("ACCELERATE_USE_DEEPSPEED"):
        raise InputError("the recipes do not implement DeepSpeed: for sharding use FSDP with train-llm "
                         "(configs/accelerate/fsdp_7b.yaml), otherwise configs/accelerate/ddp_multi_gpu.yaml")
    if _env_true("ACCELERATE_USE_FSDP"):
        if not fsdp_capable:
            raise InputError("only train-llm shards with FSDP (the LLM backbone is what outgrows one GPU): launch "
                             "train-crm and distill with configs/accelerate/ddp_multi_gpu.yaml or torchrun")
        if os.environ.get("FSDP_VERSION", "2") != "2":
            raise InputError("the LLM recipe shards with FSDP version 2 (torch's fully_shard): set fsdp_version: 2")
        for flag, key in (("FSDP_OFFLOAD_PARAMS", "fsdp_offload_params"),
                          ("FSDP_ACTIVATION_CHECKPOINTING", "fsdp_activation_checkpointing")):
            if _env_true(flag):
                raise InputError(f"{key} is not implemented by the LLM recipe: set {key}: false")
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if precision != "no":
        raise InputError(f"accelerate's mixed_precision={precision} is not applied by the recipes: set it to 'no' "
                         "and choose the LLM's precision with llm.dtype")


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


# ---- FSDP (train-llm): torch's fully_shard, one decoder layer per unit ----

def use_fsdp(requested: bool) -> bool:
    """FSDP when several processes run and either the config (llm_train.fsdp) or `accelerate launch` asks for it."""
    return world_size() > 1 and (requested or _env_true("ACCELERATE_USE_FSDP"))


def shard_model(model) -> None:
    """Shard E4SRec's decoder layers and then the rest (embeddings, W_in, W_out) over the ranks, in place.

    A layer's full weights exist only while it runs forward or backward. The prompt goes inline into every packed
    row, so that each layer runs once per step (the KV-cache pass would run it twice, and FSDP frees a layer's
    weights after its first backward)."""
    from torch.distributed.fsdp import fully_shard

    reshard = not _env_false("FSDP_RESHARD_AFTER_FORWARD")  # false: ZeRO-2-like, weights kept until backward
    for layer in model.decoder.layers:
        fully_shard(layer, reshard_after_forward=reshard)
    fully_shard(model, reshard_after_forward=reshard)
    model.inline_prompt = True


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
