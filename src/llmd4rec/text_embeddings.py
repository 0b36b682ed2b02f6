"""Item text embeddings for E4SRec's text-grounded item tokens (`llm.item_text`).

Placeholder with the final signature: the recipe already calls it, the computation is not in this module yet.
"""

from __future__ import annotations

import torch

from .config import Config
from .data.dataset import Dataset


def item_text_embeddings(cfg: Config, dataset: Dataset, device: torch.device | str) -> torch.Tensor | None:
    """[n_items + 1, D_txt] float tensor (row 0 padding, rows of items without text all zero), or None when
    llm.item_text is false."""
    if not cfg.llm.item_text:
        return None
    raise NotImplementedError("item text embeddings are not computed yet")
