"""Atomic, checksummed file writes: a crash leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from .errors import InputError


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def umask_mode(folder: bool = False) -> int:
    """The mode a plain open()/mkdir() would give under the current umask: tempfile's files are 0600 and its folders
    0700 whatever the umask, which would keep a bundle or a dataset from a server running as another user."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if folder else 0o666) & ~mask


def make_temp_dir(parent: Path, prefix: str, suffix: str = "") -> Path:
    """A fresh folder beside its final place (renamed into it when complete), with the umask's permissions."""
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=prefix, suffix=suffix))
    tmp.chmod(umask_mode(folder=True))
    return tmp


def write_error(e: OSError, path: str | os.PathLike) -> InputError:
    """An OSError from writing (disk full, permission denied, read-only file system) as a one-line InputError."""
    reason = e.strerror or e.__class__.__name__
    if e.errno is not None and e.errno in errno.errorcode:
        reason += f" [{errno.errorcode[e.errno]}]"
    return InputError(f"cannot write ({reason}); free some space or fix the permissions, then resume: "
                      "files already written are intact", path)


def _write_atomically(path: Path, data: bytes) -> None:
    """Temp file in the same folder, fsynced, renamed over `path`; any failure removes the temp file."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, umask_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            try:
                Path(tmp).unlink(missing_ok=True)
            except OSError:
                pass
        if isinstance(e, OSError):
            raise write_error(e, path) from None
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` so that a crash, a full disk or a permission error leaves the old file (or none), never half
    of the new one. Write failures raise InputError (the CLI prints one line and exits 2)."""
    _write_atomically(Path(path), data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError("file not found", path) from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        line = getattr(e, "lineno", None)
        raise InputError(f"not valid JSON ({e.__class__.__name__})", path, line) from None
    except OSError as e:
        raise InputError(f"cannot read ({e.strerror or e.__class__.__name__})", path) from None


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
                 ) -> str:
    """Safetensors written to a temp file, fsynced, then renamed; a sidecar holds its sha256, which is returned.

    A failed write (disk full, permission denied) raises InputError and leaves the previous file in place."""
    path = Path(path)
    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    digest = hashlib.sha256(data).hexdigest()
    _write_atomically(path, data)
    del data
    atomic_write_text(path.with_name(path.name + ".sha256"), digest + "\n")
    return digest


def read_sidecar(path: str | os.PathLike) -> str | None:
    """The sha256 recorded next to a tensor file, or None when there is no sidecar."""
    side = Path(path).with_name(Path(path).name + ".sha256")
    try:
        return side.read_bytes().decode("ascii", errors="replace").strip()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise InputError(f"cannot read ({e.strerror or e.__class__.__name__})", side) from None


def check_finite(tensors: dict[str, torch.Tensor], path: str | os.PathLike | None = None) -> None:
    """Refuse weights holding NaN or infinity: a diverged model would rank and serve garbage (and JSON has no NaN)."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        shown = ", ".join(bad[:3]) + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else "")
        raise InputError(f"non-finite weights (NaN or infinity) in {shown}: the run diverged", path)


def load_tensors(path: str | os.PathLike, verify: bool = True, expected_sha256: str | None = None
                 ) -> dict[str, torch.Tensor]:
    """Load safetensors, refusing a file whose checksum (sidecar, or `expected_sha256`) disagrees."""
    path = Path(path)
    if not path.exists():
        raise InputError("checkpoint file not found", path)
    try:
        if verify:
            expected = [d for d in (read_sidecar(path), expected_sha256) if d is not None]
            if expected and any(sha256_file(path) != d for d in expected):
                raise InputError("checksum mismatch: the file is truncated or corrupt", path)
        return load_file(str(path))
    except InputError:
        raise
    except OSError as e:
        raise InputError(f"cannot read ({e.strerror or e.__class__.__name__})", path) from None
    except Exception as e:  # safetensors raises several types for damaged headers
        raise InputError(f"not a readable safetensors file ({e.__class__.__name__})", path) from None
