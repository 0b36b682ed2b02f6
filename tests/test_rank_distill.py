"""The ranking alternative of the upward KD term (distill.upward_loss=rank): weights by hand, invariances, the
teacher's short list read back from either cache mode, and the KD hook that uses it."""

from __future__ import annotations

import math

import pytest
import torch

from llmd4rec.config import load_config
from llmd4rec.distill import TeacherCache
from llmd4rec.distill.losses import rank_distill
from llmd4rec.distill.teacher import kd_hook
from llmd4rec.errors import InputError


def test_rank_distill_by_hand():
    """N = 4 items, teacher's best two: items 3 then 1 (logits 2 and 1), T = 1, lambda = 1. The student's own top
    two are items 3 and 4, so only item 3 is consistent."""
    student = torch.tensor([[0.0, 1.0, 0.0, 3.0, 2.0]])  # column 0 is padding
    got = rank_distill(student, torch.tensor([[3, 1]]), torch.tensor([[2.0, 1.0]]), 1.0, 1.0)
    z = sum(math.exp(v) for v in (1.0, 0.0, 3.0, 2.0))
    log_p3, log_p1 = 3.0 - math.log(z), 1.0 - math.log(z)
    position = [1 / (1 + math.exp(-1)), math.exp(-1) / (1 + math.exp(-1))]
    confidence = [math.exp(2) / (math.exp(2) + math.exp(1)), math.exp(1) / (math.exp(2) + math.exp(1))]
    consistency = [1.0, 0.0]
    w = [(a + b + c) / 3 for a, b, c in zip(position, confidence, consistency)]
    assert float(got[0]) == pytest.approx(-(w[0] * log_p3 + w[1] * log_p1), rel=1e-6)


def test_rank_distill_without_consistent_items_averages_two_weights():
    student = torch.tensor([[0.0, 5.0, 4.0, 0.0, 0.0]])  # own top two: items 1 and 2
    got = rank_distill(student, torch.tensor([[3, 4]]), torch.tensor([[0.0, 0.0]]), 1.0, 1.0)
    log_p = torch.log_softmax(student[0, 1:], 0)
    position = [1 / (1 + math.exp(-1)), math.exp(-1) / (1 + math.exp(-1))]
    w = [(position[0] + 0.5) / 2, (position[1] + 0.5) / 2]
    assert float(got[0]) == pytest.approx(-(w[0] * float(log_p[2]) + w[1] * float(log_p[3])), rel=1e-6)


def test_rank_distill_weights_sum_to_one_and_shift_invariant():
    """A uniform student gives log N whatever the weights (they sum to 1); adding a constant to a row changes
    nothing; the gradient is softmax(student) - weights: p on every item outside the teacher's list, and it sums to
    0 over a row (the weights sum to 1)."""
    g = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randperm(50, generator=g)[:7] + 1 for _ in range(6)])
    vals = torch.randn(6, 7, generator=g).sort(1, descending=True).values
    uniform = torch.zeros(6, 51)
    assert torch.allclose(rank_distill(uniform, idx, vals, 0.5, 2.0), torch.full((6,), math.log(50)))
    student = torch.randn(6, 51, generator=g, requires_grad=True)
    loss = rank_distill(student, idx, vals, 0.5, 2.0)
    assert torch.allclose(loss, rank_distill(student.detach() + 3.0, idx, vals, 0.5, 2.0), atol=1e-5)
    loss.sum().backward()
    taught = torch.zeros(6, 51, dtype=torch.bool).scatter(1, idx, True)
    taught[:, 0] = True  # padding: no gradient, checked below
    p = torch.cat([torch.zeros(6, 1), torch.softmax(student.detach()[:, 1:], 1)], 1)
    assert torch.allclose(student.grad[~taught], p[~taught], atol=1e-7)
    assert torch.allclose(student.grad.sum(1), torch.zeros(6), atol=1e-6)
    assert torch.all(student.grad[:, 0] == 0)  # padding takes no mass


def _cache(path, teacher, mode, k=8):
    targets = torch.randint(1, teacher.shape[1], (len(teacher),), generator=torch.Generator().manual_seed(1))
    w = TeacherCache.create(path, teacher.shape[0], teacher.shape[1] - 1, k, 0.5, mode=mode)
    w.write(0, teacher, targets)
    return w.finalize(), targets


def test_top_items_agree_across_cache_modes(tmp_path):
    teacher = torch.randn(20, 41, generator=torch.Generator().manual_seed(2))
    rows = torch.arange(20).flip(0)
    full, _ = _cache(tmp_path / "full", teacher, "full")
    topk, _ = _cache(tmp_path / "topk", teacher, "topk")
    a_idx, a_val = full.top_items(rows, 5)
    b_idx, b_val = topk.top_items(rows, 5)
    assert torch.equal(a_idx, b_idx) and torch.allclose(a_val, b_val, atol=1e-2)
    assert torch.equal(a_idx, teacher[rows, 1:].topk(5).indices + 1)
    with pytest.raises(ValueError, match="8 best items"):
        topk.top_items(rows, 9)


def test_kd_hook_with_rank_equals_rank_distill_times_w2(tmp_path):
    teacher = torch.randn(12, 31, generator=torch.Generator().manual_seed(3))
    cache, targets = _cache(tmp_path / "c", teacher, "full")
    index = torch.arange(12).reshape(3, 4)  # 3 users x 4 positions, sample i at (i // 4, i % 4)
    student = torch.randn(12, 31, generator=torch.Generator().manual_seed(4))
    users, cols = torch.arange(12) // 4, torch.arange(12) % 4
    plain = kd_hook(cache, index, 0.5, False, False, "crm", rank=(4, 1.0))(users, cols, student, targets)
    idx, vals = cache.top_items(torch.arange(12), 4)
    assert float(plain) == pytest.approx(0.5 * float(rank_distill(student, idx, vals, 0.5, 1.0).mean()), rel=1e-6)
    weighted = kd_hook(cache, index, 0.5, False, True, "crm", rank=(4, 1.0))(users, cols, student, targets)
    assert float(weighted) != pytest.approx(float(plain))


def test_rank_k_above_cache_topk_is_a_config_error():
    with pytest.raises(InputError, match="distill.rank_k"):
        load_config(None, ["distill.upward_loss=rank", "distill.rank_k=300", "distill.cache_topk=256"])
    load_config(None, ["distill.rank_k=300", "distill.cache_topk=256"])  # not used by the KL: not an error
