"""The in-memory dataset and its leave-one-out split, shared by every model."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Dataset:
    """Chronological item sequences with internal item ids 1..n_items (0 is padding)."""

    name: str
    sequences: list[list[int]]
    n_items: int
    item_ids: list[str]  # item_ids[i] = original id of internal id i; item_ids[0] = "<pad>"
    user_ids: list[str]
    titles: list[str] | None = None  # titles[i] for internal id i, "" where unknown
    item_text: dict[str, list[str]] | None = None  # field -> text of internal id i, "" where unknown (data/text.py)
    source: str = ""
    duplicates_dropped: int = 0  # rows repeating (user, item, timestamp) exactly, dropped by the reader

    @property
    def n_users(self) -> int:
        return len(self.sequences)

    @property
    def n_interactions(self) -> int:
        return sum(len(s) for s in self.sequences)

    def stats(self) -> dict[str, float | int | str]:
        n = self.n_interactions
        return {
            "dataset": self.name,
            "users": self.n_users,
            "items": self.n_items,
            "interactions": n,
            "avg_len": round(n / max(self.n_users, 1), 2),
            "density": n / max(self.n_users * self.n_items, 1),
            "duplicates_dropped": self.duplicates_dropped,
        }


@dataclass
class Split:
    """Leave-one-out: train = items[:-2], valid input items[:-2] -> items[-2], test input items[:-1] -> items[-1]."""

    train: list[list[int]]
    valid_inputs: list[list[int]]
    valid_targets: list[int]
    test_inputs: list[list[int]]
    test_targets: list[int]
    n_items: int
    eval_users: list[int] = field(default_factory=list)  # dataset row of each valid/test case


def leave_one_out(dataset: Dataset) -> Split:
    """Users with fewer than 3 interactions have no valid/test case and train on everything."""
    train, vi, vt, ti, tt, users = [], [], [], [], [], []
    for u, seq in enumerate(dataset.sequences):
        if len(seq) < 3:
            train.append(list(seq))
            continue
        train.append(list(seq[:-2]))
        vi.append(list(seq[:-2]))
        vt.append(seq[-2])
        ti.append(list(seq[:-1]))
        tt.append(seq[-1])
        users.append(u)
    return Split(train, vi, vt, ti, tt, dataset.n_items, users)


def pad_left(histories: list[list[int]], max_len: int | None = None) -> torch.Tensor:
    """Right-align each history (latest item last), keeping its latest max_len items; 0 pads."""
    if max_len is None:
        max_len = max((len(h) for h in histories), default=1)
    max_len = max(max_len, 1)
    out = np.zeros((len(histories), max_len), dtype=np.int64)
    for r, h in enumerate(histories):
        h = h[-max_len:]
        if h:
            out[r, max_len - len(h):] = h
    return torch.from_numpy(out)


def padding_start(histories: torch.Tensor) -> int:
    """The first column that holds an item in some row (the last column if none does): the columns before it are
    padding everywhere and can be dropped exactly, since positions count back from the latest item."""
    used = (histories != 0).any(0).nonzero()
    return int(used[0, 0]) if len(used) else histories.shape[1] - 1


def all_positions(train: list[list[int]], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One row per user: inputs seq[:-1] and next-item targets seq[1:], both left-padded to max_len."""
    rows = [s[-(max_len + 1):] for s in train if len(s) >= 2]
    return pad_left([r[:-1] for r in rows], max_len), pad_left([r[1:] for r in rows], max_len)
