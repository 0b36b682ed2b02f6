"""File readers: S3Rec text, MovieLens (GroupLens and RecBole atomic files) and CSV/TSV logs.

Every reader turns bad input into one `InputError` naming the file and the 1-based line, so a user
sees what to fix instead of a traceback from deep inside a parser.
"""

from __future__ import annotations

import csv
import io
import math
import os
from datetime import datetime
from operator import itemgetter
from pathlib import Path
from typing import Hashable, Iterator

from ..errors import InputError
from .dataset import Dataset

PathLike = str | os.PathLike


def read_text(path: PathLike, encoding: str = "utf-8") -> str:
    """Whole file as text; a missing, unreadable or undecodable file is an InputError."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise InputError("file not found", path) from None
    except OSError as e:
        raise InputError(f"cannot read file ({e.strerror or e.__class__.__name__})", path) from None
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise InputError(f"undecodable bytes (not {encoding.removesuffix('-sig')})", path, line) from None


def _lines(text: str) -> Iterator[tuple[int, str]]:
    """Non-blank lines with their 1-based numbers; split on '\\n' only so numbers match an editor's."""
    for number, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if line.strip():
            yield number, line


def _split(line: str, sep: str, n: int, path: PathLike, number: int, exact: bool = True) -> list[str]:
    parts = [p.strip() for p in line.split(sep)]
    if len(parts) < n or (exact and len(parts) != n):
        need = n if exact else f"at least {n}"
        raise InputError(f"expected {need} {sep!r}-separated columns, got {len(parts)}", path, number)
    return parts


def _int(token: str, path: PathLike, number: int, what: str = "id") -> int:
    """Strict decimal integer (ASCII digits, optional '-', at most 18 digits so it fits int64)."""
    body = token[1:] if token.startswith("-") else token
    if body.isascii() and body.isdigit() and len(body) <= 18:
        return int(token)
    raise InputError(f"{what} {token[:40]!r} is not an integer (at most 18 digits)", path, number)


def _timestamp(token: str, path: PathLike, number: int) -> float:
    """A number, or an ISO 8601 date/time as found in hand-made CSV logs."""
    try:
        value = float(token)
    except ValueError:
        try:
            value = datetime.fromisoformat(token).timestamp()
        except (ValueError, OverflowError, OSError):
            raise InputError(f"timestamp {token[:40]!r} is neither a number nor an ISO date", path, number) from None
    if not math.isfinite(value):
        raise InputError(f"timestamp {token[:40]!r} is not finite", path, number)
    return value


def _dataset(
    name: str,
    sequences: dict[Hashable, list[Hashable]],
    item_order: list[Hashable],
    source: PathLike,
    titles: dict[Hashable, str] | None = None,
    duplicates_dropped: int = 0,
) -> Dataset:
    """Map original ids to internal ids 1..n in item_order; users keep the dict's order."""
    if not sequences:
        raise InputError("no interactions in file", source)
    index = {orig: i for i, orig in enumerate(item_order, 1)}
    return Dataset(
        name=name,
        sequences=[[index[i] for i in seq] for seq in sequences.values()],
        n_items=len(item_order),
        item_ids=["<pad>"] + [str(i) for i in item_order],
        user_ids=[str(u) for u in sequences],
        titles=None if titles is None else [""] + [titles.get(i, "") for i in item_order],
        source=str(source),
        duplicates_dropped=duplicates_dropped,
    )


def _by_time(rows: list[tuple[Hashable, float, Hashable]]) -> tuple[dict[Hashable, list[Hashable]], int]:
    """Group (user, timestamp, item) rows per user (first-appearance order), stable-sorted by time; a row repeating
    an earlier one exactly (same user, item and timestamp: a logging duplicate) is dropped. Returns the sequences
    and how many rows were dropped."""
    grouped: dict[Hashable, list[tuple[float, Hashable]]] = {}
    for user, ts, item in dict.fromkeys(rows):
        grouped.setdefault(user, []).append((ts, item))
    kept = sum(len(v) for v in grouped.values())
    return {u: [i for _, i in sorted(v, key=itemgetter(0))] for u, v in grouped.items()}, len(rows) - kept


def _numeric(name: str, rows: list[tuple[int, float, int]], source: PathLike, titles: dict | None) -> Dataset:
    """MovieLens-style integer ids: users and items both in numeric order."""
    seqs, dropped = _by_time(rows)
    seqs = {u: seqs[u] for u in sorted(seqs)}
    return _dataset(name, seqs, sorted({i for _, _, i in rows}), source, titles, dropped)


def read_s3rec(path: PathLike, name: str) -> Dataset:
    """`user item item ...` per line, positive ids, chronological; item_asin.tsv beside it gives titles."""
    text = read_text(path)
    seqs: dict[int, list[int]] = {}
    seen: dict[int, int] = {}
    for number, line in _lines(text):
        parts = line.split()
        if line.isascii() and all(map(str.isdigit, parts)) and max(map(len, parts)) <= 18:
            ids = list(map(int, parts))
        else:
            ids = [_int(t, path, number) for t in parts]
        if min(ids) <= 0:
            raise InputError(f"ids must be positive, got {min(ids)}", path, number)
        user, items = ids[0], ids[1:]
        if not items:
            raise InputError(f"user {user} has no items", path, number)
        if user in seen:
            raise InputError(f"user {user} already appeared on line {seen[user]}", path, number)
        seen[user] = number
        seqs[user] = items
    if not seqs:
        raise InputError("empty file: no user lines", path)
    universe = {i for s in seqs.values() for i in s}
    order = list(range(1, len(universe) + 1)) if max(universe) == len(universe) else sorted(universe)
    asin = Path(path).with_name("item_asin.tsv")
    titles = read_item_asin(asin) if asin.exists() else None
    return _dataset(name, seqs, order, path, titles)


def read_item_asin(path: PathLike) -> dict[int, str]:
    """`item_id<TAB>asin` with a header; there are no real titles, so the title is "ASIN <asin>"."""
    out: dict[int, str] = {}
    for number, line in _lines(read_text(path)):
        item, asin = _split(line, "\t", 2, path, number)
        if number == 1 and not item.isdigit():
            continue  # header
        out[_int(item, path, number)] = f"ASIN {asin}"
    return out


def _columns(names: list[str], wanted: tuple[tuple[str, ...], ...], path: PathLike, line: int) -> list[int]:
    """Index of the first present name of each wanted alternative; a missing one is an InputError."""
    cols = []
    for options in wanted:
        found = [names.index(o) for o in options if o in names]
        if not found:
            raise InputError(f"header lacks a {' or '.join(options)} column (has {', '.join(names)})", path, line)
        cols.append(found[0])
    return cols


def _atomic_rows(path: PathLike, wanted: tuple[tuple[str, ...], ...]) -> Iterator[tuple[int, list[str]]]:
    """RecBole atomic file rows as (line, wanted fields); the tab-separated header names `name:type`."""
    lines = _lines(read_text(path))
    first = next(lines, None)
    if first is None:
        raise InputError("empty file", path)
    names = [c.split(":", 1)[0].strip() for c in first[1].split("\t")]
    cols = _columns(names, wanted, path, first[0])
    for number, line in lines:
        parts = _split(line, "\t", len(names), path, number)
        yield number, [parts[c] for c in cols]


def read_atomic_titles(path: PathLike) -> dict[int, str]:
    """RecBole `.item` file: item_id -> movie_title (or title)."""
    return {_int(i, path, n): t for n, (i, t) in _atomic_rows(path, (("item_id",), ("movie_title", "title")))}


def read_atomic(path: PathLike, name: str) -> Dataset:
    """RecBole `.inter` file (user_id, item_id, timestamp columns); the `.item` beside it gives titles."""
    rows = [
        (_int(u, path, n), _timestamp(t, path, n), _int(i, path, n))
        for n, (u, i, t) in _atomic_rows(path, (("user_id",), ("item_id",), ("timestamp",)))
    ]
    item_file = Path(path).with_suffix(".item")
    return _numeric(name, rows, path, read_atomic_titles(item_file) if item_file.exists() else None)


def _grouplens(path: PathLike, sep: str, titles_file: Path, title_sep: str, encoding: str) -> tuple[list, dict | None]:
    rows = []
    for n, line in _lines(read_text(path)):
        u, i, _, t = _split(line, sep, 4, path, n)
        rows.append((_int(u, path, n), _timestamp(t, path, n), _int(i, path, n)))
    titles = None
    if titles_file.exists():
        titles = {}
        for n, line in _lines(read_text(titles_file, encoding)):
            parts = _split(line, title_sep, 2, titles_file, n, exact=False)
            titles[_int(parts[0], titles_file, n)] = parts[1]
    return rows, titles


def read_ml100k(path: PathLike, name: str) -> Dataset:
    """GroupLens `u.data` (tab: user item rating timestamp) with `u.item` (`|`, latin-1) for titles."""
    rows, titles = _grouplens(path, "\t", Path(path).with_name("u.item"), "|", "latin-1")
    return _numeric(name, rows, path, titles)


def read_ml1m(path: PathLike, name: str) -> Dataset:
    """GroupLens `ratings.dat` (`::`-separated) with `movies.dat` (latin-1) for titles."""
    rows, titles = _grouplens(path, "::", Path(path).with_name("movies.dat"), "::", "latin-1")
    return _numeric(name, rows, path, titles)


_USER_COLUMNS = ("user", "user_id")
_ITEM_COLUMNS = ("item", "item_id")


def table_rows(path: PathLike, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    """(line, fields) of a delimited file with a header: first the header's line and its lower-cased names, then
    every non-blank row. A row of another width or a malformed file is an InputError naming the file and line."""
    reader = csv.reader(io.StringIO(read_text(path, "utf-8-sig"), newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
        while header is not None and not any(c.strip() for c in header):
            header = next(reader, None)
        if header is None:
            raise InputError("empty file", path)
        yield reader.line_num, [c.strip().lower() for c in header]
        for record in reader:
            if not any(c.strip() for c in record):
                continue
            if len(record) != len(header):
                raise InputError(f"expected {len(header)} columns, got {len(record)}", path, reader.line_num)
            yield reader.line_num, record
    except csv.Error as e:
        raise InputError(f"malformed {'TSV' if delimiter == chr(9) else 'CSV'} ({e})", path, reader.line_num) from None


def read_table(path: PathLike, name: str, delimiter: str = ",") -> Dataset:
    """CSV/TSV with a header holding user (or user_id), item (or item_id) and timestamp columns.

    Ids are strings. Users keep their first-appearance order, each history is stable-sorted by time,
    and internal item ids follow first appearance in that ordering.
    """
    rows: list[tuple[str, float, str]] = []
    lines = table_rows(path, delimiter)
    first, names = next(lines)
    cols = _columns(names, (_USER_COLUMNS, _ITEM_COLUMNS, ("timestamp",)), path, first)
    for number, record in lines:
        user, item, ts = (record[c].strip() for c in cols)
        if not user or not item:
            raise InputError("empty user or item id", path, number)
        rows.append((user, _timestamp(ts, path, number), item))
    seqs, dropped = _by_time(rows)
    order = list(dict.fromkeys(i for s in seqs.values() for i in s))
    return _dataset(name, seqs, order, path, duplicates_dropped=dropped)
