"""A seeded synthetic dataset, shipped so that every model runs end to end without any download.

Items belong to latent topics; a user's next topic usually follows a fixed topic-to-topic successor
(otherwise it stays or jumps at random) and the item inside a topic is drawn from Zipf-like
popularity. The next item is therefore predictable from the last one, so a sequential model clearly
beats a popularity ranking, while global popularity still has a long tail.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from .dataset import Dataset

_ADJECTIVES = (
    "Amber Bold Bright Calm Classic Cosmic Crisp Deep Gentle Golden Grand Hidden Lively Lucky Misty "
    "Modern Noble Quiet Rapid Rustic Silent Silver Smooth Solar Swift Tiny Velvet Vivid Wild Young"
).split()
_NOUNS = (
    "Anchor Arrow Basket Beacon Bottle Bridge Candle Canvas Compass Crown Drum Feather Garden Harbor "
    "Kettle Lantern Mirror Orbit Pebble Pillow Ribbon River Saddle Shelf Signal Spoon Thread Tower Wagon"
).split()
_TOPICS = (
    "Kitchen Garden Travel Music Fitness Office Beauty Toys Books Camping Coffee Cinema Pets Winter "
    "Beach Craft Gaming Baby Tools Tea"
).split()

_FOLLOW, _STAY = 0.6, 0.25  # next topic: its successor, the same one, else uniform at random
_MIN_LEN, _MAX_LEN, _MEAN_EXTRA = 5, 50, 8


def _titles(topic_of: np.ndarray, n_topics: int, rng: np.random.Generator) -> list[str]:
    """Adjective + noun + topic word, distinct within a topic (a number is added past 900 per topic)."""
    titles = [""] * len(topic_of)
    combos = len(_ADJECTIVES) * len(_NOUNS)
    for t in range(n_topics):
        word = _TOPICS[t]
        members = np.flatnonzero(topic_of == t)
        picks = rng.permutation(max(combos, len(members)))
        for k, item in enumerate(members):
            c = int(picks[k])
            adj, noun = _ADJECTIVES[c % combos // len(_NOUNS)], _NOUNS[c % len(_NOUNS)]
            titles[item] = f"{adj} {noun} {word}" + (f" {c // combos + 1}" if c >= combos else "")
    return titles


def generate(n_users: int = 2000, n_items: int = 500, seed: int = 0) -> Dataset:
    """Deterministic for a given (n_users, n_items, seed); internal id == original id."""
    if n_users < 1 or n_items < 2:
        raise InputError(f"synthetic dataset needs at least 1 user and 2 items, got {n_users} and {n_items}")
    rng = np.random.default_rng(seed)
    n_topics = int(np.clip(n_items // 25, 1, len(_TOPICS)))
    topic_of = rng.permutation(n_items) % n_topics  # item index (internal id - 1) -> topic
    weight = 1.0 / (1.0 + rng.permutation(n_items))  # Zipf(1) over a random popularity rank
    cycle = rng.permutation(n_topics)
    successor = np.empty(n_topics, dtype=np.int64)
    successor[cycle] = np.roll(cycle, -1)  # one random cycle through all topics
    members = [np.flatnonzero(topic_of == t) for t in range(n_topics)]
    cdfs = [np.cumsum(weight[m]) / weight[m].sum() for m in members]

    lengths = np.minimum(_MIN_LEN + rng.geometric(1.0 / _MEAN_EXTRA, n_users) - 1, _MAX_LEN)
    topic = rng.integers(n_topics, size=n_users)
    steps = np.zeros((n_users, int(lengths.max())), dtype=np.int64)
    for s in range(steps.shape[1]):
        if s:
            u = rng.random(n_users)
            jump = rng.integers(n_topics, size=n_users)
            topic = np.where(u < _FOLLOW, successor[topic], np.where(u < _FOLLOW + _STAY, topic, jump))
        draw = rng.random(n_users)
        for t in np.unique(topic):
            rows = np.flatnonzero(topic == t)
            pick = np.minimum(np.searchsorted(cdfs[t], draw[rows], side="right"), len(members[t]) - 1)
            steps[rows, s] = members[t][pick] + 1
    titles = [""] + _titles(topic_of, n_topics, rng)
    return Dataset(
        name="synthetic",
        sequences=[steps[u, : lengths[u]].tolist() for u in range(n_users)],
        n_items=n_items,
        item_ids=["<pad>"] + [str(i) for i in range(1, n_items + 1)],
        user_ids=[str(u) for u in range(1, n_users + 1)],
        titles=titles,
        item_text={"title": titles},  # the words follow the topics: text that says which items go together
        source=f"synthetic(users={n_users}, items={n_items}, seed={seed})",
    )
