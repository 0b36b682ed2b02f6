"""What the test_serve_* files share: the tiny model's size and the reference ranking a served top-K must equal.

The fixtures that train and export that model (`run`, `bundle`, `client`) are in conftest.py, so that both files
use one trained model.
"""

import json

import pytest
import torch

from llmd4rec.data.dataset import pad_left

N_ITEMS, MAX_LEN = 60, 12


def reference(model, histories, k, exclude_seen):
    """score_all + exclude-seen + torch.topk, straight from the trained model: (internal ids, scores) per row."""
    with torch.no_grad():
        scores = model.score_all(pad_left(histories, model.max_len))
    scores[:, 0] = float("-inf")
    out = []
    for r, h in enumerate(histories):
        if exclude_seen:
            scores[r, h] = float("-inf")
        top = torch.topk(scores[r], k)
        out.append((top.indices.tolist(), top.values.tolist()))
    return out


def assert_same(answer, ref, run):
    ids, scores = ref
    assert [r["item"] for r in answer["items"]] == [run.dataset.item_ids[i] for i in ids]
    assert [r["score"] for r in answer["items"]] == pytest.approx(scores, abs=1e-5)


def post(client, path, obj):
    return client.post(path, content=json.dumps(obj))
