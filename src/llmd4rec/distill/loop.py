"""Recipe: LLMD4Rec, alternating rounds of downward (SASRec teaches E4SRec) and upward (E4SRec teaches SASRec)
distillation, each phase reading its frozen teacher from an on-disk cache (docs/method.md, "Schedule", "Teacher cache").

Run folder: `crm0/`, `llm0/` (baselines, unless reused from crm_run / llm_run), then per round t
`round{t}-down/` and `round{t}-up/` (checkpoints), `round{t}-cache-crm/`, `round{t}-cache-llm/` (teacher caches),
each phase's `done.json`, and finally results.json, results.md and rounds.png. A killed run resumes with
`--resume`: finished phases are skipped, an unfinished one continues from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import torch

from .. import distributed
from ..config import Config
from ..data.dataset import Split
from ..errors import InputError
from ..evaluation import evaluate_split
from ..io import atomic_write_json, load_tensors, read_json, save_tensors
from ..models.sasrec import SASRec
from ..pretrained import load_crm, load_data
from ..runs import format_table, log_metrics, make_run_dir, seed_everything, truncate_metrics, write_results
from ..training.checkpoint import has_checkpoint
from ..training.crm import fit_crm
from ..training.llm import build_llm, fit_llm, load_llm, sample_grid
from .cache import TeacherCache, TeacherCacheReader
from .weights import weights_crm_to_llm, weights_llm_to_crm

KEYS = [f"{m}@{k}" for m in ("HR", "NDCG") for k in (5, 10, 20)]


def sample_index(targets: torch.Tensor) -> torch.Tensor:
    """[U, L] grid -> sample id of each cell with a target (row-major, as the cache rows), -1 elsewhere."""
    index = torch.full(targets.shape, -1, dtype=torch.long)
    rows, cols = (targets > 0).nonzero(as_tuple=True)
    index[rows, cols] = torch.arange(len(rows))
    return index


@torch.no_grad()
def build_cache(path: Path, teacher, kind: str, inputs: torch.Tensor, targets: torch.Tensor, n_items: int,
                temperature: float, k: int, device: torch.device, users_per_batch: int) -> TeacherCacheReader:
    """Run the frozen teacher once over every sample of the grid and keep its logits on disk.

    A finished cache that fails its checks (truncated, corrupt) is rebuilt from the teacher, with a warning."""
    keep = True
    if (path / "header.json").exists():
        try:
            return TeacherCache.open(path)
        except InputError as e:
            print(f"warning: {e}; rebuilding the teacher cache", file=sys.stderr, flush=True)
            keep = False
    rows_all, cols_all = (targets > 0).nonzero(as_tuple=True)
    per_user = (targets > 0).sum(1)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), per_user.cumsum(0)])
    writer = TeacherCache.create(path, len(rows_all), n_items, k, temperature, resume=keep,
                                 info={"teacher": kind, "samples": len(rows_all)})
    pending = {s for s, _ in writer.pending_ranges(len(rows_all))}
    done_upto = min(pending) if pending else len(rows_all)
    teacher.eval()
    for u0 in range(0, len(targets), users_per_batch):
        u1 = min(u0 + users_per_batch, len(targets))
        s0, s1 = int(starts[u0]), int(starts[u1])
        if s1 <= done_upto or s0 == s1:
            continue
        x, y = inputs[u0:u1].to(device), targets[u0:u1].to(device)
        r, c = (y > 0).nonzero(as_tuple=True)
        if kind == "crm":
            logits = teacher.score_items(teacher.hidden(x)[r, c], 0, n_items + 1)
        else:
            logits = teacher.prefix_logits(x, r, c)
        logits[:, 0] = float("-inf")
        writer.write(s0, logits.float(), y[r, c])
    return writer.finalize()


def kd_hook(cache: TeacherCacheReader, index: torch.Tensor, scale: float, t_squared: bool, adaptive: bool,
            student: str):
    """The KL term of L_LLM (student "llm", weight w1) or L_CRM (student "crm", weight w2), averaged per sample."""

    def kd(users: torch.Tensor, cols: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ids = index[users.cpu(), cols.cpu()].to(logits.device)
        n = len(logits)
        covered = ids >= 0
        if not bool(covered.any()):
            return logits.new_zeros(())
        if not bool(covered.all()):  # positions=last_k: only some samples have a teacher row
            ids, logits, targets = ids[covered], logits[covered], targets[covered]
        kl, r_student = cache.kl_and_student_ranks(logits, ids, targets if adaptive else None, t_squared)
        if adaptive:
            r_teacher = cache.target_ranks(ids).to(r_student.device)
            if student == "llm":
                w = weights_crm_to_llm(r_teacher, r_student)
            else:
                w = weights_llm_to_crm(r_student, r_teacher)
            kl = kl * w.to(kl.device)
        return scale * kl.sum() / n

    return kd


def _phase_done(folder: Path) -> dict | None:
    """done.json is written atomically after a phase's last file, so its presence alone means finished."""
    if not (folder / "done.json").exists():
        return None
    try:
        done = read_json(folder / "done.json")
    except InputError as e:
        print(f"warning: {e}; the phase counts as finished", file=sys.stderr, flush=True)
        done = None
    return done if isinstance(done, dict) and done else {"phase": folder.name}


def _rng_file(folder: Path) -> Path:
    world = distributed.world_size()
    return folder / ("rng.safetensors" if world == 1 else f"rng.rank{distributed.rank()}-of-{world}.safetensors")


def _finish_phase(folder: Path, metrics: dict) -> None:
    """Mark a phase finished, with its model's valid/test metrics and the RNG state it ended with: a resume that
    skips it restores that state, so the phases after it draw the same dropout masks as in an uninterrupted run.
    Every rank keeps its own RNG state; done.json (rank 0) goes last, once every rank's state is on disk."""
    save_tensors(_rng_file(folder), {"rng.torch": torch.get_rng_state()})
    distributed.barrier()
    if distributed.is_main():
        atomic_write_json(folder / "done.json", {"phase": folder.name, "valid": metrics["valid"],
                                                 "test": metrics["test"]})


def _skip_phase(folder: Path, done: dict, model, split: Split, cfg: Config, device) -> dict:
    """The RNG side of skipping a finished phase (its weights are loaded by the caller), and its metrics."""
    rng = _rng_file(folder)
    if rng.exists():
        try:
            torch.set_rng_state(load_tensors(rng)["rng.torch"])
        except (InputError, KeyError, RuntimeError) as e:
            print(f"warning: {e}; later phases will not repeat the uninterrupted run's random draws",
                  file=sys.stderr, flush=True)
    if "valid" in done and "test" in done:
        return {"valid": done["valid"], "test": done["test"]}
    return _evaluate(model, split, cfg, device)  # a phase finished by an older version kept no metrics


def _start_phase(run_dir: Path, phase: str, resume: bool) -> None:
    """A resumed phase without a checkpoint starts over: drop the lines its interrupted attempt logged."""
    if resume and distributed.is_main() and not has_checkpoint(run_dir / phase, "last"):
        truncate_metrics(run_dir, phase, -1)


def _evaluate(model, split: Split, cfg: Config, device) -> dict:
    return {w: evaluate_split(model, split, cfg.eval, w, device) for w in ("valid", "test")}


def _metrics(fitted: dict) -> dict:
    return {"valid": fitted["valid"], "test": fitted["test"]}


def run(cfg: Config, resume: str | None = None) -> Path:
    """`llmd4rec distill`: baselines, then Tmax rounds of downward and upward distillation, then the table.

    Under torchrun / accelerate launch every phase trains with DistributedDataParallel and evaluates sharded over
    users; rank 0 alone writes (run folder, teacher caches, metrics, results) while the others wait for its files.
    Each phase's metrics come from its training (the best checkpoint's valid and test) and are kept in its
    done.json, so no model is evaluated twice.
    """
    d = cfg.distill
    if d.direction not in ("both", "upward", "downward"):
        raise ValueError(f"distill.direction must be both, upward or downward, got '{d.direction}'")
    if cfg.crm.max_len != cfg.llm.max_len:
        raise ValueError("crm.max_len and llm.max_len must match: both models share one sample grid")
    distributed.refuse_sharding("distill", crm_train=cfg.crm_train, llm_train=cfg.llm_train)
    main = distributed.is_main  # a function: the process group exists only inside the session
    with distributed.session(cfg.device) as device:
        run_dir = distributed.on_main(lambda: make_run_dir(cfg, "llmd4rec", resume))
        seed_everything(cfg.seed)
        with distributed.main_first():
            dataset, split = load_data(cfg)
        n = dataset.n_items
        t_start = time.perf_counter()

        # 1. the CRM baseline (SASRec)
        crm = SASRec(n, cfg.crm).to(device)
        if cfg.crm_run:
            crm = load_crm(Path(cfg.crm_run), n, cfg, device=device)
            crm_m = _evaluate(crm, split, cfg, device)
        elif done := _phase_done(run_dir / "crm0"):
            crm = load_crm(run_dir, n, cfg, phase="crm0", device=device)
            crm_m = _skip_phase(run_dir / "crm0", done, crm, split, cfg, device)
        else:
            _start_phase(run_dir, "crm0", resume is not None)
            crm_m = _metrics(fit_crm(crm, split, cfg, run_dir, phase="crm0", resume=resume is not None))
            _finish_phase(run_dir / "crm0", crm_m)

        # 2. the LLM baseline (E4SRec), its ID table copied from the CRM
        if cfg.llm_run:
            llm = load_llm(Path(cfg.llm_run), n, cfg, device=device)
            llm_m = _evaluate(llm, split, cfg, device)
        else:
            table_path = run_dir / "llm0" / "item_table.safetensors"
            if main() and not table_path.exists():
                save_tensors(table_path, {"item_table": crm.item_emb.weight.detach().cpu()})
            distributed.barrier()
            llm = build_llm(cfg, load_tensors(table_path)["item_table"], device)
            if done := _phase_done(run_dir / "llm0"):
                llm = load_llm(run_dir, n, cfg, device=device, phase="llm0")
                llm_m = _skip_phase(run_dir / "llm0", done, llm, split, cfg, device)
            else:
                _start_phase(run_dir, "llm0", resume is not None)
                llm_m = _metrics(fit_llm(llm, split, cfg, run_dir, phase="llm0", resume=resume is not None))
                _finish_phase(run_dir / "llm0", llm_m)
        history = [{"round": 0, "crm": crm_m, "llm": llm_m}]
        if main():
            if resume is not None:
                truncate_metrics(run_dir, "baselines", -1)
            log_metrics(run_dir, {"phase": "baselines", "epoch": 0, **history[0]})

        # 3. alternating rounds
        llm_grid = sample_grid(split.train, cfg.llm.max_len, cfg.llm_train.max_targets_per_user)
        crm_grid = sample_grid(split.train, cfg.crm.max_len, d.last_k if d.positions == "last_k" else 0)
        users_per_batch = max(1, cfg.llm_train.batch_size)
        for t in range(1, d.rounds + 1):
            if d.direction in ("both", "downward"):
                phase = f"round{t}-down"
                if done := _phase_done(run_dir / phase):
                    llm.load_trainable_state_dict(load_tensors(run_dir / phase / "best.safetensors"))
                    llm.set_item_embeddings(load_tensors(run_dir / phase / "item_table.safetensors")["item_table"])
                    llm_m = _skip_phase(run_dir / phase, done, llm, split, cfg, device)
                else:
                    if d.embedding_update:
                        llm.set_item_embeddings(crm.item_emb.weight)
                    if main():
                        save_tensors(run_dir / phase / "item_table.safetensors", {"item_table": llm.item_table})
                    with distributed.main_first():
                        cache = build_cache(run_dir / f"round{t}-cache-crm", crm, "crm", *llm_grid, n, d.t1,
                                            d.cache_topk, device, 256)
                    kd = kd_hook(cache, sample_index(llm_grid[1]), d.gamma, d.t_squared, d.adaptive_weights, "llm")
                    tc = dataclasses.replace(cfg.llm_train, epochs=d.llm_epochs, patience=d.llm_epochs)
                    _start_phase(run_dir, phase, resume is not None)
                    llm_m = _metrics(fit_llm(llm, split, cfg, run_dir, phase=phase, train_cfg=tc, kd=kd,
                                             resume=resume is not None, keep_start=True))
                    _finish_phase(run_dir / phase, llm_m)
            if d.direction in ("both", "upward"):
                phase = f"round{t}-up"
                if done := _phase_done(run_dir / phase):
                    crm = load_crm(run_dir, n, cfg, phase=phase, device=device)
                    crm_m = _skip_phase(run_dir / phase, done, crm, split, cfg, device)
                else:
                    with distributed.main_first():
                        cache = build_cache(run_dir / f"round{t}-cache-llm", llm, "llm", *crm_grid, n, d.t2,
                                            d.cache_topk, device, users_per_batch)
                    kd = kd_hook(cache, sample_index(crm_grid[1]), d.beta, d.t_squared, d.adaptive_weights, "crm")
                    tc = dataclasses.replace(cfg.crm_train, epochs=d.crm_epochs)
                    _start_phase(run_dir, phase, resume is not None)
                    crm_m = _metrics(fit_crm(crm, split, cfg, run_dir, phase=phase, train_cfg=tc, kd=kd,
                                             resume=resume is not None, keep_start=True))
                    _finish_phase(run_dir / phase, crm_m)
            history.append({"round": t, "crm": crm_m, "llm": llm_m})
            if main():
                if resume is not None:
                    truncate_metrics(run_dir, "rounds", t - 1)
                log_metrics(run_dir, {"phase": "rounds", "epoch": t, **history[-1]})

        rows = {"SASRec": history[0]["crm"], "E4SRec": history[0]["llm"],
                "LLMD4Rec_C": history[-1]["crm"], "LLMD4Rec_L": history[-1]["llm"]}
        if main():
            results = {"model": "LLMD4Rec", "dataset": dataset.name, "backbone": cfg.llm.backbone,
                       "keep_layers": cfg.llm.keep_layers, "exclude_seen": cfg.eval.exclude_seen,
                       "eval_mode": cfg.eval.mode, "distill": vars(d), "rows": rows, "history": history,
                       "seconds": time.perf_counter() - t_start, "world_size": distributed.world_size()}
            write_results(run_dir, results, results_table(rows, dataset.name, cfg))
            plot_rounds(history, run_dir / "rounds.png")
            print(results_table(rows, dataset.name, cfg), flush=True)
        distributed.barrier()
    return run_dir


def results_table(rows: dict[str, dict], dataset: str, cfg: Config) -> str:
    """The paper's table: test HR/NDCG@5/10/20 per model, and each distilled model's gain over its baseline."""
    test = {name: r["test"] for name, r in rows.items()}
    table = format_table(test, KEYS)
    gains = {}
    for distilled, base in (("LLMD4Rec_C", "SASRec"), ("LLMD4Rec_L", "E4SRec")):
        gains[f"{distilled} vs {base}"] = {k: 100 * (test[distilled][k] / test[base][k] - 1) if test[base][k] else 0.0
                                           for k in KEYS}
    gain_table = format_table(gains, KEYS).replace("| model |", "| relative gain (%) |")
    return (f"Test metrics on {dataset} (full ranking over all items, exclude_seen={cfg.eval.exclude_seen}, "
            f"backbone {cfg.llm.backbone}, keep_layers={cfg.llm.keep_layers})\n\n{table}\n{gain_table}")


def plot_rounds(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    rounds = [h["round"] for h in history]
    for ax, key in zip(axes, ("HR@10", "NDCG@10")):
        for name, label in (("crm", "SASRec side (CRM)"), ("llm", "E4SRec side (LLM)")):
            ax.plot(rounds, [h[name]["test"][key] for h in history], marker="o", label=label)
        ax.set_title(f"test {key} per round (0 = baselines)")
        ax.set_xlabel("round")
        ax.set_xticks(rounds)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_distilled(run_dir: Path, n_items: int, cfg: Config, device: torch.device | str = "cpu",
                   which: str = "crm"):
    """The final model of one side: the last finished round's checkpoint, or the baseline if none ran."""
    run_dir = Path(run_dir)
    side = "up" if which == "crm" else "down"
    for t in range(cfg.distill.rounds, 0, -1):
        folder = run_dir / f"round{t}-{side}"
        if (folder / "done.json").exists():
            if which == "crm":
                return load_crm(run_dir, n_items, cfg, phase=folder.name, device=device)
            model = build_llm(cfg, load_tensors(folder / "item_table.safetensors")["item_table"], device)
            model.load_trainable_state_dict(load_tensors(folder / "best.safetensors"))
            return model.eval()
    if which == "crm":
        return load_crm(Path(cfg.crm_run) if cfg.crm_run else run_dir, n_items, cfg,
                        phase="crm" if cfg.crm_run else "crm0", device=device)
    return load_llm(Path(cfg.llm_run) if cfg.llm_run else run_dir, n_items, cfg, device=device,
                    phase="llm" if cfg.llm_run else "llm0")
