"""Training SASRec on the all-positions view (one row per user, a loss at every position): its losses and its
epoch step, run by the phase runner."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .. import distributed
from ..config import Config, CRMTrainConfig
from ..data.dataset import Split, all_positions, padding_start
from ..distributed import evaluate_split
from ..evaluation import metric_key
from ..models.bf16 import bf16_cross_entropy, bf16_scores
from ..models.chunked import chunked_cross_entropy
from ..models.sasrec import SASRec
from ..precision import resolve
from .checkpoint import load_weights, optimizer_tensors
from .phase import KDHook, PhaseState, check_loss, run_phase


def rec_loss(model: SASRec, h: torch.Tensor, targets: torch.Tensor, cfg: CRMTrainConfig,
             gen: torch.Generator, shard: tuple[int, int] | None = None, want_logits: bool = False
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
    bf16 = resolve(cfg.precision, h.device) == "bfloat16"
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


class _Hidden(nn.Module):
    """SASRec.hidden as a module call, so DistributedDataParallel's forward hooks run."""

    def __init__(self, model: SASRec):
        super().__init__()
        self.model = model

    def forward(self, histories: torch.Tensor) -> torch.Tensor:
        return self.model.hidden(histories)



class CRMTrainer:
    """SASRec's epoch: shuffled users, the recommendation loss (plus a KD term) at every valid position.

    Under torch.distributed every rank draws the same batches and takes its own block of each (`distributed.shard`),
    DistributedDataParallel averages the gradients, and the loss is scaled so that the average is the gradient of
    the whole batch's mean loss: the same step as one process, up to float rounding.
    """

    def __init__(self, model: SASRec, split: Split, cfg: Config, tc: CRMTrainConfig, phase: str, folder: Path,
                 kd: KDHook | None):
        self.model, self.split, self.cfg, self.tc, self.kd = model, split, cfg, tc, kd
        self.phase, self.folder = phase, folder
        self.device = next(model.parameters()).device
        self.inputs, self.targets = all_positions(split.train, model.max_len)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        self.gen = torch.Generator().manual_seed(tc.seed)
        self.hidden = model.hidden

    def restore(self, weights: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(weights)

    def start(self, state: PhaseState) -> None:
        if distributed.world_size() > 1:
            distributed.offset_rng()
            self.hidden = distributed.ddp(_Hidden(self.model))

    def train_epoch(self, epoch: int, state: PhaseState, save_last) -> dict:
        model, tc, kd, targets = self.model, self.tc, self.kd, self.targets
        world = distributed.world_size()
        model.train()
        t0 = time.perf_counter()
        perm = torch.randperm(len(self.inputs), generator=self.gen)
        total, n_pos = 0.0, 0
        bar = tqdm(range(0, len(perm), tc.users_per_batch), desc=f"{self.phase} epoch {epoch}", leave=False,
                   mininterval=2, disable=None if distributed.is_main() else True)
        for s in bar:
            rows = perm[s:s + tc.users_per_batch]
            shard = None
            if world > 1:
                counts = (targets[rows] > 0).sum(1)
                lo, hi = distributed.shard(counts)
                shard = (int(counts[:lo].sum()), int(counts.sum()))
                rows = rows[lo:hi]
            x, y = self.inputs[rows], targets[rows]
            start = padding_start(x)
            x, y = x[:, start:], y[:, start:]
            x, y = x.to(self.device), y.to(self.device)
            valid = y > 0
            n_valid = int(valid.sum())
            h = self.hidden(x)[valid]
            loss, logits = rec_loss(model, h, y[valid], tc, self.gen, shard, want_logits=kd is not None)
            if kd is not None and n_valid:
                if logits is None:
                    logits = score_logits(h, model.output_weight, resolve(tc.precision, h.device) == "bfloat16")
                r, c = (targets[rows] > 0).nonzero(as_tuple=True)  # same row-major order as `valid`
                kd_loss = kd(rows[r], c, logits, y[valid])  # a mean over this rank's positions
                loss = loss + (kd_loss * (n_valid / shard[1]) if shard else kd_loss)
            check_loss(loss, self.phase, epoch, s // tc.users_per_batch, self.folder)
            self.optimizer.zero_grad(set_to_none=True)
            if shard:  # DDP averages gradients over ranks, while each rank's part of the batch mean counts in full
                scaled = loss * world
                if n_valid == 0:
                    scaled = scaled + distributed.touch(model.parameters())
                scaled.backward()
            else:
                loss.backward()
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            self.optimizer.step()
            total += loss.item() * (shard[1] if shard else n_valid)
            n_pos += n_valid
            bar.set_postfix(loss=f"{loss.item():.4f}", items_s=f"{n_pos / (time.perf_counter() - t0):.0f}")
        if world > 1:
            total, n_pos = distributed.all_sum(torch.tensor([total, n_pos], dtype=torch.float64)).tolist()
        return {"loss": total / max(n_pos, 1), "epoch_seconds": time.perf_counter() - t0}

    def evaluate(self, which: str, where: str | None = None) -> dict:
        self.model.eval()
        return evaluate_split(self.model, self.split, self.cfg.eval, which, self.device, where)

    def weights(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def optimizer_state(self) -> tuple:
        return optimizer_tensors(self.optimizer)

    def load_best(self, folder: Path) -> None:
        self.model.load_state_dict(load_weights(folder, "best"))
        self.model.eval()


def fit_crm(model: SASRec, split: Split, cfg: Config, run_dir: Path, phase: str = "crm",
            train_cfg: CRMTrainConfig | None = None, kd: KDHook | None = None, resume: bool = False,
            keep_start: bool = False) -> dict:
    """Train with early stopping on validation; leaves the best weights in `model`; returns its metrics.

    keep_start: the starting weights compete too (an update never ends worse than it began).
    """
    tc = train_cfg or cfg.crm_train
    trainer = CRMTrainer(model, split, cfg, tc, phase, run_dir / phase, kd)
    return run_phase(trainer, run_dir, phase, metric_key(cfg.eval), tc.epochs, tc.patience, tc.eval_every,
                     resume, keep_start)
