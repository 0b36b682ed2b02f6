"""The product-of-experts teacher ranked like any model: its ranks are those of the mixed log-probabilities."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmd4rec.config import SASRecConfig
from llmd4rec.distill.teacher import LogProbEnsemble
from llmd4rec.evaluation import compute_ranks
from llmd4rec.models.sasrec import SASRec

N_ITEMS = 40


def _model(seed: int) -> SASRec:
    torch.manual_seed(seed)
    return SASRec(N_ITEMS, SASRecConfig(hidden=16, max_len=8)).eval()


def _cases(seed: int = 0, users: int = 30):
    rng = np.random.default_rng(seed)
    inputs = [list(rng.integers(1, N_ITEMS + 1, size=int(rng.integers(1, 12)))) for _ in range(users)]
    return inputs, list(rng.integers(1, N_ITEMS + 1, size=users))


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_ensemble_ranks_equal_the_mixed_log_probabilities(alpha):
    """Chunked scoring (normalisers from encode) ranks exactly as the whole-row mixture computed by hand; alpha 0 and
    1 rank as the CRM and the other model alone."""
    crm, other = _model(0), _model(1)
    ensemble = LogProbEnsemble(crm, other, alpha)
    inputs, targets = _cases()
    ranks = compute_ranks(ensemble, inputs, targets, N_ITEMS, items_per_chunk=7, users_per_batch=4)

    class Mixed:
        max_len = 8

        def encode(self, histories):
            with torch.no_grad():
                zc, zo = crm.score_all(histories)[:, 1:], other.score_all(histories)[:, 1:]
            mixed = alpha * F.log_softmax(zo, 1) + (1 - alpha) * F.log_softmax(zc, 1)
            return torch.cat([torch.full((len(mixed), 1), float("-inf")), mixed], 1)

        def score_items(self, state, lo, hi):
            return state[:, lo:hi]

    expected = compute_ranks(Mixed(), inputs, targets, N_ITEMS)
    np.testing.assert_array_equal(ranks, expected)
    if alpha in (0.0, 1.0):
        alone = compute_ranks(other if alpha else crm, inputs, targets, N_ITEMS)
        np.testing.assert_array_equal(ranks, alone)
