"""Reliability of a run that fails: a non-finite loss or a failing write never ends in a traceback.

- a non-finite loss stops training with exit 1 and a message naming phase, epoch and step, the last good
  checkpoint intact;
- a failing write (disk full, permission denied) is one line and exit 2, no half-written file left behind.
"""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import pytest
import torch

from llmd4rec.cli import main
from llmd4rec.errors import InputError
from llmd4rec.io import atomic_write_bytes, load_tensors, save_tensors
from llmd4rec.training.checkpoint import load_checkpoint

SMALL = ["--config", "configs/sasrec/synthetic.yaml", "data.synthetic_users=120", "data.synthetic_items=40",
         "crm.hidden=16", "crm_train.users_per_batch=32", "crm_train.patience=100", "device=cpu"]


def _crm_args(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return ["train-crm", *SMALL, f"run_dir={tmp_path}", f"run_name={name}", *extra]


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ------------------------------------------------------------------------------------------ non-finite loss

def test_exploding_learning_rate_stops_with_exit_1_and_a_clear_message(tmp_path, capsys):
    assert main(_crm_args(tmp_path, "boom", "crm_train.lr=1e30", "crm_train.epochs=2")) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert re.fullmatch(r"error: non-finite loss in phase 'crm', epoch 1, step \d+; the last good checkpoint "
                        r"is kept in .*boom/crm", line), line


def test_the_synthetic_preset_with_a_huge_learning_rate_stops_with_one_line(tmp_path, capsys):
    """The README's preset as a user would run it: a diverging run never ends with perfect metrics."""
    assert main(["train-crm", "--config", "configs/sasrec/synthetic.yaml", "crm_train.lr=1e30", "device=cpu",
                 f"run_dir={tmp_path}", "run_name=diverged"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "non-finite" in line and "phase 'crm', epoch 1" in line
    assert not (tmp_path / "diverged" / "results.json").exists()


def test_non_finite_validation_scores_stop_the_run_with_one_line(tmp_path, capsys, monkeypatch):
    """A finite loss but NaN scores (a model broken outside the loss): validation stops the run, naming the
    phase and epoch, instead of ranking the NaN scores; the last good checkpoint is the previous epoch's."""
    from llmd4rec.models.sasrec import SASRec

    real = SASRec.score_items
    calls = {"n": 0}

    def broken_after_epoch_1(self, state, lo, hi):
        out = real(self, state, lo, hi)
        return out * float("nan") if self.training is False and calls["n"] >= 1 else out

    from llmd4rec.training import crm

    real_fit_eval = crm.evaluate_split

    def evaluate_split(*a, **k):
        try:
            return real_fit_eval(*a, **k)
        finally:
            calls["n"] += 1

    monkeypatch.setattr(SASRec, "score_items", broken_after_epoch_1)
    monkeypatch.setattr(crm, "evaluate_split", evaluate_split)
    assert main(_crm_args(tmp_path, "nanscores", "crm_train.epochs=3")) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert re.fullmatch(r"error: non-finite scores for \d+ of \d+ users in phase 'crm', epoch 2 \(validation\): "
                        r"the model diverged, lower the learning rate; the last good checkpoint is kept in "
                        r".*nanscores/crm", line), line
    _, state = load_checkpoint(tmp_path / "nanscores" / "crm", "last")
    assert state["epoch"] == 1


def test_non_finite_loss_keeps_the_last_good_checkpoint_and_resumes(tmp_path, capsys, monkeypatch):
    from llmd4rec.training import crm, phase

    args = _crm_args(tmp_path, "nan", "crm_train.epochs=3")
    real_loss, real_save = crm.rec_loss, phase.save_checkpoint
    saved = {"last": 0}

    def save(folder, tag, *a, **k):
        real_save(folder, tag, *a, **k)
        saved[tag] = saved.get(tag, 0) + 1

    def poisoned(*a, **k):  # finite through epoch 1, NaN from the first step after its checkpoint
        loss, logits = real_loss(*a, **k)
        return (loss * float("nan") if saved["last"] >= 1 else loss), logits

    monkeypatch.setattr(crm, "rec_loss", poisoned)
    monkeypatch.setattr(phase, "save_checkpoint", save)
    assert main(args) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "non-finite loss in phase 'crm', epoch 2, step 0" in line
    folder = tmp_path / "nan" / "crm"
    weights, state = load_checkpoint(folder, "last")
    assert state["epoch"] == 1 and all(torch.isfinite(w).all() for w in weights.values())
    assert not list(folder.glob(".*.tmp"))
    records = [json.loads(x) for x in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1]
    # the cause fixed, the run resumes from that checkpoint and matches an uninterrupted one
    monkeypatch.setattr(crm, "rec_loss", real_loss)
    monkeypatch.setattr(phase, "save_checkpoint", real_save)
    assert main(args + ["--resume", str(tmp_path / "nan")]) == 0
    assert main(_crm_args(tmp_path, "straight", "crm_train.epochs=3")) == 0
    got, want = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("nan", "straight"))
    assert (got["valid"], got["test"]) == (want["valid"], want["test"])


# ------------------------------------------------------------------------------------------ failing writes

def test_disk_full_during_training_is_one_line_exit_2_and_nothing_half_written(tmp_path, capsys, monkeypatch):
    import llmd4rec.io as io_mod
    from llmd4rec.training import phase

    real_replace, real_save = os.replace, phase.save_checkpoint
    full = {"on": False}

    def replace(src, dst, *a, **k):
        if full["on"] and str(tmp_path) in str(dst):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst, *a, **k)

    def save(folder, tag, *a, **k):
        real_save(folder, tag, *a, **k)
        if tag == "last":
            full["on"] = True  # the disk fills up right after the first epoch's checkpoint

    monkeypatch.setattr(io_mod.os, "replace", replace)
    monkeypatch.setattr(phase, "save_checkpoint", save)
    args = _crm_args(tmp_path, "full", "crm_train.epochs=3")
    assert main(args) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "No space left on device [ENOSPC]" in line and "cannot write" in line
    run = tmp_path / "full"
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]
    _, state = load_checkpoint(run / "crm", "last")
    assert state["epoch"] == 1
    monkeypatch.setattr(io_mod.os, "replace", real_replace)
    monkeypatch.setattr(phase, "save_checkpoint", real_save)
    assert main(args + ["--resume", str(run)]) == 0
    assert main(_crm_args(tmp_path, "straight", "crm_train.epochs=3")) == 0
    got, want = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("full", "straight"))
    assert (got["valid"], got["test"]) == (want["valid"], want["test"])


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS])
def test_atomic_writes_turn_os_errors_into_input_errors(tmp_path, monkeypatch, code):
    import llmd4rec.io as io_mod

    target = tmp_path / "x.safetensors"
    save_tensors(target, {"a": torch.ones(3)})
    before = target.read_bytes()

    def fail(*a, **k):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(io_mod.os, "fsync", fail)
    with pytest.raises(InputError, match=rf"cannot write \({re.escape(os.strerror(code))} \[{errno.errorcode[code]}\]"):
        save_tensors(target, {"a": torch.zeros(3)})
    with pytest.raises(InputError, match="cannot write"):
        atomic_write_bytes(tmp_path / "y.json", b"{}")
    assert target.read_bytes() == before and not (tmp_path / "y.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors", "x.safetensors.sha256"]
    monkeypatch.undo()
    assert torch.equal(load_tensors(target)["a"], torch.ones(3))


def test_run_dir_that_cannot_be_created_is_one_line_exit_2(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(_crm_args(blocker / "runs", "x")) == 2
    assert "run folder is not writable" in _one_error_line(capsys.readouterr().err)


def test_read_only_run_folder_is_one_line_exit_2(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: chmod does not stop writes")
        assert main(_crm_args(ro, "x")) == 2
        assert "not writable" in _one_error_line(capsys.readouterr().err)
    finally:
        ro.chmod(0o755)


def test_resume_with_another_command_is_refused(tmp_path, capsys):
    assert main(_crm_args(tmp_path, "crm", "crm_train.epochs=1")) == 0
    capsys.readouterr()
    assert main(["distill", *SMALL, "--resume", str(tmp_path / "crm")]) == 2
    assert "holds a 'sasrec' run, not 'llmd4rec'" in _one_error_line(capsys.readouterr().err)


def test_a_new_run_never_reuses_a_run_folder(tmp_path, capsys):
    """The same run_name again is refused before any work, and the first run's files stay as they were."""
    assert main(_crm_args(tmp_path, "crm", "crm_train.epochs=1")) == 0
    before = {f.name: f.read_bytes() for f in (tmp_path / "crm").iterdir() if f.is_file()}
    capsys.readouterr()
    assert main(_crm_args(tmp_path, "crm", "crm_train.epochs=2")) == 2
    assert "already holds a run: continue it with --resume" in _one_error_line(capsys.readouterr().err)
    assert {f.name: f.read_bytes() for f in (tmp_path / "crm").iterdir() if f.is_file()} == before


def test_torn_metrics_line_does_not_swallow_the_next_record(tmp_path):
    from llmd4rec.runs import log_metrics, read_metrics

    log_metrics(tmp_path, {"phase": "crm", "epoch": 1})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"phase": "crm", "epo')  # killed mid-line
    log_metrics(tmp_path, {"phase": "crm", "epoch": 2})
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [1, 2]
