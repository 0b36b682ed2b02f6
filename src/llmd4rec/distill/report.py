"""What a distillation run reports: the paper's table (with and without each phase's fall-back to its start) and
the per-round plot."""

from __future__ import annotations

from pathlib import Path

from ..runs import format_table

KEYS = [f"{m}@{k}" for m in ("HR", "NDCG") for k in (5, 10, 20)]


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


def _keys(rows: dict[str, dict]) -> list[str]:
    """The table's metric keys: those every row has (sampled-mode runs carry a sampled_ prefix; eval.ks may differ)."""
    common = set.intersection(*(set(r["test"]) for r in rows.values()))
    wanted = [k for k in KEYS if k in common]
    return wanted or sorted(k for k in common if k.removeprefix("sampled_").split("@")[0] in ("HR", "NDCG"))


def results_table(rows: dict[str, dict], dataset: str, exclude_seen: bool, backbone: str,
                  keep_layers: int | None) -> str:
    """Test metrics per model, and each distilled model's relative gain over its baseline."""
    test = {name: r["test"] for name, r in rows.items()}
    keys = _keys(rows)
    table = format_table(test, keys)
    gains = {}
    for distilled, base in (("LLMD4Rec_C", "SASRec"), ("LLMD4Rec_L", "E4SRec")):
        gains[f"{distilled} vs {base}"] = {k: 100 * (test[distilled][k] / test[base][k] - 1) if test[base][k] else 0.0
                                           for k in keys}
    gain_table = format_table(gains, keys).replace("| model |", "| relative gain (%) |")
    return (f"Test metrics on {dataset} (full ranking over all items, exclude_seen={exclude_seen}, "
            f"backbone {backbone}, keep_layers={keep_layers})\n\n{table}\n{gain_table}")


def plot_rounds(history: list[dict], path: Path) -> None:
    """Test HR@10 / NDCG@10 per round for both sides: solid the deployed model, dashed each phase's best distilled
    epoch (they differ where a phase fell back to its start)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    rounds = [h["round"] for h in history]
    keys = [k for k in ("HR@10", "NDCG@10") if k in history[0]["crm"]["test"]] or list(history[0]["crm"]["test"])[:2]
    for ax, key in zip(axes, keys):
        for side, label, color in (("crm", "SASRec side (CRM)", "C0"), ("llm", "E4SRec side (LLM)", "C1")):
            ax.plot(rounds, [h[side]["test"][key] for h in history], marker="o", color=color, label=label)
            distilled = [(h["round"], h[f"{side}_distilled"]["test"][key]) for h in history
                         if h.get(f"{side}_distilled")]
            if distilled:
                ax.plot([0] + [r for r, _ in distilled], [history[0][side]["test"][key]] + [v for _, v in distilled],
                        ls="--", marker="x", color=color, label=f"{label}, distilled (no fall-back)")
        ax.set_title(f"test {key} per round (0 = baselines)")
        ax.set_xlabel("round")
        ax.set_xticks(rounds)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
