"""Versioned bundle folders: ROOT/versions/N are complete bundles, ROOT/current names the one to serve.

`llmd4rec update ROOT` writes ROOT/versions/N+1 (a whole bundle, renamed into place) and only then rewrites
`current` atomically, so a server watching ROOT sees either the old version or the complete new one. A plain
bundle folder (bundle.json at its top) is a root with one fixed version.
"""

from __future__ import annotations

from pathlib import Path

from .errors import InputError
from .io import atomic_write_text

POINTER = "current"


def is_versioned(root: Path) -> bool:
    return (Path(root) / POINTER).is_file()


def current_version(root: Path) -> str:
    """The version name `current` points to; a plain bundle's is "" (it never changes)."""
    root = Path(root)
    if not is_versioned(root):
        return ""
    name = (root / POINTER).read_text(encoding="utf-8").strip()
    if not name or "/" in name or name in (".", ".."):
        raise InputError(f"'{POINTER}' must name a folder under versions/, got {name!r}", root / POINTER)
    return name


def bundle_path(root: Path, version: str | None = None) -> Path:
    """The folder of `version` (default: the current one) under a versioned root, or the plain bundle itself."""
    root = Path(root)
    if not is_versioned(root):
        return root
    path = root / "versions" / (current_version(root) if version is None else version)
    if not (path / "bundle.json").is_file():
        raise InputError("version is not a complete bundle (no bundle.json)", path)
    return path


def next_version(root: Path) -> str:
    """One more than the highest numbered version."""
    numbers = [int(p.name) for p in (Path(root) / "versions").glob("*") if p.name.isdigit()]
    return str(max(numbers, default=0) + 1)


def set_current(root: Path, version: str) -> None:
    if not (Path(root) / "versions" / version / "bundle.json").is_file():
        raise InputError("not a complete bundle", Path(root) / "versions" / version)
    atomic_write_text(Path(root) / POINTER, version + "\n")
