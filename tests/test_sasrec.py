import json

import pytest
import torch

from llmd4rec.config import SASRecConfig, load_config
from llmd4rec.data import leave_one_out, load_dataset
from llmd4rec.data.dataset import padding_start
from llmd4rec.io import load_tensors, save_tensors
from llmd4rec.models.sasrec import SASRec
from llmd4rec.training.crm import fit_crm, rec_loss
from llmd4rec.recipes import train_crm


def _model(n_items=30, **kw):
    torch.manual_seed(0)
    return SASRec(n_items, SASRecConfig(hidden=16, n_heads=2, dropout=0.0, max_len=8, **kw)).eval()


def test_causality_later_items_do_not_change_earlier_outputs():
    m = _model()
    a = torch.tensor([[0, 0, 3, 4, 5, 6, 7, 8]])
    b = a.clone()
    b[0, 6:] = torch.tensor([20, 21])
    ha, hb = m.hidden(a), m.hidden(b)
    assert torch.allclose(ha[0, :6], hb[0, :6], atol=1e-6)
    assert not torch.allclose(ha[0, 6:], hb[0, 6:], atol=1e-3)


def test_padding_invariance():
    m = _model()
    short = torch.tensor([[5, 6, 7]])
    padded = torch.tensor([[0, 0, 0, 0, 0, 5, 6, 7]])
    assert torch.allclose(m.score_all(short), m.score_all(padded), atol=1e-5)
    batch = torch.tensor([[0, 0, 0, 0, 0, 5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8]])
    assert torch.allclose(m.score_all(batch)[0], m.score_all(short)[0], atol=1e-5)


def test_trim_padding_is_exact():
    m = _model()
    x = torch.tensor([[0, 0, 0, 0, 5, 6, 7, 9], [0, 0, 0, 0, 0, 0, 2, 3]])
    start = padding_start(x)
    xt = x[:, start:]
    assert start == 4 and padding_start(torch.zeros(2, 3, dtype=torch.long)) == 2
    assert torch.allclose(m.hidden(x)[:, 4:], m.hidden(xt), atol=1e-5)


def test_score_items_chunks_match_score_all():
    m = _model()
    h = torch.tensor([[0, 1, 2, 3]])
    state = m.encode(h)
    full = m.score_all(h)
    assert torch.allclose(torch.cat([m.score_items(state, 0, 10), m.score_items(state, 10, 31)], 1), full)
    assert full.shape == (1, 31)


@pytest.mark.parametrize("loss", ["ce", "sampled_ce", "bce"])
def test_losses_are_finite_and_differentiable(loss):
    m = _model().train()
    cfg = load_config(None, [f"crm_train.loss={loss}", "crm_train.n_negatives=5"]).crm_train
    x = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    y = torch.tensor([[0, 2, 3, 4], [5, 6, 7, 8]])
    v = y > 0
    out, _ = rec_loss(m, m.hidden(x)[v], y[v], cfg, torch.Generator().manual_seed(0))
    out.backward()
    assert torch.isfinite(out) and m.item_emb.weight.grad.abs().sum() > 0


def test_loss_falls_on_real_data(shared_data, tmp_path):
    ds = load_dataset("lastfm", shared_data)
    split = leave_one_out(ds)
    cfg = load_config("configs/sasrec/lastfm.yaml", ["crm_train.epochs=3", "crm_train.patience=5",
                                                     "crm.dropout=0.2", "eval.memory_mb=64"])
    torch.manual_seed(0)
    m = SASRec(ds.n_items, cfg.crm)
    fit_crm(m, split, cfg, tmp_path)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] - 0.1


def test_checkpoint_round_trip_identical_scores(tmp_path):
    m = _model(tie_weights=False)
    save_tensors(tmp_path / "w.safetensors", m.state_dict())
    m2 = SASRec(30, SASRecConfig(hidden=16, n_heads=2, dropout=0.0, max_len=8, tie_weights=False)).eval()
    m2.load_state_dict(load_tensors(tmp_path / "w.safetensors"))
    h = torch.tensor([[0, 3, 9, 2], [1, 2, 3, 4]])
    assert torch.equal(m.score_all(h), m2.score_all(h))


def _synthetic_cfg(tmp_path, name, epochs):
    return load_config("configs/sasrec/synthetic.yaml", [
        "data.synthetic_users=300", "data.synthetic_items=80", f"crm_train.epochs={epochs}",
        "crm_train.patience=100", "crm_train.users_per_batch=64", "crm.hidden=32", f"run_dir={tmp_path}",
        f"run_name={name}"])


def test_resume_after_stop_matches_uninterrupted_run(tmp_path):
    full = train_crm.run(_synthetic_cfg(tmp_path, "full", 4))
    stopped = train_crm.run(_synthetic_cfg(tmp_path, "stopped", 2))
    # the same folder continues with the full epoch budget
    cfg = _synthetic_cfg(tmp_path, "stopped", 4)
    from llmd4rec.config import save_config

    save_config(cfg, stopped / "config.yaml")
    resumed = train_crm.run(cfg, resume=str(stopped))
    a = json.loads((full / "results.json").read_text())
    b = json.loads((resumed / "results.json").read_text())
    assert a["test"] == b["test"] and a["valid"] == b["valid"]
    epochs = [json.loads(line)["epoch"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4]
