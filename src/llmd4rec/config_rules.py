"""How a config key is declared and checked (config.py declares the keys and loads them).

`key(default, ...)` attaches the rules to a dataclass field; `coerce` turns a YAML or command-line value into the
field's type and `check_rules` applies the declared rules; `RETIRED` names the keys that were renamed or removed,
so that an old YAML file or override fails with one line that says what to write instead.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import field
from typing import Any, Callable, Literal

import yaml

from .errors import InputError


def key(default: Any = dataclasses.MISSING, *, factory: Callable[[], Any] | None = None, **rules: Any) -> Any:
    """A config field with validation rules (see config.py's docstring)."""
    unknown = set(rules) - {"min", "max", "gt", "lt", "nonempty", "pattern", "resume", "shape"}
    if unknown:
        raise TypeError(f"unknown config rule(s) {sorted(unknown)}")
    if factory is not None:
        return field(default_factory=factory, metadata=rules)
    return field(default=default, metadata=rules)


SEED = {"min": 0, "max": 2 ** 32 - 1}  # numpy's seeds
TEXT = (r".+", "a non-empty string")
DEVICE = (r"auto|cpu|mps|cuda(:\d+)?", "auto, cpu, mps, cuda or cuda:N")

_SASREC_NEVER = "SASRec's training never read it"
_E4SREC_NEVER = "E4SRec's training never read it"
# dotted key -> (its replacement, or None with why it went)
RETIRED: dict[str, tuple[str | None, str]] = {
    "crm_train.batch_size": ("crm_train.users_per_batch", "SASRec's batches are whole users"),
    "llm_train.batch_size": ("llm_train.samples_per_batch", "E4SRec's batches are counted in training samples; "
                             "an LLM teacher cache's users per batch is distill.cache_users_per_batch"),
    "text.batch_size": ("text.texts_per_batch", "item texts read per forward pass"),
    "data.max_len": (None, "nothing read it: crm.max_len and llm.max_len set the history length"),
    **{f"crm_train.{k}": (None, _SASREC_NEVER) for k in ("warmup_steps", "grad_accum", "max_targets_per_user")},
    **{f"crm_train.{k}": (None, f"SASRec trains with DDP; llm_train.{k} shards E4SRec")
       for k in ("fsdp", "zero_stage")},
    "llm_train.eval_every": (None, "E4SRec validates after every epoch"),
    "llm_train.n_negatives": (None, _E4SREC_NEVER),
    "llm_train.precision": (None, "llm.dtype sets E4SRec's precision"),
}


def retired_problem(dotted: str) -> str | None:
    """The one-line error for a retired key, or None for a key that never existed."""
    if dotted not in RETIRED:
        return None
    new, why = RETIRED[dotted]
    if new is not None:
        return f"config key '{dotted}' is now '{new}' ({why})"
    return f"config key '{dotted}' was removed ({why}): delete it"


def retired_in_file(data: Any) -> str | None:
    """One line for all the retired keys of a loaded YAML document (a run's saved config.yaml from before a rename
    names several), or None."""
    if not isinstance(data, dict):
        return None
    found = [k for k in (f"{section}.{k}" for section, keys in data.items() if isinstance(keys, dict) for k in keys)
             if k in RETIRED]
    if len(found) < 2:
        return retired_problem(found[0]) if found else None
    renamed = [f"{k} -> {RETIRED[k][0]}" for k in found if RETIRED[k][0]]
    removed = [k for k in found if not RETIRED[k][0]]
    return "retired config keys: " + "; ".join(
        (["rename " + ", ".join(renamed)] if renamed else []) + (["delete " + ", ".join(removed)] if removed else []))


def upgrade_retired(data: dict) -> list[str]:
    """Rewrite a run's or bundle's own saved config (written before a key was retired) in place: renamed keys take
    their new name, removed keys (never read) go. The old LLM batch size also sized the LLM teacher cache's batches,
    so it carries over to distill.cache_users_per_batch. Returns what changed, for one warning line."""
    changes = []
    for dotted in [f"{s}.{k}" for s, keys in data.items() if isinstance(keys, dict) for k in keys]:
        if dotted not in RETIRED:
            continue
        section, name = dotted.split(".")
        value = data[section].pop(name)
        new = RETIRED[dotted][0]
        if new is not None:
            new_section, new_name = new.split(".")
            data.setdefault(new_section, {}).setdefault(new_name, value)
            changes.append(f"{dotted} -> {new}")
        else:
            changes.append(f"{dotted} dropped")
        if dotted == "llm_train.batch_size" and isinstance(data.get("distill"), dict):
            data["distill"].setdefault("cache_users_per_batch", value)
    return changes


# a YAML tag or date-like scalar that cannot be built raises these from inside yaml's constructors
YAML_ERRORS = (yaml.YAMLError, ValueError, TypeError, KeyError, OverflowError, RecursionError)


def coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """`value` as type `tp` (a Literal's choices, a list, an optional); InputError naming `key` otherwise."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if isinstance(value, str) and value.lower() in ("null", "none") and type(None) in args:
            return None
        return coerce(value, inner[0], key, source)
    if origin is Literal:
        choices, original = ", ".join(map(str, args)), value
        try:
            value = coerce(value, type(args[0]), key, source)
        except InputError:
            value = None
        if value not in args:
            raise InputError(f"config key '{key}' must be one of {choices}, got {original!r}", source) from None
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]  # eval.ks=10 on the command line is the list [10]
        if not isinstance(value, list):
            raise InputError(f"config key '{key}' must be a list, got {value!r}", source)
        return [coerce(v, args[0], key, source) for v in value]
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
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            raise InputError(f"config key '{key}' must be {'an integer' if tp is int else 'a number'}, got {value!r}",
                             source) from None
        if not math.isfinite(number):
            raise InputError(f"config key '{key}' must be a finite number, got {value!r}", source)
        return number
    if tp is str:
        if isinstance(value, (dict, list)):
            raise InputError(f"config key '{key}' must be a string, got {value!r}", source)
        return str(value)
    raise InputError(f"config key '{key}' has an unsupported type", source)


_BOUNDS = {"min": (lambda v, b: v >= b, "at least"), "max": (lambda v, b: v <= b, "at most"),
           "gt": (lambda v, b: v > b, "greater than"), "lt": (lambda v, b: v < b, "less than")}


def check_rules(value: Any, rules: typing.Mapping[str, Any], key: str, source: str) -> None:
    """The rules declared with `key(...)`; a range applies to each element of a list."""
    if value is None:
        return
    if rules.get("nonempty") and not value:
        raise InputError(f"config key '{key}' must not be empty", source)
    for v in value if isinstance(value, list) else [value]:
        for name, (ok, words) in _BOUNDS.items():
            if name in rules and isinstance(v, (int, float)) and not ok(v, rules[name]):
                raise InputError(f"config key '{key}' must be {words} {rules[name]}, got {v!r}", source)
        if "pattern" in rules and isinstance(v, str) and not re.fullmatch(rules["pattern"][0], v):
            raise InputError(f"config key '{key}' must be {rules['pattern'][1]}, got {v!r}", source)
