"""Head/tail metrics and the better-than share, hand-computed; ranks that reproduce evaluate_split."""

import numpy as np
import pytest
import torch

from llmd4rec.analysis import better_share, head_items, head_tail_metrics, split_ranks
from llmd4rec.config import SASRecConfig, load_config
from llmd4rec.data import leave_one_out, load_dataset
from llmd4rec.evaluation import evaluate_split, metrics_from_ranks
from llmd4rec.models.sasrec import SASRec


def test_head_items_are_the_most_interacted_with_share():
    train = [[1, 2, 2, 3], [2, 3, 5], [3]]  # counts: 3 -> 3, 2 -> 3, 1 -> 1, 5 -> 1, 4 -> 0
    head = head_items(train, 5, share=0.4)
    assert head.tolist() == [False, False, True, True, False, False]


def test_head_tail_metrics_split_users_by_their_target():
    head = np.array([False, True, False, False])
    ranks = np.array([0, 3, 20, 1])
    out = head_tail_metrics(ranks, [1, 2, 1, 3], head, ks=(1, 5))
    assert out["head"]["users"] == 2 and out["tail"]["users"] == 2
    assert out["head"]["HR@1"] == 0.5 and out["head"]["HR@5"] == 0.5  # ranks 0 and 20
    assert out["tail"]["HR@1"] == 0.0 and out["tail"]["HR@5"] == 1.0  # ranks 3 and 1
    assert out["tail"]["NDCG@5"] == pytest.approx((1 / np.log2(5) + 1 / np.log2(3)) / 2)


def test_better_share_counts_strictly_lower_ranks():
    assert better_share(np.array([0, 5, 2, 7]), np.array([1, 5, 9, 3])) == {"better": 0.5, "equal": 0.25,
                                                                             "worse": 0.25}


def test_split_ranks_reproduce_evaluate_split():
    ds = load_dataset("synthetic", synthetic_users=120, synthetic_items=40)
    split = leave_one_out(ds)
    torch.manual_seed(0)
    model = SASRec(ds.n_items, SASRecConfig(hidden=16, n_heads=1, max_len=20)).eval()
    cfg = load_config(None, ["eval.memory_mb=1"]).eval
    for which in ("valid", "test"):
        ranks = split_ranks(model, split, cfg, which)
        assert metrics_from_ranks(ranks, cfg.ks) == pytest.approx(evaluate_split(model, split, cfg, which))
