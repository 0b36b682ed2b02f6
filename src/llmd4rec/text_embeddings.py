"""Item text embeddings: the frozen LLM's own reading of each item's text, at full depth, computed once and cached.

They carry what IDs cannot: that two items share a brand, a product line or a category, including items with few
interactions. Two consumers: E4SRec's text-grounded item tokens (`llm.item_text`) and SASRec's text-initialised item
table (`crm.text_init`). The cache file is keyed by everything that changes the numbers (backbone identity, dtype,
pooling, token limit and the exact strings), so a changed setting never reads stale vectors.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from .config import Config, TextConfig
from .data.dataset import Dataset
from .data.registry import cache_dir
from .data.text import ID_FIELDS, item_strings
from .errors import InputError
from .io import load_tensors, save_tensors
from .precision import resolve


def text_fields(cfg: TextConfig, dataset: Dataset) -> list[str]:
    if cfg.fields:
        return list(cfg.fields)
    if dataset.item_text is None:
        return []
    return [f for f in dataset.item_text if f not in ID_FIELDS]


def _backbone_identity(name: str) -> str:
    """What pins the backbone's weights: a file's name and size, a folder's config, or the hub id."""
    from .models.backbone import _smollm2_path

    path = _smollm2_path() if name == "smollm2" else Path(name)
    if path.is_file():
        return f"{path.name}:{path.stat().st_size}"
    if (path / "config.json").is_file():
        return hashlib.sha256((path / "config.json").read_bytes()).hexdigest()
    return name


@torch.no_grad()
def encode_texts(texts: list[str], cfg: TextConfig, device: torch.device | str = "cpu",
                 backbone=None, tokenizer=None) -> torch.Tensor:
    """[len(texts), hidden] pooled final hidden states of the backbone, float32; "" gives a zero row."""
    from tqdm import tqdm

    from .models.backbone import load_backbone

    cfg = replace(cfg, dtype=resolve(cfg.dtype, device))
    if backbone is None:
        backbone, tokenizer = load_backbone(cfg.backbone, None, cfg.dtype)
    decoder = backbone.get_decoder().to(device).eval()
    hidden = decoder.config.hidden_size
    out = torch.zeros(len(texts), hidden)
    todo = [i for i, t in enumerate(texts) if t]
    if not todo:
        return out
    ids = tokenizer([texts[i] for i in todo], add_special_tokens=False, truncation=True,
                    max_length=cfg.max_tokens)["input_ids"]
    order = sorted(range(len(todo)), key=lambda j: len(ids[j]))  # similar lengths together: little padding
    for s in tqdm(range(0, len(order), cfg.texts_per_batch), desc="reading item text", leave=False, mininterval=5):
        batch = order[s:s + cfg.texts_per_batch]
        width = max(len(ids[j]) for j in batch)
        x = torch.zeros(len(batch), width, dtype=torch.long)  # any valid id: padding is masked out
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for r, j in enumerate(batch):
            x[r, :len(ids[j])] = torch.tensor(ids[j])
            mask[r, :len(ids[j])] = 1
        h = decoder(input_ids=x.to(device), attention_mask=mask.to(device)).last_hidden_state.float()
        mask = mask.to(h.device)
        if cfg.pooling == "mean":
            pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        else:
            pooled = h[torch.arange(len(batch)), mask.sum(1) - 1]
        out[[todo[j] for j in batch]] = pooled.cpu()
    if not torch.isfinite(out).all():
        raise InputError(f"the backbone produced non-finite text embeddings (dtype {cfg.dtype})", cfg.backbone)
    return out


def encode_item_text(cfg: Config, dataset: Dataset, device: torch.device | str = "cpu") -> torch.Tensor:
    """[n_items + 1, hidden] text embeddings of the dataset's items (zero rows: padding, items without text),
    read from the cache when the same backbone already read the same strings the same way."""
    strings = item_strings(dataset, text_fields(cfg.text, dataset))
    key = json.dumps({"backbone": cfg.text.backbone, "identity": _backbone_identity(cfg.text.backbone),
                      "dtype": resolve(cfg.text.dtype, device), "pooling": cfg.text.pooling,
                      "max_tokens": cfg.text.max_tokens,
                      "strings": hashlib.sha256("\n".join(strings).encode()).hexdigest()}, sort_keys=True)
    path = cache_dir() / "text" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"
    if path.exists():
        try:
            return load_tensors(path)["text"]
        except (InputError, KeyError) as e:
            print(f"warning: {e}; reading the item text again", file=sys.stderr, flush=True)
    table = encode_texts(strings, cfg.text, device)
    save_tensors(path, {"text": table}, metadata={"key": key})
    return table


def item_text_embeddings(cfg: Config, dataset: Dataset, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """E4SRec's text table when llm.item_text is on, else None: centred over the items with text and scaled to a
    root-mean-square row norm of 1 (rows without text stay zero), about the size of a CRM item row (Beauty's SASRec:
    0.7). Adam moves each W_txt entry by about the learning rate whatever its input's scale, so rows of unit-variance
    entries (norm 24 for 576 dimensions) let the text tokens outgrow the ID tokens within steps: on Beauty the
    tied-head E4SRec then trained a nat worse than without text."""
    if not cfg.llm.item_text:
        return None
    table = encode_item_text(cfg, dataset, device)
    has_text = table.abs().sum(1) > 0
    rows = table[has_text] - table[has_text].mean(0)
    table[has_text] = rows / rows.pow(2).sum(1).mean().sqrt().clamp(min=1e-12)
    return table.to(device)


def project_to_width(table: torch.Tensor, width: int, std: float) -> torch.Tensor:
    """PCA of the text rows to `width` dimensions, scaled so the entries have standard deviation `std` (the item
    table's init scale); rows without text (all zero) get the usual random init instead of a shared vector."""
    has_text = table.abs().sum(1) > 0
    if table.shape[1] < width or int(has_text.sum()) < width:
        raise InputError(f"crm.text_init needs at least crm.hidden={width} text dimensions and items with text, got "
                         f"{table.shape[1]} dimensions and {int(has_text.sum())} items")
    rows = table[has_text].double()
    rows = rows - rows.mean(0)
    _, _, v = torch.linalg.svd(rows, full_matrices=False)
    proj = (rows @ v[:width].T).float()
    proj = proj * (std / proj.std())
    out = torch.randn(len(table), width) * std
    out[has_text] = proj
    out[0] = 0
    return out


def init_item_table_from_text(model, cfg: Config, dataset: Dataset) -> None:
    """SASRec's crm.text_init: its item table starts from the text embeddings, at its usual init scale."""
    table = encode_item_text(cfg, dataset)
    with torch.no_grad():
        w = model.item_emb.weight
        w.copy_(project_to_width(table, w.shape[1], float(w[1:].std())).to(w.device))
