"""Dataset names -> files: a local data folder when given, else a checksummed download cache.

Resolution order: the `data_dir` argument, else `$LLMD4REC_DATA`, else download into
`$LLMD4REC_CACHE` (default `~/.cache/llmd4rec`). A data folder that lacks the file is an error, never
a silent download, so a mistyped path cannot fetch gigabytes or mix data versions.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tempfile
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import InputError
from ..io import atomic_write_text, make_temp_dir, sha256_file, umask_mode
from . import readers
from .dataset import Dataset
from .synthetic import generate
from .text import attach_item_text, find_item_text

_S3REC = "https://raw.githubusercontent.com/RUCAIBox/CIKM2020-S3Rec/master/data/"
_GROUPLENS = "https://files.grouplens.org/datasets/movielens/"


@dataclass(frozen=True)
class Source:
    """Where a dataset lives.

    `layouts` are (path relative to the data folder, reader) pairs tried in order. `url` downloads the
    last layout (an `archive` zip is extracted into the cache folder). `sha256` pins the downloaded
    bytes; None where the bytes could not be inspected when this table was written: the first
    download's sha256 is then recorded beside the file (`<file>.sha256`) and verified on later use.
    """

    layouts: tuple[tuple[str, Callable[[Path, str], Dataset]], ...]
    url: str
    sha256: str | None = None
    archive: bool = False


def _s3rec(path: str, sha256: str | None = None) -> Source:
    return Source(((path, readers.read_s3rec),), _S3REC + Path(path).name, sha256)


DATASETS: dict[str, Source] = {
    "beauty": _s3rec("Beauty/Beauty.txt", "226cce9c3105299ca0db9615d7d3fb32b3175e90da43100ae352599f0f0107b8"),
    "sports": _s3rec("Sports/Sports_and_Outdoors.txt"),
    "toys": _s3rec("Toys/Toys_and_Games.txt", "176c680c688d497598c4a89a03b402c0fe78d795e5db335c2e78dd5f2d778a3f"),
    "yelp": _s3rec("Yelp/Yelp.txt"),
    "lastfm": _s3rec("LastFM/LastFM.txt", "9ded486adb5b0fe9dc761950afa0a9a05e93ff018992e0c52bf11afec529f802"),
    "ml-100k": Source(
        (("ml-100k/ml-100k.inter", readers.read_atomic), ("ml-100k/u.data", readers.read_ml100k)),
        _GROUPLENS + "ml-100k.zip",
        archive=True,
    ),
    "ml-1m": Source((("ml-1m/ratings.dat", readers.read_ml1m),), _GROUPLENS + "ml-1m.zip", archive=True),
}


def dataset_names() -> list[str]:
    """Every name load_dataset accepts, besides csv:PATH / tsv:PATH."""
    return sorted([*DATASETS, "synthetic"])


def cache_dir() -> Path:
    return Path(os.environ.get("LLMD4REC_CACHE") or Path.home() / ".cache" / "llmd4rec")


def _table(name: str) -> tuple[Path, str] | None:
    """`csv:PATH`, `tsv:PATH` or a path ending in .csv/.tsv -> (path, delimiter)."""
    prefix, _, rest = name.partition(":")
    if prefix.lower() in ("csv", "tsv") and rest:
        return Path(rest), "," if prefix.lower() == "csv" else "\t"
    suffix = Path(name).suffix.lower()
    if suffix in (".csv", ".tsv"):
        return Path(name), "," if suffix == ".csv" else "\t"
    return None


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    synthetic_users: int = 2000,
    synthetic_items: int = 500,
    seed: int = 0,
) -> Dataset:
    """Load a registered dataset, `synthetic`, or a CSV/TSV interaction log."""
    key = name.strip().lower()
    if key == "synthetic":
        return generate(synthetic_users, synthetic_items, seed)
    table = _table(name.strip())
    if table is not None:
        return readers.read_table(table[0], table[0].stem, table[1])
    source = DATASETS.get(key)
    if source is None:
        raise InputError(f"unknown dataset {name!r}; known: {', '.join(dataset_names())}, csv:PATH, tsv:PATH")
    root = data_dir if data_dir is not None else os.environ.get("LLMD4REC_DATA") or None
    if root is not None:
        path, reader = _local(source, Path(root))
    else:
        path, reader = _cached(source)
    dataset = reader(path, key)
    table = find_item_text(path)
    return dataset if table is None else attach_item_text(dataset, table, path)


def _local(source: Source, root: Path) -> tuple[Path, Callable[[Path, str], Dataset]]:
    for rel, reader in source.layouts:
        if (root / rel).is_file():
            return root / rel, reader
    expected = " or ".join(str(root / rel) for rel, _ in source.layouts)
    raise InputError(f"dataset file not found: expected {expected}")


def _cached(source: Source) -> tuple[Path, Callable[[Path, str], Dataset]]:
    """Use the cache, downloading (and extracting) what is missing; every file read is checksummed."""
    root = cache_dir()
    for rel, reader in source.layouts:
        if (root / rel).is_file():
            break
    else:
        rel, reader = source.layouts[-1]
        if source.archive:
            archive = root / Path(source.url).name
            if archive.is_file():
                _verify(archive, source.sha256)
            else:
                _download(source.url, archive, source.sha256)
            _extract(archive, root, Path(rel).parts[0])
        else:
            _download(source.url, root / rel, source.sha256)
    _verify(root / rel, None if source.archive else source.sha256)
    return root / rel, reader


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _verify(path: Path, pinned: str | None) -> None:
    """Check against the pinned hash, else the recorded one; record it when there is none yet."""
    side = _sidecar(path)
    expected = pinned or (side.read_text().strip() if side.is_file() else None)
    actual = sha256_file(path)
    if expected is None:
        atomic_write_text(side, actual + "\n")
    elif actual != expected:
        raise InputError(f"sha256 mismatch (expected {expected}, got {actual}): corrupt download, delete it to fetch again", path)


def _download(url: str, dest: Path, pinned: str | None) -> None:
    """Stream into a temp file beside dest, check the sha256, then rename: never a half file in place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.fchmod(fd, umask_mode())
    digest = hashlib.sha256()
    try:
        try:
            with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=60) as response:
                for block in iter(lambda: response.read(1 << 20), b""):
                    digest.update(block)
                    f.write(block)
                f.flush()
                os.fsync(f.fileno())
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise InputError(f"download from {url} failed ({e}); set LLMD4REC_DATA or pass a data folder", dest) from None
        actual = digest.hexdigest()
        if pinned is not None and actual != pinned:
            raise InputError(f"sha256 mismatch for the download from {url} (expected {pinned}, got {actual})", dest)
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)
    atomic_write_text(_sidecar(dest), actual + "\n")


def _extract(archive: Path, root: Path, folder: str) -> None:
    """Extract `folder/` from the zip into a temp dir, then rename it into place in one step."""
    tmp = make_temp_dir(root, f".{folder}.")
    try:
        try:
            with zipfile.ZipFile(archive) as z:
                z.extractall(tmp, [m for m in z.namelist() if m.startswith(folder + "/")])
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError, NotImplementedError) as e:
            raise InputError(f"unreadable zip archive ({e}); delete it to fetch again", archive) from None
        if not (tmp / folder).is_dir():
            raise InputError(f"zip archive has no {folder}/ folder", archive)
        shutil.rmtree(root / folder, ignore_errors=True)
        os.replace(tmp / folder, root / folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
