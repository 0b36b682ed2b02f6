"""Results tables: the markdown table every recipe prints and writes to results.md, and the distillation run's
table (with and without each phase's fall-back to its start, and each distilled model's gain over its baseline)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .evaluation import metric_keys
from .io import atomic_write_json, atomic_write_text


def format_table(rows: dict[str, dict[str, float]], keys: list[str]) -> str:
    """Markdown table, one row per model."""
    head = "| model | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys) + "\n"
    body = "".join(f"| {name} | " + " | ".join(f"{m.get(k, float('nan')):.4f}" for k in keys) + " |\n"
                   for name, m in rows.items())
    return head + body


def write_results(run_dir: Path, results: dict[str, Any], table: str) -> None:
    atomic_write_json(run_dir / "results.json", results)
    atomic_write_text(run_dir / "results.md", table)


def result_rows(history: list[dict]) -> dict[str, dict]:
    """Baselines, the deployed models (each phase kept its start when that validated better, if distill.keep_start),
    and the last phase's own best distilled epoch on each side, whatever the fall-back chose."""
    first, last = history[0], history[-1]
    rows = {"SASRec": first["crm"], "E4SRec": first["llm"], "LLMD4Rec_C": last["crm"], "LLMD4Rec_L": last["llm"]}
    for side, name in (("crm", "LLMD4Rec_C"), ("llm", "LLMD4Rec_L")):
        distilled = next((h[f"{side}_distilled"] for h in reversed(history) if h.get(f"{side}_distilled")), None)
        if distilled is not None:
            rows[f"{name} (distilled, no fall-back)"] = distilled
    return rows


def _protocol(eval_cfg) -> str:
    """How the table's numbers were ranked, for its title."""
    if eval_cfg.mode == "sampled":
        return f"sampled ranking against {eval_cfg.n_negatives} unseen negatives per user"
    return f"full ranking over all items, exclude_seen={eval_cfg.exclude_seen}"


def results_table(rows: dict[str, dict], dataset: str, eval_cfg, backbone: str, keep_layers: int | None) -> str:
    """Test metrics per model at the configured eval.ks, and each distilled model's relative gain over its
    baseline."""
    test = {name: r["test"] for name, r in rows.items()}
    keys = metric_keys(eval_cfg)
    table = format_table(test, keys)
    gains = {}
    for distilled, base in (("LLMD4Rec_C", "SASRec"), ("LLMD4Rec_L", "E4SRec")):
        gains[f"{distilled} vs {base}"] = {k: 100 * (test[distilled][k] / test[base][k] - 1) if test[base][k] else 0.0
                                           for k in keys}
    gain_table = format_table(gains, keys).replace("| model |", "| relative gain (%) |")
    return (f"Test metrics on {dataset} ({_protocol(eval_cfg)}, backbone {backbone}, keep_layers={keep_layers})"
            f"\n\n{table}\n{gain_table}")
