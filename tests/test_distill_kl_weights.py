"""Distillation's per-sample terms: the KL term, target ranks, and the adaptive weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from _kl_by_hand import _hand_kl
from llmd4rec.distill import kd_kl, target_ranks, weights_crm_to_llm, weights_llm_to_crm


# ---------------------------------------------------------------- kd_kl

def test_kd_kl_three_items_by_hand():
    s, t = [1.0, 2.0, 0.0], [0.5, 0.0, 1.5]
    # T = 0.5: s/T = [2, 4, 0], t/T = [1, 0, 3]
    zs = math.exp(2) + math.exp(4) + 1
    zt = math.exp(1) + 1 + math.exp(3)
    pt = [math.exp(1) / zt, 1 / zt, math.exp(3) / zt]
    ps = [math.exp(2) / zs, math.exp(4) / zs, 1 / zs]
    expected = sum(a * math.log(a / b) for a, b in zip(pt, ps))
    assert expected == pytest.approx(_hand_kl(s, t, 0.5))
    got = kd_kl(torch.tensor([s]), torch.tensor([t]), 0.5, ignore_first_column=False)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    got2 = kd_kl(torch.tensor([s]), torch.tensor([t]), 0.5, t_squared=True, ignore_first_column=False)
    assert got2.item() == pytest.approx(0.25 * expected, rel=1e-6)
    at_one = kd_kl(torch.tensor([s]), torch.tensor([t]), 1.0, ignore_first_column=False)
    assert at_one.item() == pytest.approx(_hand_kl(s, t, 1.0), rel=1e-6)
    # the PyTorch form named in METHOD.md §3
    ref = F.kl_div(F.log_softmax(torch.tensor([s]) / 0.5, -1), F.softmax(torch.tensor([t]) / 0.5, -1),
                   reduction="none").sum(-1)
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)


def test_kd_kl_zero_when_identical_and_teacher_detached():
    x = torch.randn(4, 9)
    assert torch.allclose(kd_kl(x, x.clone(), 0.2), torch.zeros(4), atol=1e-6)
    teacher = torch.randn(4, 9, requires_grad=True)
    student = torch.randn(4, 9, requires_grad=True)
    kd_kl(student, teacher, 0.6).sum().backward()
    assert teacher.grad is None and student.grad is not None


def test_kd_kl_ignores_padding_column_by_default():
    s, t = [1.0, 2.0, 0.0], [0.5, 0.0, 1.5]
    with_pad = kd_kl(torch.tensor([[50.0] + s]), torch.tensor([[-50.0] + t]), 0.5)
    assert with_pad.item() == pytest.approx(_hand_kl(s, t, 0.5), rel=1e-6)


def test_kd_kl_mask_removes_columns_from_both_and_gradient_is_finite():
    s = torch.tensor([[0.0, 1.0, 2.0, 0.0, 9.0]], requires_grad=True)
    t = torch.tensor([[0.0, 0.5, 0.0, 1.5, -3.0]])
    mask = torch.tensor([True, True, True, True, False])  # drop the last item as well as column 0
    kl = kd_kl(s, t, 0.5, mask=mask)
    assert kl.item() == pytest.approx(_hand_kl([1.0, 2.0, 0.0], [0.5, 0.0, 1.5], 0.5), rel=1e-6)
    kl.sum().backward()
    assert torch.isfinite(s.grad).all() and s.grad[0, 4] == 0 and s.grad[0, 0] == 0


def test_kd_kl_stable_for_large_logits_and_low_temperature():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(8, 200, generator=g) * 1e4
    t = torch.randn(8, 200, generator=g) * 1e4
    kl = kd_kl(s.requires_grad_(), t, 0.2)
    ref = kd_kl(s.detach().double(), t.double(), 0.2)
    assert torch.isfinite(kl).all()
    assert torch.allclose(kl.double(), ref, rtol=1e-5)
    kl.sum().backward()
    assert torch.isfinite(s.grad).all()


# ---------------------------------------------------------------- target_ranks

def test_target_ranks_ties_count_against_the_target():
    # rank = the other items 1..N-1 scored at least as high, as in evaluation.compute_ranks
    logits = torch.tensor([
        [99.0, 5.0, 3.0, 4.0, 1.0],   # target 1 is the best item; column 0 never counts: rank 0
        [0.0, 2.0, 2.0, 2.0, 1.0],    # target 2 tied with items 1 and 3: both count, rank 2
        [0.0, 2.0, 2.0, 3.0, 1.0],    # target 2: item 3 above and item 1 tied: rank 2
        [0.0, 1.0, 1.0, 1.0, 1.0],    # constant scores: last (n_items - 1), no credit
        [0.0, 1.0, 2.0, 3.0, float("nan")],  # a NaN target score counts as -inf: last
        [0.0, 1.0, 3.0, 2.0, 0.5],    # target 2 alone on top: rank 0
        [5.0, 1.0, 3.0, 2.0, 0.5],    # target 3 below item 2 only: rank 1
    ])
    targets = torch.tensor([1, 2, 2, 4, 4, 2, 3])
    r = target_ranks(logits, targets)
    assert r.dtype == torch.long
    assert r.tolist() == [0, 2, 2, 3, 3, 0, 1]


def test_target_ranks_agree_with_the_evaluator():
    from llmd4rec.evaluation import compute_ranks

    g = torch.Generator().manual_seed(5)
    logits = torch.randint(0, 4, (12, 9), generator=g).float()  # many ties
    targets = torch.randint(1, 9, (12,), generator=g)

    class Table:  # history [i + 1] scores row i of the table
        max_len = 1

        def encode(self, histories):
            return logits[histories[:, -1] - 1]

        def score_items(self, state, lo, hi):
            return state[:, lo:hi]

    expected = compute_ranks(Table(), [[i + 1] for i in range(12)], targets.tolist(), 8, exclude_seen=False)
    assert target_ranks(logits, targets).tolist() == expected.tolist()


def test_target_ranks_rejects_padding_target():
    with pytest.raises(ValueError):
        target_ranks(torch.zeros(1, 4), torch.tensor([0]))


# ---------------------------------------------------------------- weights

def _w(f, rc, rl):
    return f(torch.tensor([rc]), torch.tensor([rl])).item()


def test_weights_by_hand():
    # equal ranks -> 1, including both at rank 0
    for r in (0, 1, 7):
        assert _w(weights_crm_to_llm, r, r) == 1.0 and _w(weights_llm_to_crm, r, r) == 1.0
    # w1, teacher (CRM) better: r_l > r_c -> 1 + (r_l - r_c) / max(r_c, 1)
    assert _w(weights_crm_to_llm, 4, 6) == pytest.approx(1.5)
    assert _w(weights_crm_to_llm, 0, 1) == pytest.approx(2.0)      # max(0, 1) = 1 in the denominator
    assert _w(weights_crm_to_llm, 2, 10) == 2.0                     # 5 -> clipped at 2
    # w1, student (LLM) better: 1 - (r_c - r_l) / max(r_l, 1)
    assert _w(weights_crm_to_llm, 6, 4) == pytest.approx(0.5)
    assert _w(weights_crm_to_llm, 1, 0) == pytest.approx(0.0)      # 1 - 1/max(0, 1)
    assert _w(weights_crm_to_llm, 10, 2) == 0.0                     # -3 -> clipped at 0
    # w2, teacher (LLM) better: r_c > r_l -> 1 + (r_c - r_l) / max(r_l, 1)
    assert _w(weights_llm_to_crm, 6, 4) == pytest.approx(1.5)
    assert _w(weights_llm_to_crm, 3, 0) == 2.0                      # 1 + 3/1 -> clipped at 2
    # w2, student (CRM) better: 1 - (r_l - r_c) / max(r_c, 1)
    assert _w(weights_llm_to_crm, 4, 6) == pytest.approx(0.5)
    assert _w(weights_llm_to_crm, 0, 5) == 0.0                      # 1 - 5/1 -> clipped at 0
    w = weights_llm_to_crm(torch.tensor([6, 4, 5]), torch.tensor([4, 6, 5]))
    assert w.dtype == torch.float32 and w.tolist() == pytest.approx([1.5, 0.5, 1.0])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20000), st.integers(0, 20000)), min_size=1, max_size=20))
def test_weights_bounded_and_mirror_each_other(pairs):
    rc = torch.tensor([a for a, _ in pairs])
    rl = torch.tensor([b for _, b in pairs])
    w1, w2 = weights_crm_to_llm(rc, rl), weights_llm_to_crm(rc, rl)
    for w in (w1, w2):
        assert ((w >= 0) & (w <= 2)).all()
    assert torch.equal(w2, weights_crm_to_llm(rl, rc))
    # the teacher is trusted at least 1 exactly where it ranks the truth at least as well as the student
    assert torch.equal(w1 >= 1, rc <= rl) and torch.equal(w2 >= 1, rl <= rc)
