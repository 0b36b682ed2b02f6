"""Growing SASRec's item table for items that arrived after training.

A new item's first embedding is the mean of the embeddings of known items related to it: those whose titles share
its rarest words (idf-weighted word overlap) when it came with a title, else those next to it in the users'
histories, else all known items. Averaging shrinks the vector, so a new item starts near the middle of every
ranking, not at the top, until training has seen it.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import torch

from .config import SASRecConfig
from .models.sasrec import SASRec

WINDOW = 3  # history positions on either side that count as "next to" an item


def title_words(title: str | None) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9]+", (title or "").lower()) if len(w) > 1 and not w.isdigit()}


def related_by_title(new_titles: dict[int, str | None], titles: list[str | None], k: int) -> dict[int, list[int]]:
    """new id -> up to k known ids (1..len(titles)-1) ranked by the idf weight of the title words they share."""
    postings: dict[str, list[int]] = {}
    for i, t in enumerate(titles[1:], 1):
        for w in title_words(t):
            postings.setdefault(w, []).append(i)
    n = max(len(titles) - 1, 1)
    out = {}
    for new, title in new_titles.items():
        score: Counter[int] = Counter()
        for w in title_words(title):
            for i in postings.get(w, ()):
                score[i] += math.log(n / len(postings[w]))
        best = _top(score, k)
        if best:
            out[new] = best
    return out


def related_by_history(histories: list[list[int]], n_known: int, k: int) -> dict[int, list[int]]:
    """new id (> n_known) -> up to k known ids seen most often within WINDOW positions of it."""
    near: dict[int, Counter[int]] = {}
    for h in histories:
        for p, item in enumerate(h):
            if item > n_known:
                c = near.setdefault(item, Counter())
                c.update(j for j in h[max(0, p - WINDOW):p + WINDOW + 1] if 0 < j <= n_known)
    return {i: _top(c, k) for i, c in near.items() if c}


def _top(score: Counter[int], k: int) -> list[int]:
    """The k best-scoring ids with a positive score, ties broken by the smaller id."""
    return sorted((i for i, s in score.items() if s > 0), key=lambda i: (-score[i], i))[:k]


def grow_rows(weight: torch.Tensor, n_total: int, related: dict[int, list[int]]) -> torch.Tensor:
    """[n_known + 1, d] -> [n_total + 1, d]: known rows kept, new rows the mean of their related rows."""
    n_known = weight.shape[0] - 1
    out = torch.empty(n_total + 1, weight.shape[1], dtype=weight.dtype)
    out[:n_known + 1] = weight
    fallback = weight[1:].mean(0)
    for i in range(n_known + 1, n_total + 1):
        out[i] = weight[related[i]].mean(0) if related.get(i) else fallback
    return out


def grow_sasrec(model: SASRec, cfg: SASRecConfig, n_total: int, related: dict[int, list[int]]) -> SASRec:
    """A SASRec over n_total items holding `model`'s weights, its item table(s) grown by `grow_rows`."""
    state = dict(model.state_dict())
    for key in ("item_emb.weight", "out_emb.weight"):
        if key in state:
            state[key] = grow_rows(state[key], n_total, related)
    grown = SASRec(n_total, cfg)
    grown.load_state_dict(state)
    return grown
