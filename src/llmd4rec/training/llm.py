"""Training E4SRec (LoRA + W_in + W_out) on every prefix of each user's training sequence: its epoch step, run by
the phase runner.

Samples are the (user, position) cells of the same all-positions view SASRec trains on, so a teacher cache
written by either model lines up with the other's samples. Batches are whole users, so the all-prefix path
scores each user's prefixes in one pass.
"""

from __future__ import annotations

import dataclasses
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import distributed
from ..config import Config, LLMTrainConfig
from ..data.dataset import Split, all_positions
from ..distributed import evaluate_split
from ..errors import InputError
from ..evaluation import metric_key
from ..io import load_tensors
from .checkpoint import optimizer_tensors
from .phase import KDHook, PhaseState, check_loss, run_phase


def sample_grid(train: list[list[int]], max_len: int, max_targets_per_user: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs [U, L] and targets [U, L] with only each user's last `max_targets_per_user` targets kept."""
    inputs, targets = all_positions(train, max_len)
    if max_targets_per_user > 0:
        from_end = (targets > 0).flip(1).cumsum(1).flip(1)  # 1 at the last target, 2 before it, ...
        targets = targets.masked_fill(from_end > max_targets_per_user, 0)
    return inputs, targets


def user_batches(targets: torch.Tensor, order: torch.Tensor, samples_per_batch: int) -> list[torch.Tensor]:
    """Consecutive users of `order` grouped so that each batch holds about `samples_per_batch` samples."""
    counts = (targets > 0).sum(1)[order].tolist()
    batches, current, filled = [], [], 0
    for user, c in zip(order.tolist(), counts):
        if c == 0:
            continue
        if current and filled + c > samples_per_batch:
            batches.append(torch.tensor(current))
            current, filled = [], 0
        current.append(user)
        filled += c
    if current:
        batches.append(torch.tensor(current))
    return batches


def cosine_with_warmup(opt: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(total - warmup, 1))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


class LLMTrainer:
    """E4SRec's epoch: batches of whole users, cross-entropy (plus a KD term) over their prefixes, AdamW with a
    warm-up/cosine schedule, gradient accumulation, and a `last` checkpoint every `save_every` batches.

    Under torch.distributed every rank forms the same batches of users and takes its own block of users from each
    (`distributed.shard`, balanced by samples); DistributedDataParallel averages the gradients and the loss is scaled
    so that the average is the gradient of the whole batch's mean loss.
    """

    def __init__(self, model, split: Split, cfg: Config, tc: LLMTrainConfig, phase: str, folder: Path,
                 kd: KDHook | None, save_every: int):
        self.model, self.split, self.cfg, self.tc, self.kd = model, split, cfg, tc, kd
        self.phase, self.folder, self.save_every = phase, folder, save_every
        self.device = model.item_table.device
        self.fsdp, self.zero = distributed.use_fsdp(tc.fsdp), distributed.zero_stage(tc)
        if self.fsdp or self.zero:
            if kd is not None:
                raise InputError("distillation runs with DDP: launch distill without FSDP or DeepSpeed")
            if self.fsdp and self.zero:
                raise InputError("FSDP and DeepSpeed ZeRO both asked for: choose one")
        self.chunked = tc.loss == "ce_chunked" and kd is None  # distillation needs the full logits for its KL terms
        if self.fsdp:
            distributed.shard_model(model)  # before the optimizer: it must hold the sharded parameters
        if self.fsdp or self.zero == 3:  # one pass per layer: FSDP frees a layer's weights after its first
            model.inline_prompt = True  # backward, each ZeRO-3 gather serves one forward and one backward
        self.inputs, self.targets = sample_grid(split.train, model.max_len, tc.max_targets_per_user)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=tc.lr, weight_decay=tc.weight_decay)
        self.opt_state = self.optimizer  # what a checkpoint reads the Adam state from
        self.gen = torch.Generator().manual_seed(tc.seed)
        self.forward, self.resumed = model, None

    def restore(self, weights: dict[str, torch.Tensor]) -> None:
        distributed.load_trainable_state(self.model, weights)
        self.resumed = weights  # ZeRO's float32 master copies start from them

    def start(self, state: PhaseState) -> None:
        tc, world = self.tc, distributed.world_size()
        if self.zero:  # after the resume: ZeRO takes the loaded weights and Adam moments into its partitions
            # the chunked loss reads W_out outside its module call: ZeRO-3 must gather it for the forward
            linear = self.model.cfg.item_head == "linear"
            external = list(self.model.w_out.parameters()) if self.chunked and linear else []
            self.forward, self.opt_state = distributed.zero_engine(self.model, self.optimizer, self.zero, tc,
                                                                   self.resumed, external)
        elif world > 1 and not self.fsdp:  # FSDP's units are hooked into the model itself
            self.forward = distributed.ddp(self.model)
        if world > 1:
            distributed.offset_rng()
        n_batches = len(user_batches(self.targets, torch.arange(len(self.targets)), tc.samples_per_batch))
        self.sched = cosine_with_warmup(self.optimizer, tc.warmup_steps,
                                        tc.epochs * math.ceil(n_batches / tc.grad_accum))
        done = state.extra.get("sched", 0)
        if done:
            self.sched.load_state_dict({**self.sched.state_dict(), "last_epoch": done, "_step_count": done + 1})
            for group, factor in zip(self.optimizer.param_groups, self.sched.lr_lambdas):
                group["lr"] = group["initial_lr"] * factor(done)

    def train_epoch(self, epoch: int, state: PhaseState, save_last) -> dict:
        model, tc, kd, forward, gen = self.model, self.tc, self.kd, self.forward, self.gen
        world, fsdp, zero = distributed.world_size(), self.fsdp, self.zero
        inputs, targets = self.inputs, self.targets
        epoch_gen_state = gen.get_state()
        batches = user_batches(targets, torch.randperm(len(targets), generator=gen), tc.samples_per_batch)
        model.train()
        total, seen, before = state.extra.get("done_part", (0.0, 0, 0.0)) if state.step else (0.0, 0, 0.0)
        t0 = time.perf_counter() - before
        for b in range(state.step, len(batches)):
            users = batches[b]
            stepping = (b + 1) % tc.grad_accum == 0 or b + 1 == len(batches)
            n_batch = 0
            weight = 1.0
            if world > 1:
                counts = (targets[users] > 0).sum(1)
                lo, hi = distributed.shard(counts)
                if (fsdp or zero) and lo == hi:  # a sharded step is a collective: one user, counted 0 times
                    lo, hi, weight = 0, 1, 0.0
                users, n_batch = users[lo:hi], int(counts.sum())
            x, y = inputs[users].to(self.device), targets[users].to(self.device)
            rows, cols = (y > 0).nonzero(as_tuple=True)
            # between optimizer steps DDP need not all-reduce: the last micro-batch reduces the accumulated sum
            if fsdp:
                model.set_requires_gradient_sync(stepping)
            if zero:
                forward.set_gradient_accumulation_boundary(stepping)
            with forward.no_sync() if world > 1 and not (fsdp or zero) and not stepping else nullcontext():
                tgt = y[rows, cols]
                if self.chunked:
                    per_sample = forward(x, rows, cols, tgt, tc.item_chunk)
                else:
                    logits = forward(x, rows, cols)
                    logits[:, 0] = float("-inf")
                    per_sample = F.cross_entropy(logits, tgt, reduction="none")
                if world > 1:  # this rank's part of the batch mean, counted in full since DDP averages over ranks
                    loss = per_sample.sum() / n_batch
                    if kd is not None and len(tgt):
                        loss = loss + kd(users[rows.cpu()], cols.cpu(), logits, tgt) * (len(tgt) / n_batch)
                    scaled = loss * (world * weight)
                    if len(tgt) == 0:
                        scaled = scaled + distributed.touch(self.params)
                else:
                    loss = per_sample.mean()
                    if kd is not None:
                        loss = loss + kd(users[rows.cpu()], cols.cpu(), logits, tgt)
                    scaled = loss
                check_loss(loss, self.phase, epoch, b, self.folder)
                if zero:
                    forward.backward(scaled / tc.grad_accum, scale_wrt_gas=False)
                else:
                    (scaled / tc.grad_accum).backward()
            if zero:  # steps (clipping included) only at the boundary set above
                forward.step()
                if stepping:
                    self.sched.step()
            elif stepping:
                if tc.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.params, tc.grad_clip)
                self.optimizer.step()
                self.sched.step()
                self.optimizer.zero_grad(set_to_none=True)
            total += loss.item() * (n_batch * weight if world > 1 else len(tgt))
            seen += int(len(tgt) * weight)
            if (self.save_every and (b + 1) % self.save_every == 0 and (b + 1) % tc.grad_accum == 0
                    and b + 1 < len(batches)):
                gen_now = gen.get_state()
                gen.set_state(epoch_gen_state)  # resuming replays this epoch's order, then skips done batches
                save_last(dataclasses.replace(state, step=b + 1, extra={
                    "sched": self.sched.last_epoch, "done_part": [total, seen, time.perf_counter() - t0]}))
                if distributed.is_main():
                    print(f"{self.phase} epoch {epoch} step {b + 1}/{len(batches)}: loss {total / max(seen, 1):.4f}, "
                          f"{seen / (time.perf_counter() - t0):.1f} samples/s", flush=True)
                gen.set_state(gen_now)
        if world > 1:
            total, seen = distributed.all_sum(torch.tensor([total, seen], dtype=torch.float64)).tolist()
            seen = int(seen)
        state.extra = {"sched": self.sched.last_epoch}
        return {"loss": total / max(seen, 1), "epoch_seconds": time.perf_counter() - t0, "samples": seen}

    def evaluate(self, which: str, where: str | None = None) -> dict:
        self.model.eval()
        with distributed.gathered(self.model), distributed.zero3_gathered(self.model):
            return evaluate_split(self.model, self.split, self.cfg.eval, which, self.device, where)

    def weights(self) -> dict[str, torch.Tensor]:
        """Under ZeRO its float32 master weights."""
        return self.opt_state.master_weights() if self.zero else distributed.trainable_state(self.model)

    def optimizer_state(self) -> tuple:
        return optimizer_tensors(self.opt_state)

    def load_best(self, folder: Path) -> None:
        with distributed.zero3_gathered(self.model, modify=True):
            distributed.load_trainable_state(self.model, load_tensors(folder / "best.safetensors"))
        self.model.eval()


def fit_llm(model, split: Split, cfg: Config, run_dir: Path, phase: str = "llm",
            train_cfg: LLMTrainConfig | None = None, kd: KDHook | None = None, resume: bool = False,
            save_every: int = 50) -> dict:
    """AdamW + cosine warm-up, early stopping on validation; a `last` checkpoint every `save_every` batches too."""
    tc = train_cfg or cfg.llm_train
    trainer = LLMTrainer(model, split, cfg, tc, phase, run_dir / phase, kd, save_every)
    return run_phase(trainer, run_dir, phase, metric_key(cfg.eval), tc.epochs, tc.patience, resume=resume)
