"""Recipe: train E4SRec (LoRA + W_in + W_out) on every prefix of each user's training sequence.

Samples are the (user, position) cells of the same all-positions view SASRec trains on, so a teacher cache
written by either model lines up with the other's samples. Batches are whole users, so the all-prefix path
scores each user's prefixes in one pass.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .. import distributed
from ..config import Config, TrainConfig
from ..data.dataset import Split, all_positions
from ..errors import InputError
from ..evaluation import evaluate_split, metric_key
from ..io import load_tensors
from ..pretrained import check_reused_runs, load_crm, load_data
from ..runs import format_table, log_metrics, make_run_dir, seed_everything, truncate_metrics, write_results
from .checkpoint import has_checkpoint, load_checkpoint, optimizer_tensors, save_checkpoint
from .crm import validation_context

KDHook = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""kd(rows [S], cols [S], logits [S, N+1], targets [S]) -> scalar loss added to the cross-entropy."""


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


def build_llm(cfg: Config, item_table: torch.Tensor, device: torch.device | str,
              text_table: torch.Tensor | None = None):
    """text_table: the items' text embeddings, needed with llm.item_text (`text_embeddings.item_text_embeddings`)."""
    from ..models.e4srec import E4SRec

    return E4SRec(cfg.llm, item_table, text_embeddings=text_table).to(device)


def fit_llm(model, split: Split, cfg: Config, run_dir: Path, phase: str = "llm", train_cfg: TrainConfig | None = None,
            kd: KDHook | None = None, resume: bool = False, save_every: int = 50) -> dict:
    """AdamW + cosine warmup, early stopping on validation NDCG@10; checkpoints every `save_every` steps too.

    Under torch.distributed every rank forms the same batches of users and takes its own block of users from each
    (`distributed.shard`, balanced by samples); DistributedDataParallel averages the gradients and the loss is scaled
    so that the average is the gradient of the whole batch's mean loss. Only rank 0 writes.
    """
    tc = train_cfg or cfg.llm_train
    device = model.w_out.weight.device
    folder = run_dir / phase
    world, main = distributed.world_size(), distributed.is_main()
    fsdp, zero = distributed.use_fsdp(tc.fsdp), distributed.zero_stage(tc)
    if fsdp or zero:
        if kd is not None:
            raise InputError("distillation runs with DDP: launch distill without FSDP or DeepSpeed")
        if fsdp and zero:
            raise InputError("FSDP and DeepSpeed ZeRO both asked for: choose one")
    if tc.loss not in ("ce", "ce_chunked"):
        raise InputError(f"llm_train.loss must be ce or ce_chunked, got '{tc.loss}'")
    if tc.item_chunk < 1:
        raise InputError(f"llm_train.item_chunk must be at least 1, got {tc.item_chunk}")
    chunked = tc.loss == "ce_chunked" and kd is None  # distillation needs the full logits for its KL terms
    if fsdp:
        distributed.shard_model(model)  # before the optimizer: it must hold the sharded parameters
    if zero == 3:
        model.inline_prompt = True  # one pass per layer: each ZeRO-3 gather serves one forward and one backward
    inputs, targets = sample_grid(split.train, model.max_len, tc.max_targets_per_user)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    opt_state = opt  # what a checkpoint reads the Adam state from
    gen = torch.Generator().manual_seed(tc.seed)
    n_batches = len(user_batches(targets, torch.arange(len(targets)), tc.batch_size))
    epoch, step, best, bad, best_epoch, best_valid, sched_steps = 1, 0, -1.0, 0, 0, None, 0
    done_part = (0.0, 0, 0.0)  # loss sum, samples and seconds of the epoch's batches before a mid-epoch resume
    resumed = None  # the checkpoint's weights: ZeRO's float32 master copies start from them
    if resume and has_checkpoint(folder, "last"):
        resumed, st = load_checkpoint(folder, "last", opt, {"train": gen})
        model.load_trainable_state_dict(resumed)
        epoch, step, best, bad, best_epoch = st["epoch"], st["step"], st["best"], st["bad"], st["best_epoch"]
        done_part = tuple(st.get("done_part", done_part)) if step else done_part
        best_valid, sched_steps = st.get("best_valid"), st["sched"]
        if main:
            truncate_metrics(run_dir, phase, epoch - 1)
        if bad >= tc.patience:  # stopped early (a resume may have raised the patience)
            epoch = tc.epochs + 1
    forward = model
    if zero:  # after the resume: ZeRO takes the loaded weights and Adam moments into its partitions
        forward, opt_state = distributed.zero_engine(model, opt, zero, tc, resumed)
    elif world > 1 and not fsdp:  # FSDP's units are hooked into the model itself
        forward = distributed.ddp(model)
    if world > 1:
        distributed.offset_rng()
    sched = cosine_with_warmup(opt, tc.warmup_steps, tc.epochs * math.ceil(n_batches / tc.grad_accum))
    if sched_steps:
        sched.load_state_dict({**sched.state_dict(), "last_epoch": sched_steps, "_step_count": sched_steps + 1})
        for group, factor in zip(opt.param_groups, sched.lr_lambdas):
            group["lr"] = group["initial_lr"] * factor(sched_steps)

    def evaluate(which: str, where: str | None = None) -> dict:
        with distributed.gathered(model), distributed.zero3_gathered(model):
            return evaluate_split(model, split, cfg.eval, which, device, where)

    def checkpoint(tag: str, state: dict, with_optimizer: bool) -> None:
        """Every rank gathers (FSDP, ZeRO), rank 0 writes. Under ZeRO the weights are its float32 masters."""
        weights = opt_state.master_weights() if zero else model.trainable_state_dict()
        adam = optimizer_tensors(opt_state) if with_optimizer else None
        if main:
            save_checkpoint(folder, tag, weights, adam, state, {"train": gen} if with_optimizer else None)

    while epoch <= tc.epochs:
        epoch_gen_state = gen.get_state()
        batches = user_batches(targets, torch.randperm(len(targets), generator=gen), tc.batch_size)
        model.train()
        total, seen, before = done_part
        t0, done_part = time.perf_counter() - before, (0.0, 0, 0.0)
        for b in range(step, len(batches)):
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
            x, y = inputs[users].to(device), targets[users].to(device)
            rows, cols = (y > 0).nonzero(as_tuple=True)
            # between optimizer steps DDP need not all-reduce: the last micro-batch reduces the accumulated sum
            if fsdp:
                model.set_requires_gradient_sync(stepping)
            if zero:
                forward.set_gradient_accumulation_boundary(stepping)
            with forward.no_sync() if world > 1 and not (fsdp or zero) and not stepping else nullcontext():
                tgt = y[rows, cols]
                if chunked:
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
                        scaled = scaled + distributed.touch(params)
                else:
                    loss = per_sample.mean()
                    if kd is not None:
                        loss = loss + kd(users[rows.cpu()], cols.cpu(), logits, tgt)
                    scaled = loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss in phase '{phase}', epoch {epoch}, step {b}; "
                                             f"the last good checkpoint is kept in {folder}")
                if zero:
                    forward.backward(scaled / tc.grad_accum, scale_wrt_gas=False)
                else:
                    (scaled / tc.grad_accum).backward()
            if zero:  # steps (clipping included) only at the boundary set above
                forward.step()
                if stepping:
                    sched.step()
            elif stepping:
                if tc.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
            total += loss.item() * (n_batch * weight if world > 1 else len(tgt))
            seen += int(len(tgt) * weight)
            if save_every and (b + 1) % save_every == 0 and (b + 1) % tc.grad_accum == 0 and b + 1 < len(batches):
                gen_now = gen.get_state()
                gen.set_state(epoch_gen_state)  # resuming replays this epoch's order, then skips done batches
                checkpoint("last", {"epoch": epoch, "step": b + 1, "best": best, "bad": bad, "best_epoch": best_epoch,
                                    "sched": sched.last_epoch, "best_valid": best_valid,
                                    "done_part": [total, seen, time.perf_counter() - t0]}, True)
                if main:
                    print(f"{phase} epoch {epoch} step {b + 1}/{len(batches)}: loss {total / max(seen, 1):.4f}, "
                          f"{seen / (time.perf_counter() - t0):.1f} samples/s", flush=True)
                gen.set_state(gen_now)
        if world > 1:
            total, seen = distributed.all_sum(torch.tensor([total, seen], dtype=torch.float64)).tolist()
            seen = int(seen)
        record = {"phase": phase, "epoch": epoch, "loss": total / max(seen, 1),
                  "epoch_seconds": time.perf_counter() - t0, "samples": seen}
        model.eval()
        valid_m = evaluate("valid", validation_context(phase, epoch, folder))
        record["valid"] = valid_m
        if valid_m[metric_key(cfg.eval)] > best:
            best, bad, best_epoch, best_valid = valid_m[metric_key(cfg.eval)], 0, epoch, valid_m
            checkpoint("best", {"epoch": epoch, "valid": valid_m}, False)
        else:
            bad += 1
        stop = bad >= tc.patience
        if main:
            log_metrics(run_dir, record)  # before the checkpoint: a resume from it must find this epoch logged
        checkpoint("last", {"epoch": epoch + 1, "step": 0, "best": best, "bad": bad, "best_epoch": best_epoch,
                            "sched": sched.last_epoch, "stopped": stop, "best_valid": best_valid}, True)
        if main:
            print(f"{phase} epoch {epoch}: loss {record['loss']:.4f}, {record['epoch_seconds']:.0f}s, "
                  f"valid NDCG@10 {valid_m[metric_key(cfg.eval)]:.4f}", flush=True)
        epoch, step = epoch + 1, 0
        if stop:
            break
    distributed.barrier()  # rank 0's last checkpoint is on disk before anyone reads it
    with distributed.zero3_gathered(model, modify=True):
        model.load_trainable_state_dict(load_tensors(folder / "best.safetensors"))
    model.eval()
    return {"valid": best_valid or evaluate("valid"), "test": evaluate("test"), "best_epoch": best_epoch}


NEEDS_CRM_RUN = "train-llm needs crm_run=RUN_DIR: the SASRec run whose item embeddings initialise E4SRec"


def crm_item_table(cfg: Config, n_items: int) -> torch.Tensor:
    if not cfg.crm_run:
        raise InputError(NEEDS_CRM_RUN)
    return load_crm(Path(cfg.crm_run), n_items, cfg).item_emb.weight.detach().clone()


def load_llm(run_dir: Path, n_items: int, cfg: Config, device: torch.device | str = "cpu", phase: str = "llm",
             tag: str = "best"):
    """Rebuild E4SRec from a run: the item (and text) tables are stored in the run, so neither the CRM run nor the
    text embedding step is needed."""
    folder = Path(run_dir) / phase
    table = load_tensors(folder / "item_table.safetensors")["item_table"]
    text = load_tensors(folder / "text_table.safetensors")["text_table"] if cfg.llm.item_text else None
    model = build_llm(cfg, table, device, text)
    model.load_trainable_state_dict(load_tensors(Path(run_dir) / phase / f"{tag}.safetensors"))
    return model.eval()


def run(cfg: Config, resume: str | None = None) -> Path:
    """`llmd4rec train-llm`: SASRec item table -> E4SRec -> early-stopped LoRA training -> test metrics."""
    from ..io import save_tensors
    from ..text_embeddings import item_text_embeddings

    if not resume:
        if not cfg.crm_run:
            raise InputError(NEEDS_CRM_RUN)
        check_reused_runs(cfg)
    with distributed.session(cfg.device, shards=True, group=distributed.zero_stage(cfg.llm_train) > 0) as device:
        with distributed.main_first():  # one download, the others read the files; bad data makes no run folder
            dataset, split = load_data(cfg)
        run_dir = distributed.on_main(lambda: make_run_dir(cfg, "e4srec", resume))
        seed_everything(cfg.seed)
        table_path = run_dir / "llm" / "item_table.safetensors"
        text_path = run_dir / "llm" / "text_table.safetensors"
        with distributed.main_first():  # the item table: rank 0 first, the others find its file
            if resume and table_path.exists():
                table = load_tensors(table_path)["item_table"]
            else:
                table = crm_item_table(cfg, dataset.n_items)
                if distributed.is_main():
                    save_tensors(table_path, {"item_table": table})
            if resume and text_path.exists():
                text = load_tensors(text_path)["text_table"]
            else:
                text = item_text_embeddings(cfg, dataset, device)
                if text is not None:
                    text = text.cpu()
                    if distributed.is_main():
                        save_tensors(text_path, {"text_table": text})
            seed_everything(cfg.seed)  # the same LoRA/head init whether the tables were rebuilt or read back
            model = build_llm(cfg, table, device, text)
        t0 = time.perf_counter()
        metrics = fit_llm(model, split, cfg, run_dir, resume=resume is not None)
        if distributed.is_main():
            keys = [metric_key(cfg.eval, f"{m}@{k}") for m in ("HR", "NDCG") for k in cfg.eval.ks]
            results = {"model": "E4SRec", "dataset": dataset.name, "backbone": cfg.llm.backbone,
                       "keep_layers": cfg.llm.keep_layers, "dtype": cfg.llm.dtype,
                       "item_text": cfg.llm.item_text, "exclude_seen": cfg.eval.exclude_seen,
                       "eval_mode": cfg.eval.mode, "train_seconds": time.perf_counter() - t0,
                       "world_size": distributed.world_size(),
                       "fsdp": distributed.use_fsdp(cfg.llm_train.fsdp),
                       "zero_stage": distributed.zero_stage(cfg.llm_train), **metrics}
            if device.type == "cuda":  # this process's peak: what sharding is for
                results["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
            write_results(run_dir, results, format_table({"E4SRec": metrics["test"]}, keys))
            print(format_table({"E4SRec": metrics["test"]}, keys), flush=True)
        distributed.barrier()
    return run_dir
