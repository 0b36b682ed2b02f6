"""Distillation building blocks: the KL term, target ranks, the adaptive weights, and the teacher cache."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from llmd4rec.distill import (TeacherCache, kd_kl, target_ranks, weights_crm_to_llm,
                              weights_llm_to_crm)
from llmd4rec.distill import kl as kl_module
from llmd4rec.errors import InputError


def _softmax(xs, T):
    e = [math.exp(x / T) for x in xs]
    return [v / sum(e) for v in e]


def _hand_kl(student, teacher, T):
    ps, pt = _softmax(student, T), _softmax(teacher, T)
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps))


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


# ---------------------------------------------------------------- teacher cache

def _peaked(n_samples, n_items, seed=0, noise=0.5):
    """SASRec-like logits: dot products with 64-d item embeddings, a few items far above the bulk."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n_items + 1, 64, generator=g) * 0.6
    h = torch.randn(n_samples, 64, generator=g)
    teacher = h @ emb.T
    student = (h + noise * torch.randn(n_samples, 64, generator=g)) @ emb.T
    targets = torch.randint(1, n_items + 1, (n_samples,), generator=g)
    return student, teacher, targets


def _build(path, teacher, targets, k, T, mode, batch=16):
    w = TeacherCache.create(path, teacher.shape[0], teacher.shape[1] - 1, k, T, mode=mode)
    for start in range(0, teacher.shape[0], batch):
        w.write(start, teacher[start:start + batch], targets[start:start + batch])
    return w.finalize()


def test_full_mode_matches_live_kl_and_ranks(tmp_path):
    student, teacher, targets = _peaked(48, 600)
    rows = torch.arange(48).flip(0)  # any order
    for T, rtol in ((0.2, 5e-3), (0.6, 2e-3)):
        cache = _build(tmp_path / f"c{T}", teacher, targets, k=32, T=T, mode="auto")
        assert cache.mode == "full"
        live = kd_kl(student[rows], teacher[rows], T, t_squared=True)
        got = cache.kl(student[rows], rows, t_squared=True)
        # fp16 storage of max-shifted logits is the only approximation ...
        assert torch.allclose(got, live, rtol=rtol, atol=1e-5)
        # ... and is exact against the same rounding done live
        shifted = teacher[:, 1:] - teacher[:, 1:].max(1, keepdim=True).values
        rounded = torch.cat([teacher[:, :1], shifted.half().float()], 1)
        assert torch.allclose(got, kd_kl(student[rows], rounded[rows], T, t_squared=True), rtol=1e-5, atol=1e-6)
        assert torch.equal(cache.target_ranks(rows, targets[rows]), target_ranks(teacher[rows], targets[rows]))


def test_topk_mode_equals_coarsened_kl_by_hand(tmp_path):
    # distinct logits on a 1/8 grid within 16 of the row max: the max-shifted values are exact in fp16, so
    # the only difference from the coarsened KL worked out here is float32 arithmetic
    g = torch.Generator().manual_seed(1)
    n, k, T = 40, 5, 0.6
    teacher = torch.stack([torch.randperm(128, generator=g)[:n + 1] for _ in range(6)]).float() / 8 - 8
    student = torch.randn(6, n + 1, generator=g) * 2
    targets = torch.randint(1, n + 1, (6,), generator=g)
    cache = _build(tmp_path / "c", teacher, targets, k=k, T=T, mode="topk")
    got = cache.kl(student, torch.arange(6))
    for i in range(6):
        t, s = teacher[i, 1:].double().tolist(), student[i, 1:].double().tolist()
        pt, ps = _softmax(t, T), _softmax(s, T)
        top = sorted(range(n), key=lambda j: -t[j])[:k]
        rest = [j for j in range(n) if j not in top]
        bt = [pt[j] for j in top] + [sum(pt[j] for j in rest)]
        bs = [ps[j] for j in top] + [sum(ps[j] for j in rest)]
        hand = sum(a * math.log(a / b) for a, b in zip(bt, bs))
        assert got[i].item() == pytest.approx(hand, rel=1e-5, abs=1e-7)
        assert hand <= _hand_kl(s, t, T) + 1e-12  # coarsening never increases the KL
    assert torch.equal(cache.target_ranks(torch.arange(6)), target_ranks(teacher, targets))


def test_topk_mode_close_to_live_kl_on_peaked_logits(tmp_path):
    student, teacher, targets = _peaked(48, 1500, seed=2)
    rows = torch.arange(48)
    for T, k, rtol in ((0.2, 64, 5e-3), (0.6, 256, 5e-3)):
        cache = _build(tmp_path / f"c{T}", teacher, targets, k=k, T=T, mode="topk")
        assert cache.mode == "topk" and cache.k == k
        live = kd_kl(student, teacher, T)
        got = cache.kl(student, rows)
        assert torch.allclose(got, live, rtol=rtol, atol=1e-4)
        assert torch.equal(cache.target_ranks(rows, targets), target_ranks(teacher, targets))


def test_topk_kl_gradient_flows_to_student(tmp_path):
    student, teacher, targets = _peaked(8, 300, seed=3)
    cache = _build(tmp_path / "c", teacher, targets, k=16, T=0.2, mode="topk")
    s = student.clone().requires_grad_()
    cache.kl(s, torch.arange(8)).sum().backward()
    assert torch.isfinite(s.grad).all() and s.grad[:, 1:].abs().sum() > 0 and (s.grad[:, 0] == 0).all()


def _coarsened_kl_autograd(student, idx, log_pt, T):
    """The plain formulation of the top-k KL (masked logsumexp for the tail), in float64 autograd ops."""
    s = student / T
    s = torch.cat([torch.full_like(s[:, :1], float("-inf")), s[:, 1:]], 1)
    lse = s.logsumexp(1, keepdim=True)
    tail = s.scatter(1, idx, float("-inf")).logsumexp(1, keepdim=True)
    log_ps = torch.cat([s.gather(1, idx), tail], 1) - lse
    return (log_pt.exp() * (log_pt - log_ps)).sum(1)


def test_topk_kl_fast_path_equals_plain_autograd(tmp_path, monkeypatch):
    """The hand-written forward/backward equals the autograd formulation in float64, on ordinary rows, on a
    row whose student tail mass is ~1e-40 (underflows a max-shifted float32 exp), and on a flat row; rows are
    processed in blocks of 2 here, as a large batch is."""
    monkeypatch.setattr(kl_module, "_BLOCK_ELEMENTS", 802)
    student, teacher, targets = _peaked(12, 400, seed=5)
    student[0, 1:] *= 60  # extreme: nearly all the student's mass on one item
    student[1, 1:] = 0.0
    cache = _build(tmp_path / "c", teacher, targets, k=16, T=0.2, mode="topk")
    rows = torch.arange(12)
    s = student.clone().double().requires_grad_()
    got = cache.kl(s, rows)
    g_out = torch.linspace(0.5, 1.5, 12, dtype=torch.float64)
    (got * g_out).sum().backward()
    idx = torch.from_numpy(np.array(cache._arrays["topk_idx"])).long()
    log_tail = torch.from_numpy(np.array(cache._arrays["log_tail"]))[:, None]
    top = torch.from_numpy(np.array(cache._arrays["topk_val"])).float()
    # the teacher side as the cache forms it (float32); the student side is what is compared
    log_pt = torch.cat([F.log_softmax(top / 0.2, 1) + torch.log(-torch.expm1(log_tail)), log_tail], 1).double()
    ref_in = student.clone().double().requires_grad_()
    ref = _coarsened_kl_autograd(ref_in, idx, log_pt, 0.2)
    (ref * g_out).sum().backward()
    assert torch.allclose(got, ref, rtol=1e-9, atol=1e-10)
    assert torch.allclose(s.grad, ref_in.grad, rtol=1e-7, atol=1e-12)
    assert (s.grad[:, 0] == 0).all()
    # in float32 the fast path stays finite and close
    s32 = student.clone().requires_grad_()
    got32 = cache.kl(s32, rows)
    got32.sum().backward()
    assert torch.isfinite(got32).all() and torch.isfinite(s32.grad).all()
    assert torch.allclose(got32.double(), ref.detach(), rtol=1e-4, atol=1e-4)
    # the student's target ranks come out of the same pass, equal to target_ranks (ties included)
    tied = student.clone()
    tied[2, 1:] = tied[2, 1:].round()
    kl_again, ranks = cache.kl_and_student_ranks(tied, rows, targets)
    assert torch.equal(ranks, target_ranks(tied, targets)) and torch.allclose(kl_again, cache.kl(tied, rows))


def test_full_mode_fast_path_equals_kd_kl_autograd(tmp_path, monkeypatch):
    """Mode full's hand-written forward/backward equals kd_kl through autograd, in float64, on the stored rows
    (in blocks of 3 rows)."""
    monkeypatch.setattr(kl_module, "_BLOCK_ELEMENTS", 903)
    student, teacher, targets = _peaked(10, 300, seed=6)
    student[0, 1:] *= 40
    cache = _build(tmp_path / "c", teacher, targets, k=8, T=0.2, mode="full")
    rows = torch.arange(10)
    stored = torch.cat([torch.zeros(10, 1), torch.from_numpy(np.array(cache._arrays["logits"])).float()], 1)
    g_out = torch.linspace(0.5, 1.5, 10, dtype=torch.float64)
    s = student.clone().double().requires_grad_()
    got = cache.kl(s, rows, t_squared=True)
    (got * g_out).sum().backward()
    ref_in = student.clone().double().requires_grad_()
    ref = kd_kl(ref_in, stored.double(), 0.2, t_squared=True)
    (ref * g_out).sum().backward()
    assert torch.allclose(got, ref, rtol=1e-9, atol=1e-12)
    assert torch.allclose(s.grad, ref_in.grad, rtol=1e-7, atol=1e-12) and (s.grad[:, 0] == 0).all()
    _, ranks = cache.kl_and_student_ranks(student, rows, targets)
    assert torch.equal(ranks, target_ranks(student, targets))


def test_auto_mode_uses_byte_threshold(tmp_path):
    small = TeacherCache.create(tmp_path / "a", 10, 100, 8, 0.2)
    big = TeacherCache.create(tmp_path / "b", 10, 100, 8, 0.2, full_max_bytes=1000)
    assert small.mode == "full" and big.mode == "topk"
    with pytest.raises(ValueError):
        TeacherCache.create(tmp_path / "c", 10, 100, 100, 0.2, mode="topk")


def test_unfinalised_missing_truncated_corrupt_caches_raise(tmp_path):
    student, teacher, targets = _peaked(20, 50)
    with pytest.raises(InputError, match="not a teacher cache"):
        TeacherCache.open(tmp_path / "nothing")
    w = TeacherCache.create(tmp_path / "c", 20, 50, 8, 0.2, mode="topk")
    w.write(0, teacher[:10], targets[:10])
    with pytest.raises(InputError, match="unfinished.*10 rows"):
        TeacherCache.open(tmp_path / "c")
    with pytest.raises(ValueError, match="10 of 20 rows"):
        w.finalize()
    w.write(10, teacher[10:], targets[10:])
    w.finalize()
    TeacherCache.open(tmp_path / "c")

    data = tmp_path / "c" / "topk_val.npy"
    raw = data.read_bytes()
    data.write_bytes(raw[:-7])
    with pytest.raises(InputError, match="truncated"):
        TeacherCache.open(tmp_path / "c")
    flipped = bytearray(raw)
    flipped[-3] ^= 0xFF
    data.write_bytes(bytes(flipped))
    with pytest.raises(InputError, match="corrupt"):
        TeacherCache.open(tmp_path / "c")
    data.write_bytes(raw)
    header = tmp_path / "c" / "header.json"
    header.write_text("{not json")
    with pytest.raises(InputError):
        TeacherCache.open(tmp_path / "c")
    header.write_text(json.dumps({"format": "llmd4rec-teacher-cache", "version": 1}))
    with pytest.raises(InputError, match="malformed"):
        TeacherCache.open(tmp_path / "c")


def test_target_check_catches_a_cache_built_for_other_samples(tmp_path):
    _, teacher, targets = _peaked(12, 40)
    cache = _build(tmp_path / "c", teacher, targets, k=4, T=0.2, mode="full")
    with pytest.raises(InputError, match="other samples"):
        cache.target_ranks(torch.arange(12), targets.roll(1))


def test_resume_partially_written_cache(tmp_path):
    student, teacher, targets = _peaked(30, 80, seed=4)
    ref = _build(tmp_path / "ref", teacher, targets, k=8, T=0.2, mode="topk")

    w = TeacherCache.create(tmp_path / "c", 30, 80, 8, 0.2, mode="topk", info={"teacher": "llm-r1"})
    w.write(0, teacher[:10], targets[:10])
    w.write(20, teacher[20:24], targets[20:24])
    del w  # crash: never finalised

    w = TeacherCache.create(tmp_path / "c", 30, 80, 8, 0.2, mode="topk", info={"teacher": "llm-r1"}, resume=True)
    assert w.rows_done == 14
    pending = w.pending_ranges(batch_size=4)
    assert pending == [(10, 14), (14, 18), (18, 20), (24, 28), (28, 30)]
    for lo, hi in pending:
        w.write(lo, teacher[lo:hi], targets[lo:hi])
    cache = w.finalize()
    assert cache.info == {"teacher": "llm-r1"}
    rows = torch.arange(30)
    assert torch.equal(cache.kl(student, rows), ref.kl(student, rows))
    assert torch.equal(cache.target_ranks(rows, targets), ref.target_ranks(rows, targets))
    for name in ("topk_idx", "topk_val", "log_tail", "ranks", "targets"):
        np.testing.assert_array_equal(np.load(tmp_path / "c" / f"{name}.npy"),
                                      np.load(tmp_path / "ref" / f"{name}.npy"))

    # resuming with other parameters (another teacher) starts over; the old header is gone at once
    w = TeacherCache.create(tmp_path / "c", 30, 80, 8, 0.2, mode="topk", info={"teacher": "llm-r2"}, resume=True)
    assert w.rows_done == 0
    with pytest.raises(InputError, match="unfinished"):
        TeacherCache.open(tmp_path / "c")


class _CountingTeacher(torch.nn.Module):
    """An LLM-like teacher with fixed logits per (user, position); counts the samples it scores."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits, self.scored = logits, 0

    def prefix_logits(self, x, rows, cols):
        self.scored += len(rows)
        return self.logits[x[rows, 0], cols].clone()


def test_build_cache_rebuilds_a_cache_of_other_settings_with_a_warning(tmp_path, capsys):
    """A resumed run reopens its phase's cache: kept when built with the same temperature, k and teacher; rebuilt,
    with a warning, when built at another temperature, finished or not."""
    from llmd4rec.distill.teacher import build_cache

    g = torch.Generator().manual_seed(7)
    n_items = 9
    inputs = torch.tensor([[0, 1, 2], [1, 3, 4]])  # column 0: the user's row of fixed logits
    targets = torch.tensor([[0, 2, 3], [3, 4, 5]])
    teacher = _CountingTeacher(torch.randn(2, 3, n_items + 1, generator=g))
    path, cpu = tmp_path / "round1-cache-llm", torch.device("cpu")

    def build(T):
        return build_cache(path, teacher, "llm", inputs, targets, n_items, T, 4, cpu, 1)

    build(0.5)
    assert teacher.scored == 5
    assert build(0.5).temperature == 0.5 and teacher.scored == 5  # reused: the teacher does not run again
    assert "warning" not in capsys.readouterr().err
    rebuilt = build(1.0)
    assert "built with other settings" in capsys.readouterr().err and teacher.scored == 10
    assert rebuilt.temperature == 1.0 and TeacherCache.open(path).temperature == 1.0
    fresh = _build(tmp_path / "ref", torch.cat([teacher.logits[0, 1:], teacher.logits[1]]), targets[targets > 0],
                   k=4, T=1.0, mode="auto", batch=5)
    student = torch.randn(5, n_items + 1, generator=g)
    assert torch.equal(rebuilt.kl(student, torch.arange(5)), fresh.kl(student, torch.arange(5)))
    # an unfinished cache started at another temperature starts over too
    (path / "header.json").unlink()
    assert build(0.5).temperature == 0.5 and teacher.scored == 15
    assert "unfinished teacher cache" in capsys.readouterr().err
