"""Typed run configuration: YAML files under configs/, dotted command-line overrides, unknown keys are errors.

Every key is checked when the config is loaded, before a run folder exists, from its declaration alone:
its type (a `typing.Literal` lists the choices), and the rules given with `key(default, ...)`: a range
(`min`, `max`, `gt`, `lt`, applied to each element of a list), `nonempty` for lists, a `pattern` for strings
(a regular expression and what it means in words), and
`resume`, what `--resume` may change ("grow": only upward, such as epochs; "any": where the run runs, such as the
device), and `shape=True` for the keys that fix the data or a model's shapes, on which a reused run (crm_run,
llm_run) must agree (`shape="synthetic"`: only for the synthetic dataset). Rules that tie keys together are in
`_rule_problems`. Floats are always finite. How values are coerced and checked, and the keys that were renamed or
removed (an old file that still names one fails with the key to write instead), are in config_rules.py.

Each section holds only keys that its reader honours: `crm_train` is SASRec's training (batches of users),
`llm_train` is E4SRec's (batches of samples).
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .config_rules import (DEVICE, SEED, TEXT, YAML_ERRORS, check_rules, coerce, key, retired_in_file,
                           retired_problem, upgrade_retired)
from .errors import InputError


@dataclass
class DataConfig:
    name: str = key("synthetic", pattern=TEXT, shape=True)
    # local copies laid out like ../shared/data; else $LLMD4REC_DATA, else download
    data_dir: str | None = key(None, resume="any")
    synthetic_users: int = key(2000, min=1, shape="synthetic")
    synthetic_items: int = key(500, min=2, shape="synthetic")
    seed: int = key(0, **SEED, shape="synthetic")  # of the synthetic data
    # CSV/TSV of item id and text columns; else the text shipped beside the dataset
    item_text: str | None = key(None, pattern=TEXT)


@dataclass
class EvalConfig:
    ks: list[int] = key(factory=lambda: [5, 10, 20], min=1, nonempty=True)
    exclude_seen: bool = True
    mode: Literal["full", "sampled"] = "full"  # "full" ranking, or legacy "sampled" (target + n_negatives)
    n_negatives: int = key(100, min=1)
    memory_mb: int = key(256, min=1, resume="any")  # score buffer budget: sets users per batch and items per chunk
    seed: int = key(0, **SEED)


@dataclass
class SASRecConfig:
    hidden: int = key(64, min=1, shape=True)
    n_layers: int = key(2, min=1, shape=True)
    n_heads: int = key(1, min=1, shape=True)
    dropout: float = key(0.3, min=0, lt=1)
    max_len: int = key(50, min=1, shape=True)
    tie_weights: bool = key(True, shape=True)
    text_init: bool = False  # item table starts from the text embeddings (section `text`), PCA-projected to `hidden`


@dataclass
class CRMTrainConfig:
    """SASRec's training (training/crm.py)."""
    epochs: int = key(200, min=1, resume="grow")
    users_per_batch: int = key(128, min=1)  # each user brings all its positions
    lr: float = key(1e-3, gt=0)
    weight_decay: float = key(0.0, min=0)
    loss: Literal["ce", "ce_chunked", "sampled_ce", "bce"] = "ce"
    n_negatives: int = key(256, min=1)  # sampled_ce
    item_chunk: int = key(65536, min=1)  # ce_chunked: items per chunk, so memory stays positions x item_chunk floats
    # the item-score matmuls of the training loss (models/bf16.py); auto: bfloat16 where the hardware has it.
    # A resumed run may change it, as it may change the device (recorded in its config.yaml)
    precision: Literal["auto", "float32", "bfloat16"] = key("auto", resume="any")
    patience: int = key(10, min=1, resume="grow")
    eval_every: int = key(1, min=1)
    grad_clip: float = key(5.0, min=0)  # 0: no clipping
    seed: int = key(42, **SEED)


@dataclass
class LLMTrainConfig:
    """E4SRec's training (training/llm.py): validated after every epoch."""
    epochs: int = key(3, min=1, resume="grow")
    samples_per_batch: int = key(16, min=1)  # (user, position) samples; whole users fill each batch up to it
    lr: float = key(3e-4, gt=0)
    weight_decay: float = key(0.1, min=0)
    loss: Literal["ce", "ce_chunked"] = "ce"
    item_chunk: int = key(65536, min=1)  # ce_chunked: items per chunk, so memory stays samples x item_chunk floats
    patience: int = key(2, min=1, resume="grow")
    grad_clip: float = key(1.0, min=0)  # 0: no clipping
    warmup_steps: int = key(100, min=0)
    grad_accum: int = key(1, min=1)
    max_targets_per_user: int = key(50, min=0)  # 0: every target
    seed: int = key(42, **SEED)
    fsdp: bool = False  # under torchrun: shard the backbone with FSDP (accelerate launch sets it from its config)
    # DeepSpeed ZeRO stage 1, 2 or 3 (0: off; accelerate launch sets it from its config)
    zero_stage: Literal[0, 1, 2, 3] = 0


@dataclass
class E4SRecConfig:
    # "smollm2" (embedded GGUF), a hub id, a local folder, or a .gguf path
    backbone: str = key("smollm2", pattern=TEXT, shape=True)
    keep_layers: int | None = key(None, min=1, shape=True)  # keep only the first k decoder layers (CPU preset)
    # the frozen backbone's weights and compute (trainables: fp32)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attention: Literal["sdpa", "eager"] = "sdpa"  # the backbone's attention kernel
    lora_r: int = key(16, min=1, shape=True)
    lora_alpha: int = key(16, min=1)
    lora_dropout: float = key(0.05, min=0, lt=1)
    lora_targets: list[str] = key(factory=lambda: ["gate_proj", "up_proj", "down_proj"], nonempty=True, shape=True)
    instruction: str = (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\n"
        "Given the user's purchase history, predict next possible item to be purchased.\n\n### Input:\n"
    )
    response: str = "\n\n### Response:\n"
    max_len: int = key(50, min=1, shape=True)
    share_prefix: bool = True
    all_prefix: bool = True
    # item tokens W_in(id) + W_txt(text embedding); off: the paper's ID-only E4SRec
    item_text: bool = key(False, shape=True)
    # the item head: linear (the paper's W_out, one fresh row per item) or tied (an item's output vector is its
    # input token W_in(id) [+ W_txt(text)], plus a bias: every item, tail ones included, starts from its CRM row)
    item_head: Literal["linear", "tied"] = key("linear", shape=True)


@dataclass
class TextConfig:
    """How the frozen LLM reads item text (text_embeddings.py): used by llm.item_text and crm.text_init."""
    backbone: str = key("smollm2", pattern=TEXT)  # any backbone llm.backbone accepts; its full depth is used
    fields: list[str] = field(default_factory=list)  # text fields to read, in order; empty: all but ids (asin)
    # the final hidden states averaged over the text's tokens, or the last one
    pooling: Literal["mean", "last"] = "mean"
    max_tokens: int = key(64, min=1)  # longer texts are cut
    texts_per_batch: int = key(32, min=1)
    # the backbone's compute dtype while reading; auto: bfloat16 where the hardware has it (precision.py)
    dtype: Literal["auto", "float32", "bfloat16"] = key("auto", resume="any")


@dataclass
class DistillConfig:
    rounds: int = key(2, min=1)
    t1: float = key(0.6, gt=0)
    t2: float = key(0.2, gt=0)
    gamma: float = key(1.0, min=0)
    beta: float = key(1.0, min=0)
    t_squared: bool = False
    adaptive_weights: bool = True
    embedding_update: bool = True
    direction: Literal["both", "upward", "downward"] = "both"
    cache_topk: int = key(256, min=1)
    # users per batch while the LLM (or the ensemble) writes an upward teacher cache; a SASRec teacher reads 256
    cache_users_per_batch: int = key(64, min=1)
    positions: Literal["all", "last_k"] = "all"
    last_k: int = key(50, min=1)
    crm_epochs: int = key(20, min=1)  # upward phases: at most this many CRM epochs (early stopping on validation)
    llm_epochs: int = key(1, min=1)
    keep_start: bool = True  # a phase whose best distilled epoch validates no better than its start deploys the start
    # continue | scratch: the CRM continues from its weights, or restarts from a new init
    upward_init: Literal["continue", "scratch"] = "continue"
    upward_lr: float | None = key(None, gt=0)  # learning rate of upward phases; unset: crm_train.lr
    # upward teacher (self: a frozen copy of the CRM, the control)
    teacher: Literal["llm", "ensemble", "self"] = "llm"
    # teacher=ensemble: weight of the LLM's log-probabilities against the CRM's
    ensemble_alpha: float = key(0.5, min=0, max=1)
    # upward KD term: kl (the paper's KL at T2) or rank (the teacher's rank_k best items as weighted soft labels,
    # DLLM2Rec-style: weights from position, teacher confidence and teacher-student consistency; distill/losses.py)
    upward_loss: Literal["kl", "rank"] = "kl"
    rank_k: int = key(10, min=1)
    rank_lambda: float = key(1.0, gt=0)  # upward_loss=rank: position weight exp(-position / rank_lambda)
    # a distill run folder whose finished upward teacher caches this run copies instead of computing them again
    # (each is read only if built with this run's teacher settings; else it is rebuilt): upward sweeps of one teacher
    cache_from: str | None = key(None, pattern=TEXT, resume="any")


@dataclass
class UpdateConfig:
    """`llmd4rec update`: a short continuation of the bundle's SASRec on the users with new events.

    Training keys not named here (users per batch, loss, grad clip, seed) come from crm_train."""

    epochs: int = key(5, min=1)
    lr: float = key(5e-4, gt=0)
    patience: int = key(2, min=1)
    # KL to the bundle's own CRM (frozen): keeps what it learnt, from data and the LLM
    kd_weight: float = key(1.0, min=0)
    temperature: float = key(1.0, gt=0)
    min_gain: float = 0.0  # refuse unless held-out NDCG@10 new >= old + min_gain
    neighbours: int = key(10, min=1)  # a new item starts as the mean embedding of up to this many related known items


@dataclass
class Config:
    run_dir: str = key("runs", pattern=TEXT)
    run_name: str | None = key(None, pattern=(r"(?!\.\.?$)[^/\\\x00]+", "one folder name under run_dir"))
    seed: int = key(42, **SEED)
    device: str = key("auto", pattern=DEVICE, resume="any")  # auto | cpu | mps | cuda | cuda:N
    # also log metrics live to these (optional packages); metrics.jsonl is always written
    report_to: list[Literal["tensorboard", "mlflow"]] = key(factory=list, resume="any")
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    crm: SASRecConfig = field(default_factory=SASRecConfig)
    crm_train: CRMTrainConfig = field(default_factory=CRMTrainConfig)
    llm: E4SRecConfig = field(default_factory=E4SRecConfig)
    llm_train: LLMTrainConfig = field(default_factory=LLMTrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    text: TextConfig = field(default_factory=TextConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)
    crm_run: str | None = key(None, pattern=TEXT)  # reuse a trained CRM run folder
    llm_run: str | None = key(None, pattern=TEXT)  # reuse a trained LLM run folder


def _rule_problems(cfg: Config) -> list[tuple[str, str]]:
    """(key, problem) for each rule that ties keys together and fails."""
    out = []
    if cfg.crm.hidden % cfg.crm.n_heads:
        out.append(("crm.n_heads", f"must divide crm.hidden ({cfg.crm.hidden}), got {cfg.crm.n_heads}"))
    if cfg.distill.upward_loss == "rank" and cfg.distill.rank_k > cfg.distill.cache_topk:
        out.append(("distill.rank_k", f"must not exceed distill.cache_topk ({cfg.distill.cache_topk}): the teacher "
                                      f"cache may keep only that many items per sample, got {cfg.distill.rank_k}"))
    if 10 not in cfg.eval.ks:
        out.append(("eval.ks", f"must include 10 (early stopping and the tables use NDCG@10), got {cfg.eval.ks}"))
    return out


def _apply(obj: Any, data: dict, prefix: str, source: str) -> None:
    if not isinstance(data, dict):
        raise InputError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping", source)
    hints = typing.get_type_hints(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for k, v in data.items():
        dotted = f"{prefix}{k}"
        if k not in fields:
            raise InputError(retired_problem(dotted) or f"unknown config key '{dotted}'", source)
        current = getattr(obj, k)
        if dataclasses.is_dataclass(current):
            _apply(current, v, dotted + ".", source)
        else:
            value = coerce(v, hints[k], dotted, source)
            check_rules(value, fields[k].metadata, dotted, source)
            setattr(obj, k, value)


def _set_dotted(cfg: Config, dotted: str, raw: str) -> None:
    parts = dotted.split(".")
    obj: Any = cfg
    for i, p in enumerate(parts[:-1]):
        if not dataclasses.is_dataclass(obj) or p not in {f.name for f in dataclasses.fields(obj)}:
            raise InputError(f"unknown config key '{'.'.join(parts[:i + 1])}'", "command line")
        obj = getattr(obj, p)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except YAML_ERRORS:  # not YAML (or a YAML tag that cannot be built): take the text as it is
        value = raw
    _apply(obj, {parts[-1]: value}, ".".join(parts[:-1]) + "." if len(parts) > 1 else "", "command line")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, base: Config | None = None,
                saved: bool = False) -> Config:
    """`base` (default: the defaults), then the YAML file, then the dotted overrides; every key checked. A `saved`
    file is a run's or bundle's own config.yaml: retired keys in it are upgraded with a warning instead of refused,
    so runs and bundles made before a rename still resume, evaluate and serve."""
    cfg = copy.deepcopy(base) if base is not None else Config()
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
        except YAML_ERRORS as e:
            raise InputError(f"invalid YAML value ({e.__class__.__name__})", path) from None
        if saved and isinstance(data, dict):
            changes = upgrade_retired(data)
            if changes:
                print(f"warning: {path}: written before a config change, read as: {'; '.join(changes)}",
                      file=sys.stderr)
        retired = retired_in_file(data)
        if retired:
            raise InputError(retired, path)
        _apply(cfg, data, "", str(path))
    for item in overrides or []:
        if "=" not in item:
            raise InputError(f"override '{item}' must look like key=value", "command line")
        dotted, raw = item.split("=", 1)
        _set_dotted(cfg, dotted.strip(), raw)
    for dotted, problem in _rule_problems(cfg):
        raise InputError(f"config key '{dotted}' {problem}", "command line" if overrides else path)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def flat_keys(cfg: Config) -> dict[str, tuple[Any, typing.Mapping[str, Any]]]:
    """Every dotted key -> (value, its rules)."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update({f"{f.name}.{sub.name}": (getattr(value, sub.name), sub.metadata)
                        for sub in dataclasses.fields(value)})
        else:
            out[f.name] = (value, f.metadata)
    return out


def resume_changes(saved: Config, cfg: Config) -> list[str]:
    """The keys `cfg` changes against a run's saved config, as "key: old -> new"; InputError when a change is not
    one `--resume` allows (declared with `resume=`: "grow" only upward, "any" freely)."""
    old, new = flat_keys(saved), flat_keys(cfg)
    changes, refused = [], []
    for dotted, (value, rules) in new.items():
        before = old[dotted][0]
        if value == before:
            continue
        allowed = rules.get("resume") == "any" or (rules.get("resume") == "grow" and value > before)
        (changes if allowed else refused).append(f"{dotted}: {before!r} -> {value!r}")
    if refused:
        raise InputError(f"--resume continues a run under its own config.yaml; only limits may grow (epochs, "
                         f"patience) and the device or data folder change, not {', '.join(refused)}")
    return changes


def shape_mismatches(cfg: Config, other: Config, sections: tuple[str, ...]) -> list[str]:
    """The `shape=True` keys of these sections on which two configs disagree, as "key: other's vs cfg's"."""
    mine, theirs = flat_keys(cfg), flat_keys(other)
    synthetic = cfg.data.name.strip().lower() == "synthetic"
    return [f"{k}={theirs[k][0]!r} there, {mine[k][0]!r} here" for k, (v, rules) in mine.items()
            if (rules.get("shape") is True or (rules.get("shape") == "synthetic" and synthetic))
            and k.split(".")[0] in sections and theirs[k][0] != v]


def save_config(cfg: Config, path: str | Path, history: list[str] | None = None) -> None:
    """config.yaml; `history` lines (what each --resume changed) are kept at its top as comments."""
    from .io import atomic_write_text

    head = "".join(f"# {line}\n" for line in history or [])
    atomic_write_text(path, head + yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def config_history(path: str | Path) -> list[str]:
    """The `# resumed ...` comment lines at the top of a run's config.yaml."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.startswith("# "):
            break
        out.append(line[2:])
    return out


def resumed_line(changes: list[str]) -> str:
    return f"resumed {time.strftime('%Y-%m-%d %H:%M:%S')}: {'; '.join(changes)}"
