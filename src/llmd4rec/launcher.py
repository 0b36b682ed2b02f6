"""What `accelerate launch` asks of a run, read from the environment variables it sets (only an Accelerator reads
them otherwise): a mode no recipe implements is refused rather than silently run as plain DDP."""

from __future__ import annotations

import os

from .errors import InputError


def env_true(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("true", "1")


def env_false(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("false", "0")


def refuse_unsupported_modes(shards: bool) -> None:
    """`accelerate launch` passes its config as environment variables that only an Accelerator reads; a launch
    asking for a mode a recipe does not implement would silently get plain DDP: refuse it instead."""
    if env_true("ACCELERATE_USE_DEEPSPEED"):
        if not shards:
            raise InputError("only train-llm shards with DeepSpeed (the LLM backbone is what outgrows one GPU): launch "
                             "train-crm and distill with configs/accelerate/ddp_multi_gpu.yaml or torchrun")
        if os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
            raise InputError("the LLM recipe writes the DeepSpeed config itself (from llm_train and llm.dtype): give "
                             "deepspeed_config.zero_stage in the accelerate config instead of deepspeed_config_file")
        for flag in ("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"):
            if os.environ.get(flag, "none").lower() != "none":
                key = flag.removeprefix("ACCELERATE_DEEPSPEED_").lower()
                raise InputError(f"{key} is not implemented by the LLM recipe: set {key}: none")
        if env_true("ACCELERATE_DEEPSPEED_ZERO3_INIT"):
            raise InputError("zero3_init_flag is not implemented by the LLM recipe (each process loads the backbone, "
                             "then DeepSpeed partitions it): set zero3_init_flag: false")
    if env_true("ACCELERATE_USE_FSDP"):
        if not shards:
            raise InputError("only train-llm shards with FSDP (the LLM backbone is what outgrows one GPU): launch "
                             "train-crm and distill with configs/accelerate/ddp_multi_gpu.yaml or torchrun")
        if os.environ.get("FSDP_VERSION", "2") != "2":
            raise InputError("the LLM recipe shards with FSDP version 2 (torch's fully_shard): set fsdp_version: 2")
        for flag, key in (("FSDP_OFFLOAD_PARAMS", "fsdp_offload_params"),
                          ("FSDP_ACTIVATION_CHECKPOINTING", "fsdp_activation_checkpointing")):
            if env_true(flag):
                raise InputError(f"{key} is not implemented by the LLM recipe: set {key}: false")
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if precision != "no":
        raise InputError(f"accelerate's mixed_precision={precision} is not applied by the recipes: set it to 'no' "
                         "and choose the LLM's precision with llm.dtype")
