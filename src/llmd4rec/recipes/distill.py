"""Recipe `llmd4rec distill`: LLMD4Rec, alternating rounds of downward (SASRec teaches E4SRec) and upward (E4SRec teaches SASRec)
distillation, each phase reading its frozen teacher from an on-disk cache (docs/method.md, "Schedule", "Teacher cache").

Run folder: `crm0/`, `llm0/` (baselines, unless reused from crm_run / llm_run), then per round t
`round{t}-down/` and `round{t}-up/` (checkpoints), `round{t}-cache-crm/`, `round{t}-cache-llm/` (teacher caches),
each phase's `done.json`, and finally results.json, results.md and rounds.png. A killed run resumes with
`--resume`: finished phases are skipped, an unfinished one continues from its last checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path

import torch

from .. import distributed, precision
from ..config import Config
from ..data.dataset import Split
from ..errors import InputError
from ..distributed import evaluate_split
from ..evaluation import metric_key, metric_keys
from ..io import load_tensors, save_tensors
from ..models.sasrec import SASRec
from ..distill.teacher import LogProbEnsemble, build_cache, copy_finished_cache, kd_hook, sample_index
from ..loading import (build_llm, check_reused_runs, distilled_crm, distilled_table, distilled_weights, load_crm,
                       load_data, load_llm, llm_text_table, reused_metrics)
from ..plots import plot_rounds
from ..runs import log_metrics, make_run_dir, seed_everything, truncate_metrics
from ..tables import result_rows, results_table, write_results
from ..text_embeddings import init_item_table_from_text, item_text_embeddings
from ..training.crm import fit_crm
from ..training.llm import fit_llm, sample_grid
from ..training.phase import finish_phase, phase_done, phase_metrics, skip_phase, start_phase


def _evaluate(model, split: Split, cfg: Config, device) -> dict:
    return {w: evaluate_split(model, split, cfg.eval, w, device) for w in ("valid", "test")}


def _settle(start: dict, fitted: dict, keep_start: bool, key: str) -> dict:
    """A distillation phase's outcome: its best distilled epoch, and whether the start is deployed instead (only
    with distill.keep_start, when the distilled model validates no better than the start)."""
    distilled = {**phase_metrics(fitted), "best_epoch": fitted.get("best_epoch")}
    kept = keep_start and distilled["valid"][key] <= start["valid"][key]
    final = start if kept else distilled
    return {"valid": final["valid"], "test": final["test"], "start": phase_metrics(start), "distilled": distilled,
            "kept_start": kept}


def _upward_teacher(cfg: Config, crm: SASRec, llm):
    """(model, kind) of the upward phase's teacher: the LLM, the log-probability ensemble of both models, or the CRM
    itself (the self-distillation control that separates the KL's regularisation from the LLM). The CRM is the one
    the phase starts from: the student is a copy or a new model, so it stays frozen as it is."""
    if cfg.distill.teacher == "self":
        return crm.eval(), "crm"
    if cfg.distill.teacher == "ensemble":
        return LogProbEnsemble(crm.eval(), llm, cfg.distill.ensemble_alpha), "ensemble"
    return llm, "llm"


def run(cfg: Config, resume: str | None = None) -> Path:
    """`llmd4rec distill`: baselines, then Tmax rounds of downward and upward distillation, then the table.

    Under torchrun / accelerate launch every phase trains with DistributedDataParallel and evaluates sharded over
    users; rank 0 alone writes (run folder, teacher caches, metrics, results) while the others wait for its files.
    Each phase's metrics come from its training (the best checkpoint's valid and test) and are kept in its
    done.json, so no model is evaluated twice.
    """
    d = cfg.distill
    if cfg.crm.max_len != cfg.llm.max_len:
        raise InputError(f"crm.max_len ({cfg.crm.max_len}) and llm.max_len ({cfg.llm.max_len}) must match for "
                         "distill: both models share one sample grid")
    check_reused_runs(cfg)
    distributed.refuse_sharding("distill", llm_train=cfg.llm_train)
    main = distributed.is_main  # a function: the process group exists only inside the session
    with distributed.session(cfg.device) as device:
        with distributed.main_first():  # bad data makes no run folder
            dataset, split = load_data(cfg)
        cfg = precision.resolve_config(cfg, device)
        run_dir = distributed.on_main(lambda: make_run_dir(cfg, "llmd4rec", resume))
        seed_everything(cfg.seed)
        n = dataset.n_items
        t_start = time.perf_counter()

        # 1. the CRM baseline (SASRec)
        crm = SASRec(n, cfg.crm).to(device)
        if cfg.crm_run:
            crm = load_crm(Path(cfg.crm_run), n, cfg, device=device)
            crm_m = reused_metrics(cfg, "crm_run") or _evaluate(crm, split, cfg, device)
        elif done := phase_done(run_dir / "crm0"):
            crm = load_crm(run_dir, n, cfg, phase="crm0", device=device)
            crm_m = skip_phase(run_dir / "crm0", done, lambda: _evaluate(crm, split, cfg, device))
        else:
            start_phase(run_dir, "crm0", resume is not None)
            if cfg.crm.text_init:
                init_item_table_from_text(crm, cfg, dataset)
            crm_m = phase_metrics(fit_crm(crm, split, cfg, run_dir, phase="crm0", resume=resume is not None))
            finish_phase(run_dir / "crm0", crm_m)

        # 2. the LLM baseline (E4SRec), its ID table copied from the CRM
        if cfg.llm_run:
            llm = load_llm(Path(cfg.llm_run), n, cfg, device=device)
            llm_m = reused_metrics(cfg, "llm_run") or _evaluate(llm, split, cfg, device)
        else:
            table_path = run_dir / "llm0" / "item_table.safetensors"
            text_path = run_dir / "llm0" / "text_table.safetensors"
            if main() and not table_path.exists():
                save_tensors(table_path, {"item_table": crm.item_emb.weight.detach().cpu()})
            if main() and cfg.llm.item_text and not text_path.exists():
                save_tensors(text_path, {"text_table": item_text_embeddings(cfg, dataset).cpu()})
            distributed.barrier()
            llm = build_llm(cfg, load_tensors(table_path)["item_table"], device, llm_text_table(run_dir, cfg))
            if done := phase_done(run_dir / "llm0"):
                llm = load_llm(run_dir, n, cfg, device=device, phase="llm0")
                llm_m = skip_phase(run_dir / "llm0", done, lambda: _evaluate(llm, split, cfg, device))
            else:
                start_phase(run_dir, "llm0", resume is not None)
                llm_m = phase_metrics(fit_llm(llm, split, cfg, run_dir, phase="llm0", resume=resume is not None))
                finish_phase(run_dir / "llm0", llm_m)
        history = [{"round": 0, "crm": crm_m, "llm": llm_m}]
        if main():
            if resume is not None:
                truncate_metrics(run_dir, "baselines", -1)
            log_metrics(run_dir, {"phase": "baselines", "epoch": 0, **history[0]})

        # 3. alternating rounds
        llm_grid = sample_grid(split.train, cfg.llm.max_len, cfg.llm_train.max_targets_per_user)
        crm_grid = sample_grid(split.train, cfg.crm.max_len, d.last_k if d.positions == "last_k" else 0)
        for t in range(1, d.rounds + 1):
            record = {"round": t}
            if d.direction in ("both", "downward"):
                phase = f"round{t}-down"
                folder = run_dir / phase
                if done := phase_done(folder):
                    llm.load_trainable_state_dict(load_tensors(distilled_weights(folder)))
                    llm.set_item_embeddings(load_tensors(distilled_table(folder))["item_table"])
                    llm_m = skip_phase(folder, done, lambda: _evaluate(llm, split, cfg, device))
                else:
                    start_state = {k: v.clone() for k, v in llm.trainable_state_dict().items()}
                    start_table = llm.item_table.clone()
                    if d.embedding_update:
                        llm.set_item_embeddings(crm.item_emb.weight)
                    if main():
                        save_tensors(folder / "item_table.safetensors", {"item_table": llm.item_table})
                    with distributed.main_first():
                        cache = build_cache(run_dir / f"round{t}-cache-crm", crm, "crm", *llm_grid, n, d.t1,
                                            d.cache_topk, device, 256)
                    kd = kd_hook(cache, sample_index(llm_grid[1]), d.gamma, d.t_squared, d.adaptive_weights, "llm")
                    tc = dataclasses.replace(cfg.llm_train, epochs=d.llm_epochs, patience=d.llm_epochs)
                    start_phase(run_dir, phase, resume is not None)
                    fitted = fit_llm(llm, split, cfg, run_dir, phase=phase, train_cfg=tc, kd=kd,
                                     resume=resume is not None)
                    llm_m = _settle(llm_m, fitted, d.keep_start, metric_key(cfg.eval))
                    if llm_m["kept_start"]:
                        llm.load_trainable_state_dict(start_state)
                        llm.set_item_embeddings(start_table)
                    if main():
                        save_tensors(folder / "final.safetensors", llm.trainable_state_dict())
                        save_tensors(folder / "final_item_table.safetensors", {"item_table": llm.item_table})
                    finish_phase(folder, llm_m)
                record.update(llm_distilled=llm_m.get("distilled"), llm_kept_start=llm_m.get("kept_start"))
            if d.direction in ("both", "upward"):
                phase = f"round{t}-up"
                folder = run_dir / phase
                if done := phase_done(folder):
                    crm = distilled_crm(run_dir, phase, n, cfg, device)
                    crm_m = skip_phase(folder, done, lambda: _evaluate(crm, split, cfg, device))
                else:
                    crm, crm_m = _upward(cfg, t, crm, crm_m, llm, split, dataset, run_dir, device, crm_grid,
                                         resume is not None)
                record.update(crm_distilled=crm_m.get("distilled"), crm_kept_start=crm_m.get("kept_start"))
            history.append({**record, "crm": phase_metrics(crm_m), "llm": phase_metrics(llm_m)})
            if main():
                if resume is not None:
                    truncate_metrics(run_dir, "rounds", t - 1)
                log_metrics(run_dir, {"phase": "rounds", "epoch": t, **history[-1]})

        rows = result_rows(history)
        if main():
            table = results_table(rows, dataset.name, cfg.eval, cfg.llm.backbone, cfg.llm.keep_layers)
            results = {"model": "LLMD4Rec", "dataset": dataset.name, "backbone": cfg.llm.backbone,
                       "keep_layers": cfg.llm.keep_layers, "exclude_seen": cfg.eval.exclude_seen,
                       "eval_mode": cfg.eval.mode, "distill": vars(d), "rows": rows, "history": history,
                       "seconds": time.perf_counter() - t_start, "world_size": distributed.world_size()}
            write_results(run_dir, results, table)
            plot_rounds(history, run_dir / "rounds.png", metric_keys(cfg.eval, ks=(10,)))
            print(table, flush=True)
        distributed.barrier()
    return run_dir


def _upward(cfg: Config, t: int, crm: SASRec, crm_m: dict, llm, split: Split, dataset, run_dir: Path, device,
            grid: tuple[torch.Tensor, torch.Tensor], resume: bool) -> tuple[SASRec, dict]:
    """One upward phase: the frozen teacher's logits cached at T2, then the CRM trained with L_CRM, either on from
    its weights (distill.upward_init=continue, at distill.upward_lr) or from a new initialisation with the KD term
    from its first step (scratch); the start is deployed instead where distill.keep_start says so."""
    d = cfg.distill
    phase = f"round{t}-up"
    folder = run_dir / phase
    kd = None
    if d.beta > 0:
        teacher, kind = _upward_teacher(cfg, crm, llm)
        path = run_dir / f"round{t}-cache-{kind}"
        with distributed.main_first():
            if d.cache_from and distributed.is_main():
                copy_finished_cache(Path(d.cache_from) / path.name, path)
            cache = build_cache(path, teacher, kind, *grid, crm.n_items, d.t2,
                                d.cache_topk, device, 256 if kind == "crm" else d.cache_users_per_batch,
                                info={"ensemble_alpha": d.ensemble_alpha} if kind == "ensemble" else None)
        kd = kd_hook(cache, sample_index(grid[1]), d.beta, d.t_squared, d.adaptive_weights, "crm",
                     rank=(d.rank_k, d.rank_lambda) if d.upward_loss == "rank" else None)
    start = crm
    if d.upward_init == "scratch":
        torch.manual_seed(cfg.seed + t)
        student = SASRec(crm.n_items, cfg.crm).to(device)
        if cfg.crm.text_init:
            init_item_table_from_text(student, cfg, dataset)
    else:
        student = copy.deepcopy(crm)
    tc = dataclasses.replace(cfg.crm_train, epochs=d.crm_epochs, lr=d.upward_lr or cfg.crm_train.lr)
    start_phase(run_dir, phase, resume)
    fitted = fit_crm(student, split, cfg, run_dir, phase=phase, train_cfg=tc, kd=kd, resume=resume)
    outcome = _settle(crm_m, fitted, d.keep_start, metric_key(cfg.eval))
    final = start if outcome["kept_start"] else student
    if distributed.is_main():
        save_tensors(folder / "final.safetensors", final.state_dict())
    finish_phase(folder, outcome)
    return final, outcome
