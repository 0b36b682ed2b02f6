"""The teacher cache: its KL and target ranks equal the live ones, and a damaged, partial or stale cache is refused,
resumed or rebuilt."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _kl_by_hand import _hand_kl, _softmax
from llmd4rec.distill import TeacherCache, kd_kl, target_ranks
from llmd4rec.distill import kl as kl_module
from llmd4rec.errors import InputError


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
