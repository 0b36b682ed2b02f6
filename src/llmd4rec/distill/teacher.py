"""The frozen teacher of a distillation phase: which model it is, its logits cached once per phase, and the KD term
that reads them back (the hook the training recipes add to their loss)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..io import read_json
from .cache import TeacherCache, TeacherCacheReader
from .losses import rank_distill
from .weights import target_ranks, weights_crm_to_llm, weights_llm_to_crm


def sample_index(targets: torch.Tensor) -> torch.Tensor:
    """[U, L] grid -> sample id of each cell with a target (row-major, as the cache rows), -1 elsewhere."""
    index = torch.full(targets.shape, -1, dtype=torch.long)
    rows, cols = (targets > 0).nonzero(as_tuple=True)
    index[rows, cols] = torch.arange(len(rows))
    return index


class LogProbEnsemble(nn.Module):
    """A teacher that mixes both models: alpha * log p_LLM + (1 - alpha) * log p_CRM over items 1..N.

    Mixing log-probabilities (a product of experts) rather than raw logits makes the two models' different logit
    scales irrelevant; where they disagree the mixture is flatter, where they agree it is sharper."""

    def __init__(self, crm: nn.Module, llm: nn.Module, alpha: float):
        super().__init__()
        self.crm, self.llm, self.alpha = crm, llm, alpha

    @property
    def max_len(self) -> int:
        return self.crm.max_len

    @property
    def trims_padding(self) -> bool:
        return getattr(self.llm, "trims_padding", False)

    def _mix(self, zc: torch.Tensor, zl: torch.Tensor) -> torch.Tensor:
        """Both models' scores over columns 0..N -> the mixed log-probabilities over items 1..N (column 0: -inf)."""
        zc, zl = zc.float(), zl.float()
        zc[:, 0] = zl[:, 0] = float("-inf")
        mixed = self.alpha * F.log_softmax(zl, 1) + (1 - self.alpha) * F.log_softmax(zc, 1)
        mixed[:, 0] = float("-inf")
        return mixed

    def prefix_logits(self, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        zc = self.crm.score_items(self.crm.hidden(x)[rows, cols], 0, self.crm.n_items + 1)
        return self._mix(zc, self.llm.prefix_logits(x, rows, cols))

    # ---- the scorer protocol (evaluation ranks the ensemble like any model: is the teacher better than SASRec?) --

    def encode(self, histories: torch.Tensor) -> torch.Tensor:
        """The whole mixed row: its normaliser needs every item's score anyway, so each is computed once."""
        return self._mix(self.crm.score_all(histories), self.llm.score_all(histories))

    def score_items(self, state: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        return state[:, lo:hi]


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _reusable(path: Path, temperature: float, k: int, n_items: int, info: dict) -> TeacherCacheReader | None:
    """A finished cache is reused only if it was built for the same teacher, samples, items, temperature and k; a
    damaged or different one is rebuilt, with a warning."""
    if not (path / "header.json").exists():
        return None
    try:
        reader = TeacherCache.open(path)
    except InputError as e:
        _warn(f"{e}; rebuilding the teacher cache")
        return None
    if (reader.temperature, reader.k, reader.n_items, reader.info) != (temperature, k, n_items, info):
        _warn(f"the teacher cache in {path} was built with other settings ({reader.info}, T={reader.temperature}, "
              f"k={reader.k}, {reader.n_items} items); rebuilding it")
        return None
    return reader


def _unfinished_meta(path: Path) -> dict | None:
    """The parameters an unfinished cache was started with ({} when unreadable), None when there is none."""
    if (path / "header.json").exists() or not (path / "meta.json").exists():
        return None
    try:
        return read_json(path / "meta.json")
    except InputError:
        return {}


def copy_finished_cache(source: Path, dest: Path) -> bool:
    """Copy a finished teacher cache to `dest` unless `dest` exists; build_cache then checks its settings (a copy,
    not a link: a cache it rejects is rebuilt in place without touching the source)."""
    if dest.exists() or not (source / "header.json").exists():
        return False
    shutil.copytree(source, dest)
    return True


@torch.no_grad()
def build_cache(path: Path, teacher, kind: str, inputs: torch.Tensor, targets: torch.Tensor, n_items: int,
                temperature: float, k: int, device: torch.device, users_per_batch: int,
                info: dict | None = None) -> TeacherCacheReader:
    """Run the frozen teacher once over every sample of the grid and keep its logits on disk.

    kind "crm": a SASRec scores the grid's positions from one pass per user; any other kind: the teacher's
    `prefix_logits` (E4SRec, LogProbEnsemble). An interrupted build resumes where it stopped."""
    from tqdm import tqdm

    info = {"teacher": kind, "samples": int((targets > 0).sum()), **(info or {})}
    reader = _reusable(path, temperature, k, n_items, info)
    if reader is not None:
        return reader
    rows_all = (targets > 0).nonzero(as_tuple=True)[0]
    per_user = (targets > 0).sum(1)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), per_user.cumsum(0)])
    keep = not (path / "header.json").exists()  # a rejected finished cache starts over
    started = _unfinished_meta(path)
    writer = TeacherCache.create(path, len(rows_all), n_items, k, temperature, resume=keep, info=info)
    if started is not None and started != writer.meta:  # create kept its rows only if the parameters are the same
        _warn(f"the unfinished teacher cache in {path} was started with other settings; rebuilding it")
    pending = {s for s, _ in writer.pending_ranges(len(rows_all))}
    done_upto = min(pending) if pending else len(rows_all)
    teacher.eval()
    for u0 in tqdm(range(0, len(targets), users_per_batch), desc=f"teacher cache ({kind})", leave=False,
                   mininterval=5):
        u1 = min(u0 + users_per_batch, len(targets))
        s0, s1 = int(starts[u0]), int(starts[u1])
        if s1 <= done_upto or s0 == s1:
            continue
        x, y = inputs[u0:u1].to(device), targets[u0:u1].to(device)
        r, c = (y > 0).nonzero(as_tuple=True)
        if kind == "crm":
            logits = teacher.score_items(teacher.hidden(x)[r, c], 0, n_items + 1)
        else:
            logits = teacher.prefix_logits(x, r, c)
        logits[:, 0] = float("-inf")
        if not torch.isfinite(logits[:, 1:]).all():
            raise InputError(f"the {kind} teacher produced non-finite logits: it is not used as a teacher", path)
        writer.write(s0, logits.float(), y[r, c])
    return writer.finalize()


def kd_hook(cache: TeacherCacheReader, index: torch.Tensor, scale: float, t_squared: bool, adaptive: bool,
            student: str, rank: tuple[int, float] | None = None):
    """The KD term of L_LLM (student "llm", weight w1) or L_CRM (student "crm", weight w2), averaged per sample: the
    KL at the cache's temperature, or with rank=(K, lambda) `rank_distill` over the teacher's K best items."""

    def kd(users: torch.Tensor, cols: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ids = index[users.cpu(), cols.cpu()].to(logits.device)
        n = len(logits)
        covered = ids >= 0
        if not bool(covered.any()):
            return logits.new_zeros(())
        if not bool(covered.all()):  # positions=last_k: only some samples have a teacher row
            ids, logits, targets = ids[covered], logits[covered], targets[covered]
        if rank is None:
            term, r_student = cache.kl_and_student_ranks(logits, ids, targets if adaptive else None, t_squared)
        else:
            top_idx, top_vals = cache.top_items(ids, rank[0], logits.device)
            term = rank_distill(logits, top_idx, top_vals, cache.temperature, rank[1])
            r_student = target_ranks(logits.detach(), targets) if adaptive else None
        if adaptive:
            r_teacher = cache.target_ranks(ids).to(r_student.device)
            if student == "llm":
                w = weights_crm_to_llm(r_teacher, r_student)
            else:
                w = weights_llm_to_crm(r_student, r_teacher)
            term = term * w.to(term.device)
        return scale * term.sum() / n

    return kd
