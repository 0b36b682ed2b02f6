"""Reliability: a crash, a damaged file, a full disk or a bad input never loses a run nor ends in a traceback.

- checkpoints: `last` keeps its predecessor as `last.prev`; a torn, truncated or corrupt `last` falls back to it;
- a non-finite loss stops training with exit 1 and a message naming phase, epoch and step, the last good
  checkpoint intact;
- a failing write (disk full, permission denied) is one line and exit 2, no half-written file left behind;
- the config loader, fed random YAML documents and dotted overrides, only ever succeeds or raises InputError.
"""

from __future__ import annotations

import errno
import json
import os
import re
import string
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmd4rec.cli import main
from llmd4rec.config import Config, load_config
from llmd4rec.errors import InputError
from llmd4rec.io import atomic_write_bytes, load_tensors, save_tensors
from llmd4rec.training.checkpoint import has_checkpoint, load_checkpoint, load_weights, save_checkpoint

SMALL = ["--config", "configs/sasrec/synthetic.yaml", "data.synthetic_users=120", "data.synthetic_items=40",
         "crm.hidden=16", "crm_train.users_per_batch=32", "crm_train.patience=100", "device=cpu"]


def _crm_args(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return ["train-crm", *SMALL, f"run_dir={tmp_path}", f"run_name={name}", *extra]


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ------------------------------------------------------------------------------------------ checkpoints

def _model_and_opt(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def _step(model, opt):
    loss = model(torch.randn(5, 4)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def _save_epochs(folder: Path, epochs: int):
    model, opt = _model_and_opt()
    gen = torch.Generator().manual_seed(1)
    saved = {}
    for epoch in range(1, epochs + 1):
        _step(model, opt)
        torch.randperm(5, generator=gen)
        save_checkpoint(folder, "last", model.state_dict(), opt, {"epoch": epoch}, {"train": gen})
        saved[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
    return saved


def _load(folder: Path):
    model, opt = _model_and_opt(seed=7)
    gen = torch.Generator()
    weights, state = load_checkpoint(folder, "last", opt, {"train": gen})
    return weights, state, opt


def _flip(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_last_is_rotated_to_prev_and_both_verify(tmp_path):
    saved = _save_epochs(tmp_path, 3)
    assert has_checkpoint(tmp_path, "last")
    for tag, epoch in (("last", 3), ("last.prev", 2)):
        meta = json.loads((tmp_path / f"{tag}.json").read_text())
        assert meta["state"]["epoch"] == epoch and len(meta["checksum"]) == 64
        assert torch.equal(load_weights(tmp_path, tag)["weight"], saved[epoch]["weight"])
    weights, state, _ = _load(tmp_path)
    assert state["epoch"] == 3 and torch.equal(weights["weight"], saved[3]["weight"])
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*tmp"))


@pytest.mark.parametrize("damage", ["corrupt_weights", "truncate_weights", "corrupt_state", "truncate_json",
                                    "bitflip_json_value", "torn", "json_missing"])
def test_damaged_last_falls_back_to_prev_with_one_warning(tmp_path, capsys, damage):
    saved = _save_epochs(tmp_path, 3)
    if damage == "corrupt_weights":
        _flip(tmp_path / "last.safetensors")
    elif damage == "truncate_weights":
        data = (tmp_path / "last.safetensors").read_bytes()
        (tmp_path / "last.safetensors").write_bytes(data[: len(data) // 3])
    elif damage == "corrupt_state":
        _flip(tmp_path / "last.state.safetensors")
    elif damage == "truncate_json":
        data = (tmp_path / "last.json").read_bytes()
        (tmp_path / "last.json").write_bytes(data[:40])
    elif damage == "bitflip_json_value":  # still valid JSON, a different epoch: only the self-checksum sees it
        text = (tmp_path / "last.json").read_text()
        (tmp_path / "last.json").write_text(text.replace('"epoch": 3', '"epoch": 7'))
    elif damage == "torn":  # weights and sidecar of another save, metadata of this one: a crash between files
        for suffix in ("safetensors", "safetensors.sha256"):
            (tmp_path / f"last.{suffix}").write_bytes((tmp_path / f"last.prev.{suffix}").read_bytes())
    elif damage == "json_missing":
        (tmp_path / "last.json").unlink()
    capsys.readouterr()
    weights, state, opt = _load(tmp_path)
    assert state["epoch"] == 2 and torch.equal(weights["weight"], saved[2]["weight"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ") and "previous checkpoint" in err[0]
    # the damaged `last` is not rotated over the good `last.prev` by the next save
    model, opt2 = _model_and_opt()
    save_checkpoint(tmp_path, "last", model.state_dict(), opt2, {"epoch": 3})
    assert json.loads((tmp_path / "last.prev.json").read_text())["state"]["epoch"] == 2


def test_no_usable_checkpoint_is_one_input_error(tmp_path):
    _save_epochs(tmp_path, 2)
    _flip(tmp_path / "last.safetensors")
    _flip(tmp_path / "last.prev.state.safetensors")
    with pytest.raises(InputError, match=r"no usable 'last' checkpoint .*checksum mismatch.*checksum mismatch"):
        _load(tmp_path)


def test_checkpoint_of_another_model_is_an_input_error(tmp_path):
    _save_epochs(tmp_path, 1)
    torch.manual_seed(0)
    other = torch.nn.Linear(4, 5)
    with pytest.raises(InputError, match="shape"):
        load_checkpoint(tmp_path, "last", torch.optim.AdamW(other.parameters()), {"train": torch.Generator()})


def test_checkpoint_without_digests_still_loads(tmp_path):
    """Run folders written before the metadata held digests and a checksum resume as before."""
    saved = _save_epochs(tmp_path, 1)
    meta = json.loads((tmp_path / "last.json").read_text())
    del meta["files"], meta["checksum"]
    (tmp_path / "last.json").write_text(json.dumps(meta))
    weights, state, _ = _load(tmp_path)
    assert state["epoch"] == 1 and torch.equal(weights["weight"], saved[1]["weight"])


def test_resume_restores_rng_and_optimizer_exactly(tmp_path):
    model, opt = _model_and_opt()
    gen = torch.Generator().manual_seed(3)
    _step(model, opt)
    save_checkpoint(tmp_path, "last", model.state_dict(), opt, {"epoch": 1}, {"train": gen})
    want_draw = (torch.rand(3), torch.randperm(6, generator=gen))
    _step(model, opt)
    want = model.weight.detach().clone()
    model2, opt2 = _model_and_opt(seed=9)
    gen2 = torch.Generator()
    weights, _ = load_checkpoint(tmp_path, "last", opt2, {"train": gen2})
    model2.load_state_dict(weights)
    got_draw = (torch.rand(3), torch.randperm(6, generator=gen2))
    assert all(torch.equal(a, b) for a, b in zip(want_draw, got_draw))
    _step(model2, opt2)
    assert torch.equal(model2.weight, want)


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


# ------------------------------------------------------------------------------------------ teacher cache

def test_damaged_finished_teacher_cache_is_rebuilt(tmp_path, capsys):
    from llmd4rec.config import SASRecConfig
    from llmd4rec.distill import TeacherCache
    from llmd4rec.distill.teacher import build_cache
    from llmd4rec.models.sasrec import SASRec

    torch.manual_seed(0)
    teacher = SASRec(30, SASRecConfig(hidden=8, n_layers=1, max_len=6)).eval()
    inputs = torch.tensor([[0, 0, 1, 2, 3, 4], [0, 0, 0, 5, 6, 7]])
    targets = torch.tensor([[0, 0, 2, 3, 4, 9], [0, 0, 0, 6, 7, 8]])
    path = tmp_path / "cache"
    args = (teacher, "crm", inputs, targets, 30, 0.5, 8, torch.device("cpu"), 1)
    want = build_cache(path, *args)
    rows = torch.arange(len(want))
    want_ranks = want.target_ranks(rows)
    for damage in ("logits.npy", "header.json", "ranks.npy"):
        _flip(path / damage, at=-3)
        capsys.readouterr()
        got = build_cache(path, *args)
        assert "rebuilding the teacher cache" in capsys.readouterr().err
        assert torch.equal(got.target_ranks(rows), want_ranks)
        assert TeacherCache.open(path, verify=True) is not None


# ------------------------------------------------------------------------------------------ config fuzzing

SECTIONS = {f.name: f for f in Config.__dataclass_fields__.values()}
DOTTED = sorted([name for name in SECTIONS if not hasattr(getattr(Config(), name), "__dataclass_fields__")] +
                [f"{name}.{sub}" for name in SECTIONS if hasattr(getattr(Config(), name), "__dataclass_fields__")
                 for sub in getattr(Config(), name).__dataclass_fields__])
KEYS = st.one_of(st.sampled_from(sorted({k.split(".")[-1] for k in DOTTED} | set(SECTIONS))), st.text(max_size=8))
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=12), st.binary(max_size=6))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(KEYS, inner, max_size=4)), max_leaves=12)
# documents shaped like configs: known sections with known or random keys, and random values
DOCS = st.one_of(VALUES, st.dictionaries(KEYS, st.one_of(VALUES, st.dictionaries(KEYS, VALUES, max_size=5)),
                                         max_size=6))
YAML_TEXT = st.text(alphabet=string.printable + "\u00e9\u4e2d\x00\ufeff", max_size=80)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# values whose YAML constructor fails with ValueError/KeyError instead of yaml.YAMLError: a malformed tag, or a
# plain scalar that looks like a date but is not one (run_name=2020-02-30)
BAD_YAML = ["!!float x", "!!int x", "!!bool x", "!!timestamp 2020-13-45", "2020-02-30", "2021-1-1 25:00:00"]
def _load_or_input_error(path=None, overrides=None) -> None:
    try:
        cfg = load_config(path, overrides)
    except InputError as e:
        assert str(e)
        return
    assert isinstance(cfg, Config)


@FUZZ
@given(doc=DOCS)
def test_random_yaml_documents_load_or_raise_input_error(tmp_path, doc):
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    _load_or_input_error(path)


@FUZZ
@given(text=st.one_of(YAML_TEXT, st.builds("{}: {}\n  {}: {}".format, KEYS, st.sampled_from(["", *BAD_YAML]),
                                           KEYS, YAML_TEXT)))
def test_random_yaml_text_loads_or_raises_input_error(tmp_path, text):
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(text.encode("utf-8"))
    _load_or_input_error(path)


@FUZZ
@given(text=st.binary(max_size=60))
def test_random_bytes_as_config_load_or_raise_input_error(tmp_path, text):
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(text)
    _load_or_input_error(path)


@FUZZ
@given(overrides=st.lists(st.tuples(st.one_of(st.sampled_from(DOTTED), st.text(max_size=15)),
                                    st.one_of(YAML_TEXT, st.sampled_from(BAD_YAML),
                                              SCALARS.map(lambda v: yaml.safe_dump(v).strip()))),
                          max_size=4),
       plain=st.lists(st.text(max_size=10), max_size=2))
def test_random_dotted_overrides_apply_or_raise_input_error(overrides, plain):
    _load_or_input_error(None, [f"{k}={v}" for k, v in overrides] + plain)


@pytest.mark.parametrize("value", BAD_YAML)
def test_malformed_yaml_values_in_overrides_are_input_errors(value):
    _load_or_input_error(None, [f"run_name={value}"])


@pytest.mark.parametrize("value", BAD_YAML)
def test_malformed_yaml_values_in_files_are_input_errors(tmp_path, value):
    (tmp_path / "c.yaml").write_text(f"run_name: {value}\n")
    _load_or_input_error(tmp_path / "c.yaml")


def test_config_path_that_is_a_folder_is_an_input_error(tmp_path):
    _load_or_input_error(tmp_path)


def test_llm_killed_mid_epoch_resumes_to_the_uninterrupted_record(tmp_path, tiny_backbone_dir):
    """E4SRec stopped right after its mid-epoch checkpoint (batch 50 of about 100) and resumed: the epoch's logged
    loss covers the whole epoch, and loss and validation metrics equal those of a run that was never stopped."""
    from llmd4rec.models.sasrec import SASRec
    from llmd4rec.recipes import train_llm
    from llmd4rec.training import phase

    data = ["data.synthetic_users=60", "data.synthetic_items=40", "crm.hidden=16", "crm.max_len=10"]
    torch.manual_seed(0)
    save_tensors(tmp_path / "crm-run" / "crm" / "best.safetensors",
                 SASRec(40, load_config(None, data).crm).state_dict())
    overrides = data + [f"llm.backbone={tiny_backbone_dir}", "llm.keep_layers=null", "llm.max_len=10",
                        "llm_train.epochs=1", "llm_train.samples_per_batch=2", "llm_train.max_targets_per_user=4",
                        f"crm_run={tmp_path / 'crm-run'}", f"run_dir={tmp_path}", "device=cpu"]
    whole = train_llm.run(load_config(None, overrides + ["run_name=whole"]))

    real_save = phase.save_checkpoint

    def killed_after_mid_epoch_save(folder, tag, *args, **kwargs):
        real_save(folder, tag, *args, **kwargs)
        if tag == "last" and args[2]["step"] == 50:
            raise KeyboardInterrupt

    phase.save_checkpoint = killed_after_mid_epoch_save
    try:
        with pytest.raises(KeyboardInterrupt):
            train_llm.run(load_config(None, overrides + ["run_name=stopped"]))
    finally:
        phase.save_checkpoint = real_save
    stopped = tmp_path / "stopped"
    train_llm.run(load_config(stopped / "config.yaml", []), resume=str(stopped))

    def record(run):
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        (only,) = [r for r in lines if r.get("phase") == "llm"]
        return only["loss"], only["samples"], only["valid"]

    assert record(stopped) == record(whole)
