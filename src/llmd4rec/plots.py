"""Training curves from metrics.jsonl (loss and validation NDCG@10 / HR@10 per epoch, one line per phase), and a
distillation run's test metrics per round."""

from __future__ import annotations

from pathlib import Path

from .errors import InputError
from .runs import read_metrics


def plot_run(run_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    if not records:
        raise InputError("no metrics.jsonl records to plot", run_dir)
    phases: dict[str, list[dict]] = {}
    for r in records:
        phases.setdefault(r.get("phase", "train"), []).append(r)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for phase, rows in phases.items():
        trained = [r for r in rows if "loss" in r]
        axes[0].plot([r["epoch"] for r in trained], [r["loss"] for r in trained], marker=".", label=phase)
        ev = [r for r in rows if isinstance(r.get("valid"), dict)]
        for ax, key in ((axes[1], "NDCG@10"), (axes[2], "HR@10")):
            values = [r["valid"].get(key, r["valid"].get(f"sampled_{key}")) for r in ev]  # either protocol
            ax.plot([r["epoch"] for r in ev], values, marker=".", label=phase)
    for ax, title in zip(axes, ("training loss", "validation NDCG@10", "validation HR@10")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return [out]


def plot_rounds(history: list[dict], path: Path, keys: list[str]) -> None:
    """Test `keys` (two metrics: the eval mode's HR@10 and NDCG@10) per round for both sides: solid the deployed
    model, dashed each phase's best distilled epoch (they differ where a phase fell back to its start)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    rounds = [h["round"] for h in history]
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
