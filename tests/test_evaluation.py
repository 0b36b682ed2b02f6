import math

import numpy as np
import pytest
import torch

from llmd4rec.evaluation import (compute_ranks, compute_sampled_ranks, evaluate, metrics_from_ranks,
                                 plan_batches, rank_batches)


class FixedScores:
    """A scorer that returns a given score row per user (by the user's row in the batch order)."""

    max_len = None

    def __init__(self, scores: torch.Tensor):
        self.scores = scores
        self.n_items = scores.shape[1] - 1
        self.calls = 0

    def encode(self, histories):
        start = self.calls
        self.calls += histories.shape[0]
        return self.scores[start:start + histories.shape[0]]

    def score_items(self, state, lo, hi):
        return state[:, lo:hi]


def test_metrics_by_hand():
    m = metrics_from_ranks(np.array([0, 1, 4, 10, 25]), ks=(5, 10))
    assert m["HR@5"] == pytest.approx(3 / 5)
    assert m["NDCG@5"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6)) / 5)
    assert m["MRR@5"] == pytest.approx((1 + 1 / 2 + 1 / 5) / 5)
    assert m["HR@10"] == pytest.approx(3 / 5)
    assert m["HR@10"] == m["HR@5"]  # rank 10 is the 11th place: outside the top 10


def test_ranks_ties_count_against_target():
    # items 1..5; user 0 target 3 ties with item 1; user 1 target 2 scores strictly highest
    scores = torch.tensor([[0, 5.0, 1.0, 5.0, 2.0, 0.0],
                           [0, 1.0, 9.0, 1.0, 1.0, 1.0]])
    ranks = compute_ranks(FixedScores(scores), [[4], [1]], [3, 2], 5, exclude_seen=False)
    assert ranks.tolist() == [1, 0]


def test_constant_scorer_gets_no_credit():
    scores = torch.zeros(3, 8)
    ranks = compute_ranks(FixedScores(scores), [[1], [2], [3]], [4, 5, 6], 7, exclude_seen=False)
    assert ranks.tolist() == [6, 6, 6]
    ranks = compute_ranks(FixedScores(scores), [[1], [2], [3]], [4, 5, 6], 7, exclude_seen=True)
    assert ranks.tolist() == [5, 5, 5]


def test_exclude_seen_by_hand():
    # target 4; items 1 and 2 score higher but item 1 is in the history
    scores = torch.tensor([[100.0, 9.0, 8.0, 1.0, 5.0, 0.0]])
    assert compute_ranks(FixedScores(scores), [[1, 3]], [4], 5, exclude_seen=False).tolist() == [2]
    assert compute_ranks(FixedScores(scores.clone()), [[1, 3]], [4], 5, exclude_seen=True).tolist() == [1]


def test_repeated_target_stays_rankable_and_padding_column_ignored():
    scores = torch.tensor([[1e9, 1.0, 7.0, 3.0]])  # column 0 is padding, never ranked
    assert compute_ranks(FixedScores(scores), [[2, 1]], [2], 3, exclude_seen=True).tolist() == [0]


def test_nan_target_ranks_last():
    scores = torch.tensor([[0.0, float("nan"), 1.0, 2.0]])
    assert compute_ranks(FixedScores(scores), [[3]], [1], 3, exclude_seen=False).tolist() == [2]


def test_chunked_equals_unchunked():
    g = torch.Generator().manual_seed(0)
    n_users, n_items = 37, 53
    scores = torch.randint(0, 6, (n_users, n_items + 1), generator=g).float()  # many ties
    hists = [torch.randint(1, n_items + 1, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
             for _ in range(n_users)]
    targets = torch.randint(1, n_items + 1, (n_users,), generator=g).tolist()
    full = compute_ranks(FixedScores(scores), hists, targets, n_items, users_per_batch=n_users,
                         items_per_chunk=n_items + 1)
    for ub, ic in ((5, 7), (1, 1), (16, 50)):
        chunked = compute_ranks(FixedScores(scores), hists, targets, n_items, users_per_batch=ub, items_per_chunk=ic)
        assert np.array_equal(full, chunked)
    # and equal to a plain numpy count
    for r in range(n_users):
        s = scores[r].numpy()
        competing = [i for i in range(1, n_items + 1) if i != targets[r] and i not in hists[r]]
        assert full[r] == sum(s[i] >= s[targets[r]] for i in competing)


def test_tiny_memory_budget_still_exact():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(20, 301, generator=g)
    hists = [[1 + i] for i in range(20)]
    targets = [100 + i for i in range(20)]
    a = compute_ranks(FixedScores(scores), hists, targets, 300, memory_mb=512)
    b = compute_ranks(FixedScores(scores), hists, targets, 300, users_per_batch=3, items_per_chunk=17)
    assert np.array_equal(a, b)


def test_sampled_mode_is_labelled_and_seeded():
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(10, 501, generator=g)
    hists = [[i + 1] for i in range(10)]
    targets = [200 + i for i in range(10)]
    m = evaluate(FixedScores(scores), hists, targets, 500, mode="sampled", seed=3)
    assert all(k.startswith("sampled_") for k in m)
    r1 = compute_sampled_ranks(FixedScores(scores), hists, targets, 500, seed=3)
    r2 = compute_sampled_ranks(FixedScores(scores), hists, targets, 500, seed=3)
    assert np.array_equal(r1, r2) and r1.max() <= 100


def test_sampled_ranks_against_every_unseen_item_when_too_few_are_left():
    """A user with fewer unseen items than n_negatives (the draw used to loop forever) is ranked against all of
    them, as full ranking with exclude_seen ranks; such a user draws nothing, so the others' negatives stay put."""
    g = torch.Generator().manual_seed(4)
    scores = torch.randn(3, 9, generator=g)
    hists = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6, 7], [1]]
    targets = [6, 8, 2]
    sampled = compute_sampled_ranks(FixedScores(scores.clone()), hists, targets, 8, n_negatives=5)
    full = compute_ranks(FixedScores(scores.clone()), hists, targets, 8)
    assert sampled[:2].tolist() == full[:2].tolist() and sampled[1] == 0
    alone = compute_sampled_ranks(FixedScores(scores[2:].clone()), hists[2:], targets[2:], 8, n_negatives=5)
    assert sampled[2] == alone[0]


class BagOfItems:
    """Scores from the sum of the history's item vectors: depends on each user's own history only."""

    max_len = 6

    def __init__(self, n_items: int, trims_padding: bool):
        g = torch.Generator().manual_seed(1)
        self.emb = torch.randn(n_items + 1, 4, generator=g)
        self.emb[0] = 0
        self.out = torch.randn(n_items + 1, 4, generator=g)
        self.trims_padding = trims_padding

    def encode(self, histories):
        return self.emb[histories].sum(1)

    def score_items(self, state, lo, hi):
        return state @ self.out[lo:hi].T


def test_length_sorted_batches_give_the_same_ranks():
    """A model that trims padding is evaluated in batches of similar history length; every user keeps its rank."""
    g = torch.Generator().manual_seed(2)
    n_users, n_items = 41, 30
    hists = [torch.randint(1, n_items + 1, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
             for _ in range(n_users)]
    targets = torch.randint(1, n_items + 1, (n_users,), generator=g).tolist()
    plain = compute_ranks(BagOfItems(n_items, False), hists, targets, n_items, users_per_batch=4)
    by_length = compute_ranks(BagOfItems(n_items, True), hists, targets, n_items, users_per_batch=4)
    assert np.array_equal(plain, by_length) and plain.max() > 0


def test_shards_of_one_plan_add_up_to_the_ranks():
    """Batches of one plan scored apart, as the ranks of a sharded evaluation score them, and summed give
    compute_ranks' ranks: each shard leaves 0 for the users it did not score."""
    g = torch.Generator().manual_seed(3)
    n_users, n_items = 23, 30
    hists = [torch.randint(1, n_items + 1, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
             for _ in range(n_users)]
    targets = torch.randint(1, n_items + 1, (n_users,), generator=g).tolist()
    model = BagOfItems(n_items, True)
    batches, chunk = plan_batches(model, hists, n_items, max_len=model.max_len, users_per_batch=4, items_per_chunk=7)
    shards = [rank_batches(model, hists, targets, n_items, batches[r::2], chunk, max_len=model.max_len)
              for r in range(2)]
    whole = compute_ranks(model, hists, targets, n_items, users_per_batch=4, items_per_chunk=7)
    assert np.array_equal(shards[0][0] + shards[1][0], whole) and whole.max() > 0
    assert not (shards[0][1] + shards[1][1]).any()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_target_ranks_last_never_first(bad):
    """All rankable items count against a non-finite target: 3 items, none seen, so rank 2 (the last place)."""
    scores = torch.tensor([[0.0, bad, 1.0, 2.0]])
    assert compute_ranks(FixedScores(scores), [[3]], [1], 3, exclude_seen=False).tolist() == [2]
    assert compute_ranks(FixedScores(scores.clone()), [[3]], [1], 3, exclude_seen=True).tolist() == [1]


def test_all_nan_scorer_ranks_every_target_last():
    n_items = 6
    scores = torch.full((4, n_items + 1), float("nan"))
    hists, targets = [[1], [2, 3], [4], [5]], [2, 4, 6, 1]
    ranks = compute_ranks(FixedScores(scores), hists, targets, n_items, exclude_seen=True)
    # rankable: items 1..6 minus the target and the other seen items
    assert ranks.tolist() == [n_items - 1 - len(set(h) - {t}) for h, t in zip(hists, targets)]
    m = evaluate(FixedScores(scores.clone()), hists, targets, n_items, ks=(5, 10), exclude_seen=True)
    assert m["HR@10"] == 1.0 and m["NDCG@10"] < 0.5  # last place inside a tiny catalogue, never first
    sampled = compute_sampled_ranks(FixedScores(scores.clone()), hists, targets, n_items, n_negatives=3)
    assert sampled.tolist() == [3, 3, 3, 3]


def test_nan_item_outranks_a_finite_target():
    # target 2 scores 5; item 1 is NaN (counts against), item 3 scores 1 (does not)
    scores = torch.tensor([[0.0, float("nan"), 5.0, 1.0]])
    assert compute_ranks(FixedScores(scores), [[3]], [2], 3, exclude_seen=False).tolist() == [1]
    assert compute_ranks(FixedScores(scores.clone()), [[1]], [2], 3, exclude_seen=True).tolist() == [0]


def test_non_finite_padding_column_is_ignored():
    scores = torch.tensor([[float("nan"), 1.0, 3.0, 2.0]])
    assert compute_ranks(FixedScores(scores), [[1]], [2], 3, require_finite="in a test").tolist() == [0]


def test_require_finite_raises_with_where_it_stands():
    scores = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, float("nan"), 2.0, 3.0]])
    with pytest.raises(FloatingPointError, match=r"non-finite scores for 1 of 2 users in phase 'crm', epoch 3"):
        compute_ranks(FixedScores(scores), [[1], [2]], [3, 3], 3, require_finite="in phase 'crm', epoch 3")
    with pytest.raises(FloatingPointError, match="1 of 2 users"):
        compute_sampled_ranks(FixedScores(scores.clone()), [[1], [2]], [3, 3], 3, n_negatives=1,
                              require_finite="x")
