"""Teacher cache: while one model is frozen for a phase, its logits are computed once per training sample and
kept on disk, memory-mapped, so the frozen model never runs twice over a sample (docs/method.md, "Teacher cache").

Layout of a cache folder (all arrays are `.npy`, readable with `np.load(..., mmap_mode="r")`):

- `meta.json`: the parameters, written when the cache is created (lets a crashed build resume);
- `done.npy` uint8 [S]: 1 once a row's data is flushed to disk (set after the data, so never ahead of it);
- `targets.npy` int32 [S], `ranks.npy` int32 [S]: each sample's target item and the teacher's exact 0-based
  rank of it (`weights.target_ranks`, from the full float32 row at write time; the adaptive weights need it);
- mode `full`: `logits.npy` fp16 [S, n_items], items 1..n_items, each row shifted by its max (softmax is
  shift-invariant, and values near the top keep the most fp16 precision);
- mode `topk`: `topk_idx.npy` int32 [S, k] item ids, `topk_val.npy` fp16 [S, k] their max-shifted logits, and
  `log_tail.npy` float32 [S], the log of the teacher's exact probability mass outside the top-k at the
  cache's temperature, computed in float32 from the full row (so the tail mass is exact, not 1 - sum of
  rounded values);
- `header.json`: written LAST, atomically, by `finalize()`, with byte sizes and sha256 of every array.
  A folder without it is an unfinished cache, and `open` refuses it.

Logits passed to `write` and `kl` are in the `score_all` layout [b, n_items + 1]; column 0 (padding) is never
stored, ranked or given probability mass.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from ..io import atomic_write_json, read_json, sha256_file, write_error
from .kl import full_row_kl, topk_bucket_kl
from .weights import target_ranks

FORMAT = "llmd4rec-teacher-cache"
VERSION = 1
FULL_MODE_MAX_BYTES = 256 << 20  # fp16 full rows up to this size; beyond it, top-k + tail
_FP16_MIN = float(np.finfo(np.float16).min)
_ROW_FILES = {"targets": np.int32, "ranks": np.int32}
_MODE_FILES = {"full": {"logits": np.float16},
               "topk": {"topk_idx": np.int32, "topk_val": np.float16, "log_tail": np.float32}}
_ALL_FILES = ["header.json", "meta.json", "done.npy"] + [f"{n}.npy" for n in _ROW_FILES] + \
    [f"{n}.npy" for files in _MODE_FILES.values() for n in files]


def _shapes(meta: dict) -> dict[str, tuple[tuple[int, ...], Any]]:
    s, n, k = meta["n_samples"], meta["n_items"], meta["k"]
    dims = {"targets": (s,), "ranks": (s,), "logits": (s, n), "topk_idx": (s, k), "topk_val": (s, k),
            "log_tail": (s,)}
    files = {**_ROW_FILES, **_MODE_FILES[meta["mode"]]}
    return {name: (dims[name], dtype) for name, dtype in files.items()}


class TeacherCache:
    """Entry points: `create` (or resume) a writer, `open` a finished cache for reading."""

    @staticmethod
    def create(path: str | os.PathLike, n_samples: int, n_items: int, k: int, temperature: float,
               mode: str = "auto", info: dict | None = None, resume: bool = False,
               full_max_bytes: int = FULL_MODE_MAX_BYTES) -> "TeacherCacheWriter":
        """A writer for `n_samples` rows. `mode`: "full", "topk", or "auto" (full fp16 rows when they take at
        most `full_max_bytes`, or when k >= n_items; top-k + tail otherwise). `info` (JSON) identifies what was
        cached, e.g. the teacher checkpoint, and is handed back by the reader. With `resume=True` a cache built
        with identical parameters keeps its written rows (see `pending_ranges`); otherwise, or when parameters
        differ, the folder's cache files are replaced. Any existing header is removed first, so the folder reads
        as unfinished until `finalize`.
        """
        if n_samples < 1 or n_items < 1:
            raise ValueError(f"a teacher cache needs n_samples >= 1 and n_items >= 1, got {n_samples}, {n_items}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if mode == "auto":
            mode = "full" if k >= n_items or n_samples * n_items * 2 <= full_max_bytes else "topk"
        if mode not in _MODE_FILES:
            raise ValueError(f"unknown teacher cache mode '{mode}' (auto, full or topk)")
        if mode == "topk" and not 1 <= k < n_items:
            raise ValueError(f"top-k mode needs 1 <= k < n_items ({n_items}), got k={k}; use mode 'full'")
        meta = {"format": FORMAT, "version": VERSION, "n_samples": int(n_samples), "n_items": int(n_items),
                "k": int(k), "temperature": float(temperature), "mode": mode,
                "info": json.loads(json.dumps(info if info is not None else {}))}
        path = Path(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
            (path / "header.json").unlink(missing_ok=True)
            if resume:
                writer = TeacherCacheWriter._reopen(path, meta)
                if writer is not None:
                    return writer
            for name in _ALL_FILES:
                (path / name).unlink(missing_ok=True)
            atomic_write_json(path / "meta.json", meta)
            arrays = {name: _open_reserved(path / f"{name}.npy", dtype, shape)
                      for name, (shape, dtype) in _shapes(meta).items()}
            done = _open_reserved(path / "done.npy", np.uint8, (n_samples,))
            for a in (*arrays.values(), done):
                a.flush()
        except OSError as e:
            raise write_error(e, path) from None
        return TeacherCacheWriter(path, meta, arrays, done)

    @staticmethod
    def open(path: str | os.PathLike, verify: bool = True) -> "TeacherCacheReader":
        """A reader over a finalised cache. Missing, unfinished, truncated or corrupt caches raise InputError;
        `verify` checks every array's sha256 against the header (a second per 500 MB or so)."""
        path = Path(path)
        header_path = path / "header.json"
        if not header_path.exists():
            if (path / "meta.json").exists():
                done = _count_done(path)
                raise InputError(f"teacher cache is unfinished (not finalised; {done} rows written): "
                                 "rebuild it, or resume it with TeacherCache.create(..., resume=True)", path)
            raise InputError("not a teacher cache (header.json missing)", path)
        header = read_json(header_path)
        try:
            if header.get("format") != FORMAT or header.get("version") != VERSION:
                raise InputError(f"not a version-{VERSION} teacher cache header", header_path)
            shapes = _shapes(header)
            files = header["files"]
            temperature = float(header["temperature"])
        except (AttributeError, KeyError, TypeError, ValueError):
            raise InputError("teacher cache header is malformed", header_path) from None
        arrays = {}
        for name, (shape, dtype) in shapes.items():
            file = path / f"{name}.npy"
            entry = files.get(name) if isinstance(files, dict) else None
            if not isinstance(entry, dict) or "bytes" not in entry or "sha256" not in entry:
                raise InputError(f"teacher cache header lists no checksum for {name}.npy", header_path)
            if not file.exists():
                raise InputError("teacher cache file missing", file)
            size = file.stat().st_size
            if size != entry["bytes"]:
                raise InputError(f"teacher cache file is truncated or altered ({size} bytes, header says "
                                 f"{entry['bytes']})", file)
            if verify and sha256_file(file) != entry["sha256"]:
                raise InputError("teacher cache file is corrupt (sha256 differs from the header)", file)
            try:
                a = np.load(file, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError) as e:
                raise InputError(f"teacher cache file is not a readable .npy array ({e.__class__.__name__})",
                                 file) from None
            if a.shape != shape or a.dtype != np.dtype(dtype):
                raise InputError(f"teacher cache array has shape {a.shape} {a.dtype}, expected {shape} "
                                 f"{np.dtype(dtype)}", file)
            arrays[name] = a
        return TeacherCacheReader(path, header, temperature, arrays)


def _open_reserved(file: Path, dtype: Any, shape: tuple[int, ...]) -> np.memmap:
    """A new .npy memmap whose blocks are allocated now: a full disk fails here with ENOSPC, instead of killing
    the process with SIGBUS when a page of the (otherwise sparse) file is first written."""
    array = np.lib.format.open_memmap(file, mode="w+", dtype=dtype, shape=shape)
    fd = os.open(file, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # file systems without fallocate
            raise
    finally:
        os.close(fd)
    return array


def _count_done(path: Path) -> int | str:
    try:
        return int(np.load(path / "done.npy", mmap_mode="r", allow_pickle=False).sum())
    except (OSError, ValueError):
        return "unknown number of"


class TeacherCacheWriter:
    """Fills a cache row block by row block; `finalize` seals it. Safe to abandon: a crash loses unflushed rows."""

    def __init__(self, path: Path, meta: dict, arrays: dict[str, np.memmap], done: np.memmap):
        self.path, self.meta, self._arrays, self._done = path, meta, arrays, done
        self.n_samples, self.n_items = meta["n_samples"], meta["n_items"]
        self.k, self.temperature, self.mode = meta["k"], meta["temperature"], meta["mode"]

    @classmethod
    def _reopen(cls, path: Path, meta: dict) -> "TeacherCacheWriter | None":
        """The unfinished cache at `path` if it was built with exactly `meta`, else None (start over)."""
        try:
            if read_json(path / "meta.json") != meta:
                return None
            arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r+", allow_pickle=False)
                      for name in _shapes(meta)}
            done = np.load(path / "done.npy", mmap_mode="r+", allow_pickle=False)
        except (InputError, OSError, ValueError):
            return None
        expected = {name: (shape, np.dtype(dtype)) for name, (shape, dtype) in _shapes(meta).items()}
        if done.shape != (meta["n_samples"],) or any((a.shape, a.dtype) != expected[n] for n, a in arrays.items()):
            return None
        return cls(path, meta, arrays, done)

    @property
    def rows_done(self) -> int:
        return int(self._done.sum())

    def pending_ranges(self, batch_size: int) -> list[tuple[int, int]]:
        """(start, stop) blocks of at most `batch_size` rows not yet written, in order: what a resume computes."""
        missing = np.flatnonzero(self._done == 0)
        out: list[tuple[int, int]] = []
        if missing.size == 0:
            return out
        breaks = np.flatnonzero(np.diff(missing) != 1) + 1
        for run in np.split(missing, breaks):
            lo, hi = int(run[0]), int(run[-1]) + 1
            out.extend((s, min(s + batch_size, hi)) for s in range(lo, hi, batch_size))
        return out

    @torch.no_grad()
    def write(self, start: int, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Store rows start..start+b from teacher logits [b, n_items + 1] and their target item ids [b]."""
        b = logits.shape[0]
        if logits.dim() != 2 or logits.shape[1] != self.n_items + 1:
            raise ValueError(f"teacher logits must be [b, {self.n_items + 1}], got {tuple(logits.shape)}")
        if not 0 <= start <= start + b <= self.n_samples:
            raise ValueError(f"rows {start}..{start + b} fall outside the cache's {self.n_samples} rows")
        z = logits.detach().float().cpu()
        targets = torch.as_tensor(targets).cpu()
        ranks = target_ranks(z, targets)
        shifted = z[:, 1:] - z[:, 1:].max(dim=1, keepdim=True).values
        if torch.isnan(shifted).any():
            raise ValueError("teacher logits contain NaN, +inf, or a row without a finite score")
        rows = slice(start, start + b)
        a = self._arrays
        a["targets"][rows] = targets.numpy()
        a["ranks"][rows] = ranks.numpy()
        if self.mode == "full":
            a["logits"][rows] = shifted.clamp(min=_FP16_MIN).half().numpy()
        else:
            vals, pos = shifted.topk(self.k, dim=1)
            scaled = shifted / self.temperature
            tail = scaled.scatter(1, pos, float("-inf")).logsumexp(dim=1) - scaled.logsumexp(dim=1)
            a["topk_idx"][rows] = (pos + 1).numpy()
            a["topk_val"][rows] = vals.clamp(min=_FP16_MIN).half().numpy()
            a["log_tail"][rows] = tail.clamp(max=0.0).numpy()
        for arr in a.values():
            arr.flush()
        self._done[rows] = 1
        self._done.flush()

    def finalize(self) -> "TeacherCacheReader":
        """Seal the cache: checksums of every array go into header.json, written last and atomically."""
        missing = self.n_samples - self.rows_done
        if missing:
            raise ValueError(f"cannot finalise the teacher cache: {missing} of {self.n_samples} rows not written")
        files = {}
        for name, arr in self._arrays.items():
            arr.flush()
            file = self.path / f"{name}.npy"
            with open(file, "rb+") as f:
                os.fsync(f.fileno())
            files[name] = {"sha256": sha256_file(file), "bytes": file.stat().st_size}
        atomic_write_json(self.path / "header.json", {**self.meta, "rows_complete": self.n_samples, "files": files})
        return TeacherCache.open(self.path, verify=False)


class TeacherCacheReader:
    """Read side: the distillation KL against the cached teacher, and the teacher's exact target ranks."""

    def __init__(self, path: Path, header: dict, temperature: float, arrays: dict[str, np.ndarray]):
        self.path, self._arrays = path, arrays
        self.n_samples, self.n_items = int(header["n_samples"]), int(header["n_items"])
        self.k, self.mode, self.temperature = int(header["k"]), header["mode"], temperature
        self.info: dict = header.get("info") or {}

    def __len__(self) -> int:
        return self.n_samples

    def _rows(self, rows: torch.Tensor) -> np.ndarray:
        r = torch.as_tensor(rows).cpu().long().numpy().reshape(-1)
        if r.size and (r.min() < 0 or r.max() >= self.n_samples):
            raise IndexError(f"cache rows must lie in 0..{self.n_samples - 1}")
        return r

    def _get(self, name: str, r: np.ndarray, device: torch.device) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self._arrays[name][r])).to(device)

    def kl(self, student_logits: torch.Tensor, rows: torch.Tensor, t_squared: bool = False) -> torch.Tensor:
        """Per-sample KL(teacher || student) at the cache's temperature: shape [b], differentiable in the student.

        `student_logits` [b, n_items + 1] (score_all layout) for cache rows `rows` [b]. Mode full: `kd_kl`'s formula on
        the stored fp16 rows. Mode topk: the KL between the teacher and the student both coarsened to k + 1
        buckets (the teacher's top-k items, and one tail bucket with the rest of the mass; the student's tail
        is the logsumexp over the other items). By the data-processing inequality this is a lower bound of
        the full KL; the gap is the KL inside the tail, small when the teacher is peaked.
        """
        return self.kl_and_student_ranks(student_logits, rows, None, t_squared)[0]

    def kl_and_student_ranks(self, student_logits: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor | None,
                             t_squared: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """`kl`, and the student's `weights.target_ranks` of `targets` [b] taken in the same pass over its logits
        (the adaptive weights need both; an empty tensor when targets is None)."""
        if student_logits.dim() != 2 or student_logits.shape[1] != self.n_items + 1:
            raise ValueError(f"student logits must be [b, {self.n_items + 1}], got {tuple(student_logits.shape)}")
        r = self._rows(rows)
        if len(r) != student_logits.shape[0]:
            raise ValueError(f"{len(r)} cache rows for {student_logits.shape[0]} student rows")
        if targets is not None:
            targets = targets.to(device=student_logits.device, dtype=torch.long)
            if targets.numel() and (int(targets.min()) < 1 or int(targets.max()) > self.n_items):
                raise ValueError(f"targets must be item ids in 1..{self.n_items}")
        dev, T = student_logits.device, self.temperature
        if self.mode == "full":
            kl, ranks = full_row_kl(student_logits, self._get("logits", r, dev), T, targets)
        else:
            kl, ranks = topk_bucket_kl(student_logits, self._get("topk_idx", r, dev).long(),
                                       self._get("topk_val", r, dev), self._get("log_tail", r, dev)[:, None], T,
                                       targets)
        return (kl * (T ** 2) if t_squared else kl), ranks

    def top_items(self, rows: torch.Tensor, k: int, device: torch.device | str = "cpu"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's k best items of each row, best first: item ids [b, k] (long) and their max-shifted logits
        [b, k] (float32). Mode topk holds only the cache's own k best items per row."""
        r = self._rows(rows)
        if self.mode == "full":
            vals, pos = self._get("logits", r, device).float().topk(k, dim=1)
            return pos + 1, vals
        if k > self.k:
            raise ValueError(f"the cache keeps the teacher's {self.k} best items per row, {k} were asked for")
        return self._get("topk_idx", r, device)[:, :k].long(), self._get("topk_val", r, device)[:, :k].float()

    def target_ranks(self, rows: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """The teacher's exact 0-based rank of each row's target (`weights.target_ranks`): LongTensor [b].

        Passing the `targets` the rows are meant to have checks that the cache matches the samples
        (a different sample order or dataset raises InputError instead of silently mis-weighting).
        """
        r = self._rows(rows)
        device = targets.device if isinstance(targets, torch.Tensor) else torch.device("cpu")
        if targets is not None:
            stored = self._get("targets", r, device).long()
            if not torch.equal(stored, torch.as_tensor(targets, device=device).long().reshape(-1)):
                raise InputError("teacher cache was built for other samples (targets differ); rebuild it",
                                 self.path)
        return self._get("ranks", r, device).long()
