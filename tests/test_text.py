"""Item text: readers and their one-line errors, the Amazon metadata builder, the frozen backbone's embeddings
(pooling, padding invariance, cache) and SASRec's text-initialised item table."""

import gzip
import json
import subprocess
import sys

import pytest
import torch

from llmd4rec.config import load_config
from llmd4rec.data.dataset import Dataset
from llmd4rec.data.registry import load_dataset
from llmd4rec.data.text import (attach_item_text, build_amazon_item_text, item_strings, read_text_table,
                                text_coverage)
from llmd4rec.errors import InputError
from llmd4rec import text_embeddings
from llmd4rec.text_embeddings import encode_item_text, encode_texts, project_to_width


def _dataset() -> Dataset:
    return Dataset(name="toy", sequences=[[1, 2, 3], [2, 3, 4]], n_items=4, item_ids=["<pad>", "a", "b", "c", "d"],
                   user_ids=["u1", "u2"])


def test_text_table_attaches_by_original_id_and_missing_items_fall_back(tmp_path):
    path = tmp_path / "text.tsv"
    path.write_text("item\ttitle\tbrand\n b \tBlue Pen\tAcme\nc\tRed Pen\t\nzz\tNot in catalogue\tX\n")
    ds = attach_item_text(_dataset(), read_text_table(path), path)
    assert ds.item_text == {"title": ["", "", "Blue Pen", "Red Pen", ""], "brand": ["", "", "Acme", "", ""]}
    assert item_strings(ds, ["title", "brand"]) == ["", "", "Blue Pen. Acme", "Red Pen", ""]
    assert text_coverage(ds) == 0.5
    assert ds.titles[2] == "Blue Pen"


@pytest.mark.parametrize("content, problem, line", [
    ("item\n", "header row", 1),
    ("item,title\na,x\nb\n", "expected 2 columns, got 1", 3),
    ("item,title\na,x\na,y\n", "item a appears twice", 3),
    ("item,title\n,x\n", "empty item id", 2),
    ("item,title\nq,x\n", "no item id of the text file", None),
])
def test_bad_text_tables_name_file_and_line(tmp_path, content, problem, line):
    path = tmp_path / "text.csv"
    path.write_text(content)
    with pytest.raises(InputError) as e:
        attach_item_text(_dataset(), read_text_table(path), path)
    assert problem in str(e.value) and str(path) in str(e.value)
    if line:
        assert f"{path}:{line}:" in str(e.value)


def test_unknown_text_field_is_one_clear_error():
    ds = _dataset()
    ds.item_text = {"title": [""] * 5}
    with pytest.raises(InputError, match="text.fields names brand"):
        item_strings(ds, ["title", "brand"])


def test_amazon_metadata_builder_reads_json_and_python_literals_without_executing(tmp_path):
    meta = tmp_path / "meta_Beauty.json.gz"
    lines = [json.dumps({"asin": "A1", "title": "Nail  Polish", "brand": "OPI",
                         "categories": [["Beauty", "Nails"], ["Beauty", "Sale"]]}),
             str({"asin": "A2", "title": "Lip Balm", "categories": [["Beauty", "Lips"]]}),  # single quotes
             str({"asin": "ZZ", "title": "not mapped"})]
    with gzip.open(meta, "wt") as f:
        f.write("\n".join(lines) + "\n")
    asin_map = tmp_path / "item_asin.tsv"
    asin_map.write_text("item_id\tasin\n1\tA1\n2\tA2\n3\tA3\n")
    out = tmp_path / "item_text.tsv"
    counts = build_amazon_item_text(meta, asin_map, out)
    assert counts == {"items": 3, "with_metadata": 2, "with_title": 2}
    assert out.read_text().splitlines() == ["item_id\tasin\ttitle\tbrand\tcategories",
                                            "1\tA1\tNail Polish\tOPI\tBeauty > Nails | Beauty > Sale",
                                            "2\tA2\tLip Balm\t\tBeauty > Lips", "3\tA3\t\t\t"]
    evil = tmp_path / "evil.json"
    evil.write_text("__import__('os').system('touch " + str(tmp_path / "owned") + "')\n")
    with pytest.raises(InputError, match="evil.json:1: neither JSON"):
        build_amazon_item_text(evil, asin_map, out)
    assert not (tmp_path / "owned").exists()


def test_cli_builds_item_text_and_reports_coverage(tmp_path):
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"asin": "A1", "title": "Pen"}) + "\n")
    asin_map = tmp_path / "map.tsv"
    asin_map.write_text("1\tA1\n2\tA2\n")
    out = tmp_path / "item_text.tsv"
    run = subprocess.run([sys.executable, "-m", "llmd4rec", "data", "item-text", "--meta", str(meta),
                          "--asin-map", str(asin_map), "--out", str(out)], capture_output=True, text=True)
    assert run.returncode == 0 and "2 items, 1 found" in run.stdout
    table = tmp_path / "synthetic_text.csv"
    table.write_text("item,title\n1,First\n2,Second\n")
    stats = subprocess.run([sys.executable, "-m", "llmd4rec", "data", "stats", "--dataset", "synthetic", "--json",
                            "--item-text", str(table)], capture_output=True, text=True)
    assert json.loads(stats.stdout)["items_with_text"] == 2 / 500


def test_shipped_item_text_is_found_beside_real_datasets(shared_data):
    ml = load_dataset("ml-100k", shared_data)
    assert ml.item_text["title"][1] == "Toy Story" and ml.item_text["genres"][1] == "Animation, Children's, Comedy"
    assert item_strings(ml, ["title", "year", "genres"])[1] == "Toy Story. 1995. Animation, Children's, Comedy"
    beauty = load_dataset("beauty", shared_data)
    first = beauty.item_text["categories"][1]
    assert beauty.titles[1] == beauty.item_text["title"][1] != ""
    assert item_strings(beauty, ["categories"])[1] == first.split(" | ")[0]
    assert text_coverage(load_dataset("lastfm", shared_data)) is None


def _text_cfg(backbone, **kw):
    overrides = [f"text.backbone={backbone}", "text.dtype=float32", "text.texts_per_batch=2"]
    return load_config(None, overrides + [f"text.{k}={v}" for k, v in kw.items()])


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_text_embedding_pools_the_final_hidden_states_and_ignores_batch_padding(tiny_backbone_dir, pooling):
    from llmd4rec.models.backbone import load_backbone

    cfg = _text_cfg(tiny_backbone_dir, pooling=pooling).text
    model, tok = load_backbone(str(tiny_backbone_dir))
    texts = ["ab", "", "a much longer text than the others", "xyz"]
    batched = encode_texts(texts, cfg, backbone=model, tokenizer=tok)
    assert batched[1].abs().sum() == 0  # no text: zero row, the ID-only fallback
    ids = torch.tensor([tok("ab", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        h = model.get_decoder()(input_ids=ids).last_hidden_state[0]
    expected = h.mean(0) if pooling == "mean" else h[-1]
    assert torch.allclose(batched[0], expected, atol=1e-5)
    for i, t in enumerate(texts):  # alone or beside longer texts (padding), the same vector
        alone = encode_texts([t], cfg, backbone=model, tokenizer=tok)[0]
        assert torch.allclose(batched[i], alone, atol=1e-5)


def test_text_embeddings_are_cached_by_settings(tiny_backbone_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMD4REC_CACHE", str(tmp_path))
    ds = load_dataset("synthetic", synthetic_users=50, synthetic_items=30)
    cfg = _text_cfg(tiny_backbone_dir)
    first = encode_item_text(cfg, ds)
    assert first.shape == (31, 32) and first[0].abs().sum() == 0 and (first[1:].abs().sum(1) > 0).all()
    monkeypatch.setattr(text_embeddings, "encode_texts", lambda *a, **k: pytest.fail("cache not used"))
    assert torch.equal(encode_item_text(cfg, ds), first)
    monkeypatch.undo()
    monkeypatch.setenv("LLMD4REC_CACHE", str(tmp_path))
    other = encode_item_text(_text_cfg(tiny_backbone_dir, pooling="last"), ds)
    assert not torch.allclose(other, first)
    assert len(list((tmp_path / "text").glob("*.safetensors"))) == 2


def test_e4srec_text_table_is_centred_with_unit_rms_row_norm(tiny_backbone_dir, tmp_path, monkeypatch):
    """Rows with text: mean zero, root-mean-square norm 1 (about a CRM item row); rows without text stay zero."""
    monkeypatch.setenv("LLMD4REC_CACHE", str(tmp_path))
    ds = load_dataset("synthetic", synthetic_users=50, synthetic_items=30)
    cfg = _text_cfg(tiny_backbone_dir)
    cfg.llm.item_text = True
    raw = encode_item_text(cfg, ds)
    without = raw.clone()
    without[4] = 0  # an item without text
    monkeypatch.setattr(text_embeddings, "encode_item_text", lambda *a, **k: without.clone())
    table = text_embeddings.item_text_embeddings(cfg, ds)
    has = table.abs().sum(1) > 0
    assert has.sum() == 29 and not has[0] and not has[4]
    assert torch.allclose(table[has].mean(0), torch.zeros(32), atol=1e-5)
    assert float(table[has].pow(2).sum(1).mean()) == pytest.approx(1.0, rel=1e-5)
    centred = raw[has] - raw[has].mean(0)
    assert torch.allclose(table[has] / table[has].norm(dim=1, keepdim=True),
                          centred / centred.norm(dim=1, keepdim=True), atol=1e-5)  # directions kept


def test_projection_keeps_text_geometry_at_the_init_scale():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(41, 24, generator=g)
    table[0] = 0
    table[7] = 0  # an item without text
    table[5] = table[3]  # two items with the same text
    out = project_to_width(table, 8, 0.02)
    assert out.shape == (41, 8) and out[0].abs().sum() == 0 and out[7].abs().sum() > 0
    assert torch.equal(out[5], out[3])
    has = torch.ones(41, dtype=torch.bool)
    has[[0, 7]] = False
    assert abs(float(out[has].std()) - 0.02) < 1e-3
    with pytest.raises(InputError, match="text dimensions"):
        project_to_width(table, 32, 0.02)


def test_train_crm_with_text_init_end_to_end(tiny_backbone_dir, tmp_path):
    env = {"LLMD4REC_CACHE": str(tmp_path / "cache")}
    import os

    args = [sys.executable, "-m", "llmd4rec", "train-crm", "--config", "configs/sasrec/synthetic.yaml",
            f"run_dir={tmp_path}", "run_name=t", "crm.text_init=true", f"text.backbone={tiny_backbone_dir}",
            "crm_train.epochs=1", "crm.hidden=16", "crm.n_heads=1"]
    run = subprocess.run(args, capture_output=True, text=True, env={**os.environ, **env})
    assert run.returncode == 0, run.stderr[-2000:]
    assert len(list((tmp_path / "cache" / "text").glob("*.safetensors"))) == 1
