"""Typed run configuration: YAML files under configs/, dotted command-line overrides, unknown keys are errors."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import InputError


@dataclass
class DataConfig:
    name: str = "synthetic"
    data_dir: str | None = None  # local copies laid out like ../shared/data; else $LLMD4REC_DATA, else download
    max_len: int = 50
    synthetic_users: int = 2000
    synthetic_items: int = 500
    seed: int = 0
    item_text: str | None = None  # CSV/TSV of item id and text columns; else the text shipped beside the dataset


@dataclass
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [5, 10, 20])
    exclude_seen: bool = True
    mode: str = "full"  # "full" ranking, or legacy "sampled" (target + n_negatives)
    n_negatives: int = 100
    memory_mb: int = 256  # score buffer budget: sets users per batch and items per chunk
    seed: int = 0


@dataclass
class SASRecConfig:
    hidden: int = 64
    n_layers: int = 2
    n_heads: int = 1
    dropout: float = 0.2
    max_len: int = 50
    tie_weights: bool = True
    text_init: bool = False  # item table starts from the text embeddings (section `text`), PCA-projected to `hidden`


@dataclass
class TrainConfig:
    epochs: int = 200
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    loss: str = "ce"  # ce | ce_chunked | sampled_ce | bce (the LLM: ce | ce_chunked)
    n_negatives: int = 256
    item_chunk: int = 65536  # ce_chunked: items per chunk, so memory stays samples x item_chunk floats
    precision: str = "bfloat16"  # float32 | bfloat16: the item-score matmuls of the CRM's training loss (models/bf16.py)
    patience: int = 10
    eval_every: int = 1
    grad_clip: float = 5.0
    warmup_steps: int = 0
    grad_accum: int = 1
    max_targets_per_user: int = 50
    seed: int = 42
    fsdp: bool = False  # LLM under torchrun: shard the backbone with FSDP (accelerate launch sets it from its config)
    zero_stage: int = 0  # LLM: DeepSpeed ZeRO stage 1, 2 or 3 (0: off; accelerate launch sets it from its config)


@dataclass
class E4SRecConfig:
    backbone: str = "smollm2"  # "smollm2" (embedded GGUF), a hub id, a local folder, or a .gguf path
    keep_layers: int | None = None  # keep only the first k decoder layers (CPU preset)
    dtype: str = "float32"  # the frozen backbone's weights and compute: float32 | bfloat16 | float16 (trainables: fp32)
    attention: str = "sdpa"  # the backbone's attention kernel: sdpa | eager
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: ["gate_proj", "up_proj", "down_proj"])
    instruction: str = (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\n"
        "Given the user's purchase history, predict next possible item to be purchased.\n\n### Input:\n"
    )
    response: str = "\n\n### Response:\n"
    max_len: int = 50
    share_prefix: bool = True
    all_prefix: bool = True
    item_text: bool = False  # item tokens W_in(id) + W_txt(text embedding); off: the paper's ID-only E4SRec


@dataclass
class TextConfig:
    """How the frozen LLM reads item text (text_embeddings.py): used by llm.item_text and crm.text_init."""
    backbone: str = "smollm2"  # any backbone llm.backbone accepts; its full depth is used
    fields: list[str] = field(default_factory=list)  # text fields to read, in order; empty: all but ids (asin)
    pooling: str = "mean"  # mean | last: the final hidden states averaged over the text's tokens, or the last one
    max_tokens: int = 64  # longer texts are cut
    batch_size: int = 32
    dtype: str = "bfloat16"  # the backbone's compute dtype while reading (float32 | bfloat16)


@dataclass
class DistillConfig:
    rounds: int = 2
    t1: float = 0.6
    t2: float = 0.2
    gamma: float = 1.0
    beta: float = 1.0
    t_squared: bool = False
    adaptive_weights: bool = True
    embedding_update: bool = True
    direction: str = "both"  # both | upward | downward
    cache_topk: int = 256
    positions: str = "all"  # all | last_k
    last_k: int = 50
    crm_epochs: int = 20  # upward phases: at most this many CRM epochs (early stopping on validation)
    llm_epochs: int = 1
    keep_start: bool = True  # a phase whose best distilled epoch validates no better than its start deploys the start
    upward_init: str = "continue"  # continue | scratch: the CRM continues from its weights, or restarts from a new init
    upward_lr: float | None = None  # learning rate of upward phases; unset: crm_train.lr
    teacher: str = "llm"  # llm | ensemble | self: upward teacher (self: a frozen copy of the CRM, the control)
    ensemble_alpha: float = 0.5  # teacher=ensemble: weight of the LLM's log-probabilities against the CRM's


@dataclass
class UpdateConfig:
    """`llmd4rec update`: a short continuation of the bundle's SASRec on the users with new events.

    Training keys not named here (batch size, loss, grad clip, seed) come from crm_train."""

    epochs: int = 5
    lr: float = 5e-4
    patience: int = 2
    kd_weight: float = 1.0  # KL to the bundle's own CRM (frozen): keeps what it learnt, from data and the LLM
    temperature: float = 1.0
    min_gain: float = 0.0  # refuse unless held-out NDCG@10 new >= old + min_gain
    neighbours: int = 10  # a new item starts as the mean embedding of up to this many related known items


@dataclass
class Config:
    run_dir: str = "runs"
    run_name: str | None = None
    seed: int = 42
    device: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    crm: SASRecConfig = field(default_factory=SASRecConfig)
    crm_train: TrainConfig = field(default_factory=TrainConfig)
    llm: E4SRecConfig = field(default_factory=E4SRecConfig)
    llm_train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=3, batch_size=16, lr=3e-4, weight_decay=0.1, patience=2, warmup_steps=100, grad_clip=1.0))
    distill: DistillConfig = field(default_factory=DistillConfig)
    text: TextConfig = field(default_factory=TextConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)
    crm_run: str | None = None  # reuse a trained CRM run folder
    llm_run: str | None = None  # reuse a trained LLM run folder



# a YAML tag or date-like scalar that cannot be built raises these from inside yaml's constructors
_YAML_ERRORS = (yaml.YAMLError, ValueError, TypeError, KeyError, OverflowError, RecursionError)


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if isinstance(value, str) and value.lower() in ("null", "none") and type(None) in args:
            return None
        return _coerce(value, inner[0], key, source)
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, list):
            raise InputError(f"config key '{key}' must be a list, got {value!r}", source)
        return [_coerce(v, args[0], key, source) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise InputError(f"config key '{key}' must be true or false, got {value!r}", source)
    if tp in (int, float):
        if isinstance(value, bool):
            raise InputError(f"config key '{key}' must be a number, got {value!r}", source)
        try:
            if tp is int:
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                return int(value) if not isinstance(value, str) else int(value, 10)
            return float(value)
        except (TypeError, ValueError):
            raise InputError(f"config key '{key}' must be {'an integer' if tp is int else 'a number'}, got {value!r}",
                             source) from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise InputError(f"config key '{key}' must be a string, got {value!r}", source)
        return str(value)
    raise InputError(f"config key '{key}' has an unsupported type", source)


def _apply(obj: Any, data: dict, prefix: str, source: str) -> None:
    if not isinstance(data, dict):
        raise InputError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping", source)
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise InputError(f"unknown config key '{key}'", source)
        current = getattr(obj, k)
        if dataclasses.is_dataclass(current):
            _apply(current, v, key + ".", source)
        else:
            setattr(obj, k, _coerce(v, hints[k], key, source))


def _set_dotted(cfg: Config, dotted: str, raw: str) -> None:
    parts = dotted.split(".")
    obj: Any = cfg
    for i, p in enumerate(parts[:-1]):
        if not dataclasses.is_dataclass(obj) or p not in {f.name for f in dataclasses.fields(obj)}:
            raise InputError(f"unknown config key '{'.'.join(parts[:i + 1])}'", "command line")
        obj = getattr(obj, p)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except _YAML_ERRORS:  # not YAML (or a YAML tag that cannot be built): take the text as it is
        value = raw
    _apply(obj, {parts[-1]: value}, ".".join(parts[:-1]) + "." if len(parts) > 1 else "", "command line")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    cfg = Config()
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise InputError("config file not found", path) from None
        except UnicodeDecodeError:
            raise InputError("config file is not UTF-8 text", path) from None
        except OSError as e:
            raise InputError(f"cannot read the config file ({e.strerror or e.__class__.__name__})", path) from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            raise InputError(f"invalid YAML ({getattr(e, 'problem', 'parse error')})", path,
                             mark.line + 1 if mark else None) from None
        except _YAML_ERRORS as e:
            raise InputError(f"invalid YAML value ({e.__class__.__name__})", path) from None
        _apply(cfg, data, "", str(path))
    for item in overrides or []:
        if "=" not in item:
            raise InputError(f"override '{item}' must look like key=value", "command line")
        key, raw = item.split("=", 1)
        _set_dotted(cfg, key.strip(), raw)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    from .io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
