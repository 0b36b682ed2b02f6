"""`auto` precision: bfloat16 only where the hardware multiplies it natively, float32 everywhere else.

bfloat16 score matmuls run many times faster than float32 on CPUs with AMX or AVX-512 BF16 units and on recent
GPUs, but a CPU without them (AVX2 only) emulates bfloat16 and the same matmuls run far slower
(benchmarks/precision_probe.py measures both on a machine). No preset can fix one precision for every machine, so
the defaults ask for `auto` and each run's saved config.yaml records what it resolved to.
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

import torch


@lru_cache(maxsize=None)
def native_bfloat16(device_type: str) -> bool:
    """Whether this machine's `device_type` ("cpu", "cuda", ...) multiplies bfloat16 in hardware."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    return False


def resolve(name: str, device: torch.device | str) -> str:
    """A precision key's value on `device`: "auto" becomes "bfloat16" or "float32", anything else stays."""
    if name != "auto":
        return name
    return "bfloat16" if native_bfloat16(torch.device(device).type) else "float32"


def resolve_config(cfg, device: torch.device | str):
    """cfg with every `auto` precision resolved for `device`, so that the run's config.yaml says what ran."""
    return replace(cfg, crm_train=replace(cfg.crm_train, precision=resolve(cfg.crm_train.precision, device)),
                   text=replace(cfg.text, dtype=resolve(cfg.text.dtype, device)))
