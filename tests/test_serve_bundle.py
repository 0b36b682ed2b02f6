"""Bundles: what export writes, what loading a bundle refuses, and the command line that ranks from one."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

import llmd4rec.loading  # noqa: E402
from _serve_helpers import MAX_LEN, N_ITEMS, assert_same, post, reference  # noqa: E402
from llmd4rec import cli  # noqa: E402
from llmd4rec.config import Config, E4SRecConfig  # noqa: E402
from llmd4rec.errors import InputError  # noqa: E402
from llmd4rec.export import export_bundle, write_bundle  # noqa: E402
from llmd4rec.models.sasrec import SASRec  # noqa: E402
from llmd4rec.serve import create_app, load_bundle, recommend_cli  # noqa: E402


def test_bundle_files(served_bundle, served_run):
    assert {p.name for p in served_bundle.iterdir()} >= {"model.safetensors", "config.yaml", "bundle.json",
                                                         "items.json", "popularity.safetensors"}
    info = json.loads((served_bundle / "bundle.json").read_text())
    assert info["kind"] == "crm" and info["n_items"] == N_ITEMS and info["max_len"] == MAX_LEN
    items = json.loads((served_bundle / "items.json").read_text())
    assert items[0] == {"id": 1, "item": served_run.dataset.item_ids[1], "title": served_run.dataset.titles[1]}


def test_crm_bundle_loads_without_transformers(served_bundle):
    code = ("import sys; from llmd4rec.serve import create_app; create_app(sys.argv[1]); "
            "assert 'transformers' not in sys.modules, 'transformers was imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code, str(served_bundle)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_recommend_cli_matches_server(served_bundle, served_client, served_run, capsys):
    h = [served_run.dataset.item_ids[i] for i in served_run.split.test_inputs[4]]
    recommend_cli(served_bundle, ",".join(h) + ",", 4, True)
    lines = capsys.readouterr().out.splitlines()
    served = post(served_client, "/recommend", {"history": h, "k": 4}).json()["items"]
    table = lines.index(next(line for line in lines if line.lstrip().startswith("rank")))
    assert [line.split()[1] for line in lines[table + 1:]] == [r["item"] for r in served]
    # the history is shown with its titles first (the synthetic items have titles)
    titles = [served_run.dataset.titles[i] for i in served_run.split.test_inputs[4]]
    assert lines[0] == "history:" and [line.split(None, 1)[1] for line in lines[1:1 + len(h)]] == titles
    assert cli.main(["recommend", str(served_bundle), "--history", "1,nope", "--k", "3"]) == 2
    assert "unknown item ids: 'nope'" in capsys.readouterr().err


def test_export_refusals(served_run, served_bundle, tmp_path, capsys):
    with pytest.raises(InputError, match="not empty"):
        export_bundle(served_run.run_dir, served_bundle)
    with pytest.raises(InputError, match="no llm model"):
        export_bundle(served_run.run_dir, tmp_path / "b", "llm")
    assert cli.main(["export", str(tmp_path), str(tmp_path / "b")]) == 2
    assert "no run.json" in capsys.readouterr().err
    with pytest.raises(InputError, match="not a bundle"):
        load_bundle(tmp_path)


def fake_distilled_run(monkeypatch, run, cfg, llm=None):
    """load_run of a "llmd4rec" run gives its CRM, or its LLM with which="llm"."""
    monkeypatch.setattr(llmd4rec.loading, "load_run", lambda *a, which=None, **kw: llmd4rec.loading.LoadedRun(
        run.run_dir, "llmd4rec", cfg, run.dataset, run.split, llm if which == "llm" else run.model))


def test_distillation_run_exports_its_crm(served_run, tmp_path, monkeypatch):
    """A "llmd4rec" run holds both students; --model picks one, crm by default (what load_run returns)."""
    fake_distilled_run(monkeypatch, served_run, served_run.cfg)
    out = export_bundle(served_run.run_dir, tmp_path / "distilled")
    assert json.loads((out / "bundle.json").read_text())["kind"] == "crm"
    with pytest.raises(InputError, match="--model must be crm or llm"):
        export_bundle(served_run.run_dir, tmp_path / "other", "teacher")


def test_llm_bundle_round_trip(served_run, tmp_path, monkeypatch):
    """An E4SRec on a tiny random Qwen2 saved as a local model folder: the bundle scores exactly like the model."""
    pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from llmd4rec.models.backbone import load_backbone
    from llmd4rec.models.e4srec import E4SRec
    from llmd4rec.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    backbone = transformers.AutoModelForCausalLM.from_config(transformers.Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256))
    backbone.save_pretrained(tmp_path / "qwen")
    tokenizer.save_pretrained(tmp_path / "qwen")

    cfg = Config(llm=E4SRecConfig(backbone=str(tmp_path / "qwen"), max_len=8, instruction="History:",
                                  response="\nNext:"))
    model = E4SRec(cfg.llm, torch.randn(N_ITEMS + 1, 16), *load_backbone(cfg.llm.backbone)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)  # LoRA B starts at zero: make every trained part matter
    out = write_bundle(tmp_path / "llm", "llm", model, cfg, served_run.dataset)
    info = json.loads((out / "bundle.json").read_text())
    assert info["kind"] == "llm" and info["backbone"] == {"name": str(tmp_path / "qwen"), "keep_layers": None,
                                                          "dtype": "float32"}
    served_client = TestClient(create_app(out))
    h = served_run.split.test_inputs[0]
    r = post(served_client, "/recommend", {"history": [served_run.dataset.item_ids[i] for i in h], "k": 5})
    assert r.status_code == 200 and served_client.get("/info").json()["kind"] == "llm"
    assert_same(r.json(), reference(model, [h], 5, True)[0], served_run)

    fake_distilled_run(monkeypatch, served_run, cfg, llm=model)
    distilled = export_bundle(served_run.run_dir, tmp_path / "distilled-llm", "llm")
    assert json.loads((distilled / "bundle.json").read_text())["kind"] == "llm"
    history = [served_run.dataset.item_ids[i] for i in h]
    r2 = post(TestClient(create_app(distilled)), "/recommend", {"history": history, "k": 5})
    assert r2.json() == r.json()


def _copy_bundle(served_bundle: Path, dest: Path) -> Path:
    import shutil

    return Path(shutil.copytree(served_bundle, dest))


def _rewrite_info(path: Path, change) -> None:
    info = json.loads((path / "bundle.json").read_text())
    (path / "bundle.json").write_text(json.dumps(change(info)))


def _rehash(path: Path, name: str) -> None:
    """Record a file's new sha256 in bundle.json, as a careful forger would."""
    digest = hashlib.sha256((path / name).read_bytes()).hexdigest()
    _rewrite_info(path, lambda i: {**i, "files": {**i["files"], name: digest}})


@pytest.mark.parametrize("name, change, needle", [
    ("list", lambda i: [1], "must hold a JSON object"),
    ("no-n-items", lambda i: {k: v for k, v in i.items() if k != "n_items"}, "'n_items' must be a positive integer"),
    ("no-files", lambda i: {k: v for k, v in i.items() if k != "files"}, "no sha256 recorded"),
    ("no-model-hash", lambda i: {**i, "files": {**i["files"], "model.safetensors": None}}, "no sha256 recorded"),
])
def test_bad_bundle_json_is_one_input_error(served_bundle, tmp_path, name, change, needle):
    b = _copy_bundle(served_bundle, tmp_path / name)
    _rewrite_info(b, change)
    with pytest.raises(InputError, match=needle):
        load_bundle(b)


def test_bad_items_json_and_corrupt_files_are_refused(served_bundle, tmp_path, capsys):
    b = _copy_bundle(served_bundle, tmp_path / "items")
    (b / "items.json").write_text('{"1": "a"}')
    with pytest.raises(InputError, match="items.json"):  # its checksum no longer matches either
        load_bundle(b)
    _rehash(b, "items.json")
    with pytest.raises(InputError, match="items.json must be a list"):
        load_bundle(b)
    # a flipped byte in the weights is caught by bundle.json's sha256 even with no sidecar file
    c = _copy_bundle(served_bundle, tmp_path / "flipped")
    (c / "model.safetensors.sha256").unlink()
    data = bytearray((c / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (c / "model.safetensors").write_bytes(bytes(data))
    assert cli.main(["recommend", str(c), "--history", "1"]) == 2
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and err.count("\n") == 1


def test_non_finite_weights_are_neither_exported_nor_served(served_run, served_bundle, tmp_path):
    broken = SASRec(N_ITEMS, served_run.cfg.crm)
    broken.load_state_dict(served_run.model.state_dict())
    with torch.no_grad():
        broken.item_emb.weight[3, 0] = float("nan")
    with pytest.raises(InputError, match="non-finite weights .*item_emb.weight"):
        write_bundle(tmp_path / "nan", "crm", broken, served_run.cfg, served_run.dataset)
    assert not (tmp_path / "nan").exists() and not list(tmp_path.glob(".nan.*"))
    # a bundle whose weights were made non-finite after export (checksums rewritten to match) is refused too
    from safetensors.torch import save_file

    b = _copy_bundle(served_bundle, tmp_path / "b")
    save_file(broken.state_dict(), str(b / "model.safetensors"))
    (b / "model.safetensors.sha256").unlink()
    _rehash(b, "model.safetensors")
    with pytest.raises(InputError, match="non-finite weights"):
        load_bundle(b)


def test_bundle_files_follow_the_umask(served_run, tmp_path):
    import os

    old = os.umask(0o022)
    try:
        out = write_bundle(tmp_path / "perm", "crm", served_run.model, served_run.cfg, served_run.dataset)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {p.name: 0o644 for p in out.iterdir()}
