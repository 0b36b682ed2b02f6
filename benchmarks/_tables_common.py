"""What readme_tables.py and its table modules share: reading a result file, and the number formats of the tables."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _f(x, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _ndcg(r: dict | None, row: str | None = None, split: str = "test") -> float | None:
    if r is None:
        return None
    m = r["rows"].get(row) if row else r.get("metrics")
    return m[split]["NDCG@10"] if m else None


def _load_note(r: dict) -> str:
    m = r["machine"]
    if "loadavg_start" not in m:
        return "its result file predates the load records"
    return (f"load average {m['loadavg_start'][0]:.1f} at the start and {m['loadavg_end'][0]:.1f} at the end on "
            f"{m['cores']} cores, {m['torch_threads']} torch threads")
