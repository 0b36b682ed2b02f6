"""Reliability of checkpoints and caches: a crash or a damaged file never loses a run.

- `last` keeps its predecessor as `last.prev`; a torn, truncated or corrupt `last` falls back to it;
- a damaged finished teacher cache is rebuilt;
- an E4SRec run killed mid-epoch resumes to exactly the uninterrupted run's record.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmd4rec.config import load_config
from llmd4rec.errors import InputError
from llmd4rec.io import save_tensors
from llmd4rec.training.checkpoint import has_checkpoint, load_checkpoint, load_weights, save_checkpoint


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


# ------------------------------------------------------------------------------------------ resume mid-epoch

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
