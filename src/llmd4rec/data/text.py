"""Item text: what a language model can read about an item and an ID-only recommender cannot.

A dataset carries it as named fields per internal item id (`Dataset.item_text`: field -> list of n_items + 1
strings, "" where unknown). Sources: `item_text.tsv` beside an S3Rec file (Beauty, Toys: title, brand, categories),
MovieLens' item files (title, year, genres), or any CSV/TSV of item id and text columns (`data.item_text=PATH`).
`build_amazon_item_text` makes the S3Rec `item_text.tsv` from the Amazon 2014 metadata dump and an ASIN map.
"""

from __future__ import annotations

import ast
import gzip
import json
from pathlib import Path

from ..errors import InputError
from ..io import atomic_write_text
from .dataset import Dataset
from .readers import PathLike, _atomic_rows, read_text, table_rows

ID_FIELDS = ("asin", "item_id", "id")  # identifiers, not text a language model knows anything about


def read_text_table(path: PathLike) -> dict[str, dict[str, str]]:
    """CSV/TSV (by extension; .tsv or .txt: tab) with a header: the first column is the item id, every other column
    a text field. Returns original item id -> {field: text}."""
    lines = table_rows(path, "," if str(path).lower().endswith(".csv") else "\t")
    first, names = next(lines)
    if len(names) < 2:
        raise InputError("item text needs a header row with an item id column and at least one text column", path,
                         first)
    out: dict[str, dict[str, str]] = {}
    for number, record in lines:
        item = record[0].strip()
        if not item:
            raise InputError("empty item id", path, number)
        if item in out:
            raise InputError(f"item {item} appears twice", path, number)
        out[item] = {n: v.strip() for n, v in zip(names[1:], record[1:])}
    return out


def read_atomic_item_text(path: PathLike) -> dict[str, dict[str, str]]:
    """MovieLens as a RecBole `.item` file: its title, and its year and genres where the file has them."""
    header = read_text(path).split("\n", 1)[0]
    names = {c.split(":", 1)[0].strip() for c in header.split("\t")}
    optional = [(field, options) for field, options in (("year", ("release_year",)), ("genres", ("class", "genre")))
                if any(o in names for o in options)]
    wanted = (("item_id",), ("movie_title", "title"), *(options for _, options in optional))
    return {values[0]: {"title": values[1],
                        **{field: v.replace(" ", ", ") if field == "genres" else v
                           for (field, _), v in zip(optional, values[2:])}}
            for _, values in _atomic_rows(path, wanted)}


def find_item_text(dataset_file: Path) -> dict[str, dict[str, str]] | None:
    """The item text shipped beside a dataset file, if any."""
    beside = dataset_file.with_name("item_text.tsv")
    if beside.is_file():
        return read_text_table(beside)
    if dataset_file.suffix == ".inter" and dataset_file.with_suffix(".item").is_file():
        return read_atomic_item_text(dataset_file.with_suffix(".item"))
    return None


def attach_item_text(dataset: Dataset, table: dict[str, dict[str, str]], source: PathLike) -> Dataset:
    """Set dataset.item_text from original-id rows; ids not in the catalogue are ignored, missing items get ""."""
    index = {orig: i for i, orig in enumerate(dataset.item_ids) if i > 0}
    if not any(item in index for item in table):
        raise InputError(f"no item id of the text file is in dataset '{dataset.name}' "
                         f"(e.g. {next(iter(table), 'none')!r} against {dataset.item_ids[1]!r})", source)
    fields = list(dict.fromkeys(f for row in table.values() for f in row))
    columns = {f: [""] * (dataset.n_items + 1) for f in fields}
    for item, row in table.items():
        i = index.get(item)
        if i is not None:
            for f, v in row.items():
                columns[f][i] = v
    dataset.item_text = columns
    if "title" in columns:
        fallback = dataset.titles or [""] * len(columns["title"])  # e.g. "ASIN ..." where there is no title
        dataset.titles = [t or f for t, f in zip(columns["title"], fallback)]
    return dataset


def item_strings(dataset: Dataset, fields: list[str]) -> list[str]:
    """One string per internal id: the chosen fields joined by ". " ("" for padding and items without text).
    Categories keep their first path only: later paths repeat the same hierarchy in other words."""
    if dataset.item_text is None:
        raise InputError(f"dataset '{dataset.name}' has no item text: give data.item_text=PATH (a CSV/TSV of item id "
                         "and text columns)")
    missing = [f for f in fields if f not in dataset.item_text]
    if missing:
        raise InputError(f"text.fields names {', '.join(missing)}, not in the item text "
                         f"(has {', '.join(dataset.item_text)})")
    out = []
    for i in range(dataset.n_items + 1):
        parts = []
        for f in fields:
            value = dataset.item_text[f][i]
            if f in ("categories", "genres"):
                value = value.split(" | ")[0]
            if value:
                parts.append(value)
        out.append(". ".join(parts) if i > 0 else "")
    return out


def text_coverage(dataset: Dataset) -> float | None:
    """Share of items with any text: the rest fall back to ID-only."""
    if dataset.item_text is None:
        return None
    columns = [col for f, col in dataset.item_text.items() if f not in ID_FIELDS]
    has = sum(any(col[i] for col in columns) for i in range(1, dataset.n_items + 1))
    return has / max(dataset.n_items, 1)


def _meta_record(line: str, path: PathLike, number: int) -> dict:
    """One metadata line: JSON, or the 2014 dump's Python-literal dicts (parsed as literals, never executed)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        try:
            record = ast.literal_eval(line)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise InputError("neither JSON nor a Python literal dict", path, number) from None
    if not isinstance(record, dict):
        raise InputError(f"expected a dict, got {type(record).__name__}", path, number)
    return record


def build_amazon_item_text(meta: PathLike, asin_map: PathLike, out: PathLike) -> dict[str, int]:
    """`item_id asin title brand categories` TSV for the ids of an `item_id<TAB>asin` map, from meta_*.json(.gz)."""
    asins: dict[str, str] = {}
    for number, line in enumerate(read_text(asin_map).splitlines(), 1):
        parts = line.rstrip("\n").split("\t")
        if number == 1 and not parts[0].strip().isdigit():
            continue
        if len(parts) != 2:
            raise InputError(f"expected item_id<TAB>asin, got {len(parts)} fields", asin_map, number)
        asins[parts[1].strip()] = parts[0].strip()
    found: dict[str, dict] = {}
    try:
        opener = gzip.open if str(meta).endswith(".gz") else open
        with opener(meta, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                record = _meta_record(line, meta, number)
                asin = record.get("asin")
                if asin in asins:
                    found[asin] = record
    except OSError as e:
        raise InputError(f"cannot read metadata ({e.strerror or e.__class__.__name__})", meta) from None

    def clean(value) -> str:
        return " ".join(str(value or "").split())

    rows = ["item_id\tasin\ttitle\tbrand\tcategories"]
    for asin, item in sorted(asins.items(), key=lambda kv: int(kv[1]) if kv[1].isdigit() else kv[1]):
        record = found.get(asin, {})
        paths = record.get("categories") or []
        cats = " | ".join(" > ".join(clean(c) for c in p) for p in paths if isinstance(p, (list, tuple)))
        rows.append("\t".join([item, asin, clean(record.get("title")), clean(record.get("brand")), cats]))
    atomic_write_text(Path(out), "\n".join(rows) + "\n")
    return {"items": len(asins), "with_metadata": len(found),
            "with_title": sum(1 for r in found.values() if clean(r.get("title")))}
