"""A tiny random decoder saved like a downloaded model folder: tests and benchmarks exercise the real
E4SRec code paths offline, in seconds, with `llm.backbone=<folder>`."""

from __future__ import annotations

from pathlib import Path


def save_tiny_backbone(folder: str | Path, seed: int = 0) -> Path:
    """A random 2-layer Qwen2 (hidden 32, 4 heads, 2 KV heads) and a byte-level tokenizer with no merges."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok)
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)
