"""MostPop: every user gets the catalogue ordered by training-set frequency."""

from __future__ import annotations

import torch


class MostPop:
    max_len = None

    def __init__(self, train: list[list[int]], n_items: int):
        counts = torch.zeros(n_items + 1)
        for seq in train:
            counts.index_add_(0, torch.as_tensor(seq, dtype=torch.long), torch.ones(len(seq)))
        counts[0] = 0
        self.n_items = n_items
        self.counts = counts

    def encode(self, histories: torch.Tensor) -> int:
        return histories.shape[0]

    def score_items(self, state: int, lo: int, hi: int) -> torch.Tensor:
        return self.counts[lo:hi].expand(state, hi - lo)

    def score_all(self, histories: torch.Tensor) -> torch.Tensor:
        return self.score_items(self.encode(histories), 0, self.n_items + 1)
