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
def session(device_name: str) -> Iterator[torch.device]:
    """This process's device; when launched with WORLD_SIZE > 1 also the process group (nccl on GPUs, gloo on CPU),
    destroyed on exit unless it existed before. Each process takes the GPU numbered by its LOCAL_RANK."""
    _refuse_unsupported_accelerate_modes()
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


def _refuse_unsupported_accelerate_modes() -> None:
    """`accelerate launch` passes its config as environment variables that only an Accelerator reads; the recipes
    run plain DDP, so a launch asking for sharding or autocast would silently get neither: refuse it instead."""
    for flag, mode in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(flag, "").lower() == "true":
            raise InputError(f"the recipes train with DistributedDataParallel and do not implement {mode}: launch with "
                             "configs/accelerate/ddp_multi_gpu.yaml or torchrun")
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
