"""One training phase, whatever the model: resume, keep-start, early stopping on validation, logging, checkpoints
and the non-finite guard. A recipe supplies a `Trainer` (its model, optimizer and epoch step); `fit_crm`,
`fit_llm` and every distillation phase run through `run_phase`.

Under torch.distributed every rank runs the phase; all ranks evaluate and gather weights (FSDP, ZeRO), rank 0
alone writes.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from .. import distributed
from ..errors import InputError
from ..io import atomic_write_json, load_tensors, read_json, save_tensors
from ..runs import log_metrics, truncate_metrics
from .checkpoint import has_checkpoint, load_checkpoint, save_checkpoint

KDHook = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""kd(users [S], cols [S], logits [S, N+1], targets [S]) -> scalar loss added to the recommendation loss; users and
cols address the untrimmed all-positions grid, the same cells a teacher cache is keyed by."""


@dataclass
class PhaseState:
    """Where a phase stands; its `last` checkpoint keeps it."""

    epoch: int = 0  # epochs finished
    step: int = 0  # batches of the next epoch already done (a mid-epoch checkpoint)
    best: float = -1.0  # the best validation value of the selection metric
    bad: int = 0  # validations since the best one
    best_epoch: int = 0
    best_valid: dict | None = None
    stopped: bool = False
    extra: dict = field(default_factory=dict)  # the trainer's own counters (scheduler steps, a partial epoch)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, state: dict) -> PhaseState:
        return cls(**{f.name: state[f.name] for f in dataclasses.fields(cls) if f.name in state})


class Trainer(Protocol):
    """What a model's recipe gives the phase runner."""

    gen: torch.Generator  # the batch-order generator, saved with every `last` checkpoint
    optimizer: torch.optim.Optimizer

    def restore(self, weights: dict[str, torch.Tensor]) -> None:
        """Put a resumed checkpoint's weights into the model."""

    def start(self, state: PhaseState) -> None:
        """Wrap for the process group, build schedules: after any resume, before the first epoch."""

    def train_epoch(self, epoch: int, state: PhaseState, save_last: Callable[[PhaseState], None]) -> dict:
        """One epoch from batch `state.step`; returns the record to log (loss, epoch_seconds, ...)."""

    def evaluate(self, which: str, where: str | None = None) -> dict:
        """Metrics of the model as it is on "valid" or "test"; `where` makes non-finite scores an error."""

    def weights(self) -> dict[str, torch.Tensor]:
        """The weights a checkpoint keeps (every rank calls it: sharded weights are gathered)."""

    def optimizer_state(self) -> tuple:
        """`checkpoint.optimizer_tensors` of the optimizer (every rank calls it)."""

    def load_best(self, folder: Path) -> None:
        """Put the phase's best checkpoint into the model."""


def validation_context(phase: str, epoch: int, folder: Path) -> str:
    """Where a validation stands, for the one-line error of a model whose scores are not finite."""
    return (f"in phase '{phase}', epoch {epoch} (validation): the model diverged, lower the learning rate; "
            f"the last good checkpoint is kept in {folder}")


def check_loss(loss: torch.Tensor, phase: str, epoch: int, step: int, folder: Path) -> None:
    """A non-finite loss stops the phase before any step is taken with it."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss in phase '{phase}', epoch {epoch}, step {step}; "
                                 f"the last good checkpoint is kept in {folder}")


def run_phase(trainer: Trainer, run_dir: Path, phase: str, key: str, epochs: int, patience: int,
              eval_every: int = 1, resume: bool = False, keep_start: bool = False) -> dict:
    """Train with early stopping on validation `key`; leaves the best weights in the model; returns its valid and
    test metrics and best epoch.

    eval_every: validate every that many epochs (and after the last); patience counts validations.
    keep_start: the starting weights compete too, as epoch 0.
    """
    folder = run_dir / phase
    main = distributed.is_main()
    st = PhaseState()

    def checkpoint(tag: str, state: dict, with_optimizer: bool) -> None:
        weights = trainer.weights()
        adam = trainer.optimizer_state() if with_optimizer else None
        if main:
            save_checkpoint(folder, tag, weights, adam, state, {"train": trainer.gen} if with_optimizer else None)

    def save_last(state: PhaseState) -> None:
        checkpoint("last", state.to_json(), True)

    if resume and has_checkpoint(folder, "last"):
        weights, saved = load_checkpoint(folder, "last", trainer.optimizer, {"train": trainer.gen})
        trainer.restore(weights)
        st = PhaseState.from_json(saved)
        if main:
            truncate_metrics(run_dir, phase, st.epoch)
    elif keep_start:
        valid = trainer.evaluate("valid", validation_context(phase, 0, folder))
        st.best, st.best_valid = valid[key], valid
        checkpoint("best", {"epoch": 0, "valid": valid}, False)
        if main:
            log_metrics(run_dir, {"phase": phase, "epoch": 0, "valid": valid})
    trainer.start(st)
    # a resumed phase that had stopped early stays stopped (a resume may have raised the patience)
    while st.epoch < epochs and st.bad < patience:
        epoch = st.epoch + 1
        record = {"phase": phase, "epoch": epoch, **trainer.train_epoch(epoch, st, save_last)}
        if epoch % eval_every == 0 or epoch == epochs:
            valid = trainer.evaluate("valid", validation_context(phase, epoch, folder))
            record["valid"] = valid
            if valid[key] > st.best:
                st.best, st.bad, st.best_epoch, st.best_valid = valid[key], 0, epoch, valid
                checkpoint("best", {"epoch": epoch, "valid": valid}, False)
            else:
                st.bad += 1
        st.epoch, st.step, st.stopped = epoch, 0, st.bad >= patience
        if main:
            log_metrics(run_dir, record)  # before the checkpoint: a resume from it must find this epoch logged
        save_last(st)
        if main:
            print(f"{phase} epoch {epoch}: loss {record['loss']:.4f}, {record['epoch_seconds']:.1f}s"
                  + (f", valid {key} {record['valid'][key]:.4f}" if "valid" in record else ""), flush=True)
    distributed.barrier()  # rank 0's last checkpoint is on disk before anyone reads it
    trainer.load_best(folder)
    return {"valid": st.best_valid or trainer.evaluate("valid"), "test": trainer.evaluate("test"),
            "best_epoch": st.best_epoch}


# A distillation run's phases: done.json marks a finished one, which a resume skips.


def phase_done(folder: Path) -> dict | None:
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


def finish_phase(folder: Path, metrics: dict) -> None:
    """Mark a phase finished, with its deployed model's valid/test metrics (and, for a distillation phase, its
    start's, its best distilled epoch's and which of the two it kept) and the RNG state it ended with: a resume that
    skips it restores that state, so the phases after it draw the same dropout masks as in an uninterrupted run.
    Every rank keeps its own RNG state; done.json (rank 0) goes last, once every rank's state is on disk."""
    save_tensors(_rng_file(folder), {"rng.torch": torch.get_rng_state()})
    distributed.barrier()
    if distributed.is_main():
        atomic_write_json(folder / "done.json", {"phase": folder.name, **metrics})


def skip_phase(folder: Path, done: dict, evaluate: Callable[[], dict]) -> dict:
    """The RNG side of skipping a finished phase (its weights are loaded by the caller), and its metrics."""
    rng = _rng_file(folder)
    if rng.exists():
        try:
            torch.set_rng_state(load_tensors(rng)["rng.torch"])
        except (InputError, KeyError, RuntimeError) as e:
            print(f"warning: {e}; later phases will not repeat the uninterrupted run's random draws",
                  file=sys.stderr, flush=True)
    if "valid" in done and "test" in done:
        return {k: v for k, v in done.items() if k != "phase"}
    return evaluate()  # a phase finished by an older version kept no metrics


def start_phase(run_dir: Path, phase: str, resume: bool) -> None:
    """A resumed phase without a checkpoint starts over: drop the lines its interrupted attempt logged."""
    if resume and distributed.is_main() and not has_checkpoint(run_dir / phase, "last"):
        truncate_metrics(run_dir, phase, -1)


def phase_metrics(fitted: dict[str, Any]) -> dict:
    """The valid and test metrics of a phase's result."""
    return {"valid": fitted["valid"], "test": fitted["test"]}
