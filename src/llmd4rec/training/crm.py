"""Recipe: train SASRec on the all-positions view (one row per user, a loss at every position)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .. import distributed
from ..config import Config, TrainConfig
from ..data.dataset import Split, all_positions
from ..evaluation import evaluate_split, metric_key
from ..models.bf16 import bf16_cross_entropy, bf16_scores
from ..models.chunked import chunked_cross_entropy
from ..models.sasrec import SASRec
from ..plots import plot_run
from ..pretrained import load_data
from ..text_embeddings import init_item_table_from_text
from ..runs import format_table, log_metrics, make_run_dir, seed_everything, truncate_metrics, write_results
from .checkpoint import has_checkpoint, load_checkpoint, load_weights, save_checkpoint

KDHook = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""kd(users [V], cols [V], logits [V, N+1], targets [V]) -> scalar loss added to the recommendation loss; users and
cols address the untrimmed all-positions grid, the same cells a teacher cache is keyed by."""


def trim_padding(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop columns that are padding in every row: exact, since positions count back from the latest item."""
    used = (x > 0).any(0).nonzero()
    start = int(used[0, 0]) if len(used) else x.shape[1] - 1
    return x[:, start:], y[:, start:]


def rec_loss(model: SASRec, h: torch.Tensor, targets: torch.Tensor, cfg: TrainConfig, gen: torch.Generator,
             shard: tuple[int, int] | None = None, want_logits: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Recommendation loss over valid positions; returns the full logits too when the loss computed them.

    want_logits (a KD term follows): `ce` then materialises the [positions, items] logits even in bfloat16, where it
    would otherwise stream them in row blocks.

    shard=(offset, total): h holds positions offset..offset+len(h) of a batch of `total` positions split over
    processes. The loss is then this part's sum / total (the parts add up to the batch mean; an empty part gives 0)
    and the random negatives are drawn for the whole batch, so each process consumes `gen` like one process would.
    """
    w = model.output_weight
    reduction, total = ("sum", shard[1]) if shard else ("mean", 1)
    bf16 = cfg.precision == "bfloat16"
    if cfg.loss == "ce" and bf16 and not want_logits:
        per_position = bf16_cross_entropy(h, w, None, targets)
        return (per_position.sum() / total if shard else per_position.mean()), None
    if cfg.loss == "ce":
        logits = score_logits(h, w, bf16)
        return F.cross_entropy(logits, targets, reduction=reduction) / total, logits
    if cfg.loss == "ce_chunked":
        if cfg.item_chunk < 1:
            raise ValueError(f"crm_train.item_chunk must be at least 1, got {cfg.item_chunk}")
        per_position = chunked_cross_entropy(h, w, None, targets, cfg.item_chunk, bf16)
        return (per_position.sum() / total if shard else per_position.mean()), None
    if cfg.loss == "sampled_ce":
        negs = torch.randint(1, model.n_items + 1, (cfg.n_negatives,), generator=gen).to(h.device)
        pos = (h * w[targets]).sum(-1, keepdim=True)
        neg = h @ w[negs].T
        neg = neg.masked_fill(negs[None, :] == targets[:, None], float("-inf"))
        logits = torch.cat([pos, neg], dim=1)
        return F.cross_entropy(logits, torch.zeros_like(targets), reduction=reduction) / total, None
    if cfg.loss == "bce":
        negs = torch.randint(1, model.n_items + 1, (total if shard else len(targets),), generator=gen).to(h.device)
        if shard:
            negs = negs[shard[0]:shard[0] + len(targets)]
        pos = (h * w[targets]).sum(-1)
        neg = (h * w[negs]).sum(-1)
        return F.binary_cross_entropy_with_logits(torch.cat([pos, neg]),
                                                  torch.cat([torch.ones_like(pos), torch.zeros_like(neg)]),
                                                  reduction=reduction) / (2 * total if shard else 1), None
    raise ValueError(f"unknown crm_train.loss '{cfg.loss}' (ce, ce_chunked, sampled_ce or bce)")


def score_logits(h: torch.Tensor, w: torch.Tensor, bf16: bool) -> torch.Tensor:
    """Training logits over all items, padding column at -inf."""
    logits = bf16_scores(h, w) if bf16 else h @ w.T
    logits[:, 0] = float("-inf")
    return logits


def validation_context(phase: str, epoch: int, folder: Path) -> str:
    """Where a validation stands, for the one-line error of a model whose scores are not finite."""
    return (f"in phase '{phase}', epoch {epoch} (validation): the model diverged, lower the learning rate; "
            f"the last good checkpoint is kept in {folder}")


class _Hidden(nn.Module):
    """SASRec.hidden as a module call, so DistributedDataParallel's forward hooks run."""

    def __init__(self, model: SASRec):
        super().__init__()
        self.model = model

    def forward(self, histories: torch.Tensor) -> torch.Tensor:
        return self.model.hidden(histories)


def fit_crm(model: SASRec, split: Split, cfg: Config, run_dir: Path, phase: str = "crm",
            train_cfg: TrainConfig | None = None, kd: KDHook | None = None, resume: bool = False,
            keep_start: bool = False) -> dict:
    """Train with early stopping on validation NDCG@10; leaves the best weights in `model`; returns its metrics.

    keep_start: the starting weights compete too (a distillation phase never ends worse than it began).

    Under torch.distributed every rank draws the same batches and takes its own block of each (`distributed.shard`),
    DistributedDataParallel averages the gradients, and the loss is scaled so that the average is the gradient of
    the whole batch's mean loss: the same step as one process, up to float rounding. Only rank 0 writes.
    """
    tc = train_cfg or cfg.crm_train
    device = next(model.parameters()).device
    folder = run_dir / phase
    world, main = distributed.world_size(), distributed.is_main()
    inputs, targets = all_positions(split.train, model.max_len)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    gen = torch.Generator().manual_seed(tc.seed)
    start, best, bad, best_epoch, best_valid = 1, -1.0, 0, 0, None
    if resume and has_checkpoint(folder, "last"):
        weights, state = load_checkpoint(folder, "last", opt, {"train": gen})
        model.load_state_dict(weights)
        start, best, bad, best_epoch = state["epoch"] + 1, state["best"], state["bad"], state["best_epoch"]
        best_valid = state.get("best_valid")
        if main:
            truncate_metrics(run_dir, phase, state["epoch"])
        if state["bad"] >= tc.patience:  # stopped early (a resume may have raised the patience)
            start = tc.epochs + 1
    elif keep_start:
        model.eval()
        valid_m = evaluate_split(model, split, cfg.eval, "valid", device, validation_context(phase, 0, folder))
        best, best_valid = valid_m[metric_key(cfg.eval)], valid_m
        if main:
            save_checkpoint(folder, "best", model.state_dict(), state={"epoch": 0, "valid": valid_m})
            log_metrics(run_dir, {"phase": phase, "epoch": 0, "valid": valid_m})
    hidden = model.hidden
    if world > 1:
        distributed.offset_rng()
        hidden = distributed.ddp(_Hidden(model))
    for epoch in range(start, tc.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        perm = torch.randperm(len(inputs), generator=gen)
        total, n_pos = 0.0, 0
        bar = tqdm(range(0, len(perm), tc.batch_size), desc=f"{phase} epoch {epoch}", leave=False, mininterval=2,
                   disable=None if main else True)
        for s in bar:
            rows = perm[s:s + tc.batch_size]
            shard = None
            if world > 1:
                counts = (targets[rows] > 0).sum(1)
                lo, hi = distributed.shard(counts)
                shard = (int(counts[:lo].sum()), int(counts.sum()))
                rows = rows[lo:hi]
            x, y = trim_padding(inputs[rows], targets[rows])
            x, y = x.to(device), y.to(device)
            valid = y > 0
            n_valid = int(valid.sum())
            h = hidden(x)[valid]
            loss, logits = rec_loss(model, h, y[valid], tc, gen, shard, want_logits=kd is not None)
            if kd is not None and n_valid:
                if logits is None:
                    logits = score_logits(h, model.output_weight, tc.precision == "bfloat16")
                r, c = (targets[rows] > 0).nonzero(as_tuple=True)  # same row-major order as `valid`
                kd_loss = kd(rows[r], c, logits, y[valid])  # a mean over this rank's positions
                loss = loss + (kd_loss * (n_valid / shard[1]) if shard else kd_loss)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss in phase '{phase}', epoch {epoch}, step {s // tc.batch_size}; "
                                         f"the last good checkpoint is kept in {folder}")
            opt.zero_grad(set_to_none=True)
            if shard:  # DDP averages gradients over ranks, while each rank's part of the batch mean counts in full
                scaled = loss * world
                if n_valid == 0:
                    scaled = scaled + distributed.touch(model.parameters())
                scaled.backward()
            else:
                loss.backward()
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            opt.step()
            total += loss.item() * (shard[1] if shard else n_valid)
            n_pos += n_valid
            bar.set_postfix(loss=f"{loss.item():.4f}", items_s=f"{n_pos / (time.perf_counter() - t0):.0f}")
        if world > 1:
            total, n_pos = distributed.all_sum(torch.tensor([total, n_pos], dtype=torch.float64)).tolist()
        seconds = time.perf_counter() - t0
        record = {"phase": phase, "epoch": epoch, "loss": total / max(n_pos, 1), "epoch_seconds": seconds}
        if epoch % tc.eval_every == 0 or epoch == tc.epochs:
            model.eval()
            valid_m = evaluate_split(model, split, cfg.eval, "valid", device, validation_context(phase, epoch, folder))
            record["valid"] = valid_m
            if valid_m[metric_key(cfg.eval)] > best:
                best, bad, best_epoch, best_valid = valid_m[metric_key(cfg.eval)], 0, epoch, valid_m
                if main:
                    save_checkpoint(folder, "best", model.state_dict(), state={"epoch": epoch, "valid": valid_m})
            else:
                bad += 1
        stop = bad >= tc.patience
        if main:
            log_metrics(run_dir, record)
            save_checkpoint(folder, "last", model.state_dict(), opt,
                            {"epoch": epoch, "best": best, "bad": bad, "best_epoch": best_epoch, "stopped": stop,
                             "best_valid": best_valid},
                            {"train": gen})
            print(f"{phase} epoch {epoch}: loss {record['loss']:.4f}, {seconds:.1f}s"
                  + (f", valid NDCG@10 {record['valid'][metric_key(cfg.eval)]:.4f}" if "valid" in record else ""), flush=True)
        if stop:
            break
    distributed.barrier()  # rank 0's last checkpoint is on disk before anyone reads it
    model.load_state_dict(load_weights(folder, "best"))
    model.eval()
    return {"valid": best_valid or evaluate_split(model, split, cfg.eval, "valid", device),
            "test": evaluate_split(model, split, cfg.eval, "test", device), "best_epoch": best_epoch}


def run(cfg: Config, resume: str | None = None) -> Path:
    """`llmd4rec train-crm`: data -> split -> SASRec -> early-stopped training -> test metrics of the best epoch."""
    distributed.refuse_sharding("train-crm", crm_train=cfg.crm_train)
    with distributed.session(cfg.device) as device:
        with distributed.main_first():  # one download, the others read the files; bad data makes no run folder
            dataset, split = load_data(cfg)
        run_dir = distributed.on_main(lambda: make_run_dir(cfg, "sasrec", resume))
        seed_everything(cfg.seed)
        model = SASRec(dataset.n_items, cfg.crm).to(device)
        if cfg.crm.text_init and resume is None:
            init_item_table_from_text(model, cfg, dataset)
        t0 = time.perf_counter()
        metrics = fit_crm(model, split, cfg, run_dir, resume=resume is not None)
        if distributed.is_main():
            results = {"model": "SASRec", "dataset": dataset.name, "exclude_seen": cfg.eval.exclude_seen,
                       "eval_mode": cfg.eval.mode, "train_seconds": time.perf_counter() - t0, **metrics}
            write_results(run_dir, results, format_table({"SASRec": metrics["test"]}, _table_keys(cfg)))
            plot_run(run_dir)
            print(format_table({"SASRec": metrics["test"]}, _table_keys(cfg)), flush=True)
        distributed.barrier()
    return run_dir


def _table_keys(cfg: Config) -> list[str]:
    return [metric_key(cfg.eval, f"{m}@{k}") for m in ("HR", "NDCG") for k in cfg.eval.ks]
