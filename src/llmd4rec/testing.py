"""A tiny random decoder saved like a downloaded model folder, and its tokenizer: tests and benchmarks exercise the
real E4SRec code paths offline, in seconds, with `llm.backbone=<folder>`."""

from __future__ import annotations

from pathlib import Path


def tiny_tokenizer():
    """A byte-level tokenizer with no merges (256 tokens), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def save_tiny_backbone(folder: str | Path, seed: int = 0, hidden: int = 32, layers: int = 2, heads: int = 4,
                       kv_heads: int = 2, intermediate: int = 64, dtype: str = "float32") -> Path:
    """A random Qwen2 (by default 2 layers, hidden 32, 4 heads, 2 KV heads) and `tiny_tokenizer`; larger shapes
    stand in for real backbones where only speed and memory matter."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=512)
    AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


def wait_until_healthy(proc, port: int, tries: int = 300) -> bool:
    """Poll a started `llmd4rec serve` process's /health on loopback (0.1 s apart) until it answers 200; False if
    the process exits or the tries run out (the caller reports it its own way)."""
    import time

    import httpx

    for _ in range(tries):
        if proc.poll() is not None:
            return False
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return True
        except httpx.TransportError:
            time.sleep(0.1)
    return False
