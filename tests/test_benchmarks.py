"""The benchmark tooling: result-file provenance, run_all's steps, and the README's numbers coming from files."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import _common  # noqa: E402
import run_all  # noqa: E402
from distill_suite import phase_validation  # noqa: E402
from recbole_workers import RecBoleScorer  # noqa: E402


def tiny_beauty(folder: Path) -> Path:
    """A small file in the S3Rec Beauty layout (user item item ..., chronological), seeded."""
    rng = random.Random(0)
    lines = [" ".join(str(x) for x in [u] + [rng.randint(1, 40) for _ in range(rng.randint(5, 12))])
             for u in range(1, 81)]
    (folder / "Beauty").mkdir(parents=True)
    (folder / "Beauty" / "Beauty.txt").write_text("\n".join(lines) + "\n")
    return folder


def run(args: list[str], results: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "LLMD4REC_RESULTS": str(results), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_run_all_only_mostpop_writes_a_traceable_result(tmp_path):
    from llmd4rec.config import load_config
    from llmd4rec.evaluation import evaluate_split
    from llmd4rec.models.popularity import MostPop
    from llmd4rec.loading import load_data

    data, results = tiny_beauty(tmp_path / "data"), tmp_path / "results"
    done = run(["benchmarks/run_all.py", "--only", "mostpop", "--data-dir", str(data), "--runs",
                str(tmp_path / "runs")], results)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads((results / "mostpop_beauty.json").read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert r["commit"] == head and isinstance(r["dirty"], bool)
    assert r["command"].startswith("python benchmarks/mostpop.py --dataset beauty --data-dir ")
    assert r["machine"]["torch_threads"] >= 1 and r["machine"]["cpu_model"]
    assert len(r["machine"]["loadavg_start"]) == 3 and len(r["machine"]["loadavg_end"]) == 3
    assert r["wall_seconds"] > 0 and r["builds_on"] == []
    _, split = load_data(load_config(None, ["data.name=beauty", f"data.data_dir={data}"]))
    cfg = load_config(None, ["data.name=beauty", f"data.data_dir={data}"])
    expected = evaluate_split(MostPop(split.train, split.n_items), split, cfg.eval, "test")
    assert r["metrics"]["test"] == pytest.approx(expected)


def test_run_all_dry_run_prints_the_chain_in_dependency_order(tmp_path):
    runs = tmp_path / "runs"
    done = run(["benchmarks/run_all.py", "--dry-run", "--only", "e4srec_beauty_cpu", "sasrec_beauty",
                "--data-dir", str(tmp_path / "data"), "--runs", str(runs)], tmp_path / "results")
    assert done.returncode == 0, done.stderr[-3000:]
    commands = [line for line in done.stdout.splitlines() if line.startswith("python ")]
    rel = os.path.relpath(runs, ROOT)
    assert commands[0].startswith("python benchmarks/train_crm.py --config configs/sasrec/beauty.yaml")
    assert f"run_dir={rel}/sasrec_beauty" in commands[0]
    assert commands[1].startswith("python benchmarks/train_llm.py")
    assert "'crm_run=<sasrec_beauty.run_dir>'" in commands[1] and f"run_dir={rel}/e4srec_beauty_cpu" in commands[1]
    assert not runs.exists()


def write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def test_stale_reason_follows_commit_cleanliness_and_dates(tmp_path, monkeypatch):
    monkeypatch.setattr(run_all, "RESULTS", tmp_path)
    monkeypatch.setattr(run_all, "same_code", lambda commit: commit == "same")
    base = {"commit": "same", "dirty": False}
    write(tmp_path / "sasrec_beauty.json", {**base, "date": "2026-01-01T10:00:00+0000"})
    assert run_all.stale_reason("e4srec_beauty_cpu") == "no e4srec_beauty_cpu.json"
    write(tmp_path / "e4srec_beauty_cpu.json", {**base, "date": "2026-01-01T11:00:00+0000"})
    assert run_all.stale_reason("e4srec_beauty_cpu") is None
    write(tmp_path / "sasrec_beauty.json", {**base, "date": "2026-01-01T12:00:00+0000"})
    assert "older" in run_all.stale_reason("e4srec_beauty_cpu")
    assert run_all.stale_reason("sasrec_beauty") is None
    write(tmp_path / "sasrec_beauty.json", {**base, "dirty": True, "date": "2026-01-01T12:00:00+0000"})
    assert "clean" in run_all.stale_reason("sasrec_beauty")
    write(tmp_path / "sasrec_beauty.json", {"commit": "other", "dirty": False, "date": "2026-01-01T12:00:00+0000"})
    assert "other code" in run_all.stale_reason("sasrec_beauty")


def test_a_stopped_recipe_step_resumes_its_unfinished_run_folder(tmp_path):
    step = tmp_path / "sasrec_beauty"
    for name, finished in (("a", True), ("b", False)):
        (step / name).mkdir(parents=True)
        (step / name / "config.yaml").write_text("")
        if finished:
            (step / name / "results.json").write_text("{}")
    assert run_all.unfinished_run(step) == step / "b"
    cmd = run_all.command("sasrec_beauty", "data", tmp_path, "stamp")
    assert cmd[-2:] == ["--resume", os.path.relpath(step / "b", run_all.ROOT)]
    (step / "b" / "results.json").write_text("{}")
    assert "--resume" not in run_all.command("sasrec_beauty", "data", tmp_path, "stamp")


def test_builds_on_follows_result_files_transitively(tmp_path, monkeypatch):
    monkeypatch.setattr(_common, "RESULTS", tmp_path)
    write(tmp_path / "a.json", {"command": "python a", "commit": "c1", "run_dir": "runs/x/crm", "builds_on": []})
    write(tmp_path / "b.json", {"command": "python b", "commit": "c2", "run_dir": "runs/x/llm",
                                "builds_on": [{"run": "runs/x/crm"}]})
    got = _common.builds_on("runs/x/llm", None, "runs/elsewhere")
    assert [(e["run"], e["command"], e["commit"]) for e in got] == [
        ("runs/x/llm", "python b", "c2"), ("runs/x/crm", "python a", "c1"), ("runs/elsewhere", None, None)]
    assert got[0]["result"] == os.path.relpath(tmp_path / "b.json", _common.ROOT)


def test_phase_validation_reads_start_and_best_distilled_epoch(tmp_path):
    def phase(name, start, distilled, kept):
        (tmp_path / name).mkdir()
        done = {"phase": name, "start": {"valid": {"NDCG@10": start}}, "distilled": {"valid": {"NDCG@10": distilled}},
                "kept_start": kept}
        (tmp_path / name / "done.json").write_text(json.dumps(done))

    phase("round1-up", 0.071, 0.065, True)
    phase("round1-down", 0.020, 0.040, False)
    (tmp_path / "crm0").mkdir()
    (tmp_path / "crm0" / "done.json").write_text(json.dumps({"phase": "crm0", "valid": {"NDCG@10": 0.5}}))
    assert phase_validation(tmp_path) == {
        "round1-up": {"start": 0.071, "best_distilled": 0.065, "kept": "start"},
        "round1-down": {"start": 0.020, "best_distilled": 0.040, "kept": "distilled"}}


def test_eval_speed_measures_each_row_in_its_own_process(tmp_path):
    data, results = tiny_beauty(tmp_path / "data"), tmp_path / "results"
    done = run(["benchmarks/eval_speed.py", "--data-dir", str(data), "--threads", "1", "--memory-mb", "64", "1"],
               results)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads((results / "eval_speed_beauty.json").read_text())
    assert r["identical_ranks_across_budgets"] is True
    assert set(r["rows"]) == {"memory_mb=64", "memory_mb=1"}
    for row in r["rows"].values():
        assert row["peak_rss_mb"] >= row["peak_above_start_mb"] >= 0


class _FakeRecBole:
    """Returns the item_seq it is given, so the conversion from llmd4rec's histories can be read off."""

    def __init__(self):
        self.item_embedding = torch.nn.Embedding(20, 3)

    def forward(self, seq, lengths):
        self.seen = (seq.clone(), lengths.clone())
        return torch.zeros(len(seq), 3)


def test_recbole_scorer_left_aligns_histories_in_recbole_ids():
    model = _FakeRecBole()
    ours_to_rb = torch.tensor([0, 11, 12, 13, 14, 15])
    scorer = RecBoleScorer(model, ours_to_rb, max_len=4)
    scorer.encode(torch.tensor([[0, 0, 3, 5], [1, 2, 3, 4], [0, 0, 0, 2]]))
    seq, lengths = model.seen
    assert seq.tolist() == [[13, 15, 0, 0], [11, 12, 13, 14], [12, 0, 0, 0]]
    assert lengths.tolist() == [2, 4, 1]
    state = torch.randn(2, 3)
    scores = scorer.score_items(state, 2, 5)
    assert torch.allclose(scores, state @ model.item_embedding.weight[[12, 13, 14]].T)


def test_readme_prose_holds_no_hand_typed_figures():
    """Outside the blocks readme_tables.py writes, the README holds no measured figure (0.0xx metrics, seconds)."""
    text = (ROOT / "README.md").read_text()
    prose = re.sub(r"<!-- table:\w+ -->.*?<!-- /table -->", "", text, flags=re.S)
    prose = re.sub(r"```.*?```", "", prose, flags=re.S)
    assert re.findall(r"\b0\.0\d+|\b\d+(?:\.\d+)? (?:s|min|minutes|seconds) per epoch", prose) == []


def test_train_crm_seeds_records_each_run_and_their_spread(tmp_path):
    """--seeds 2: two runs under different seeds, `metrics` their mean and `std` their sample deviation."""
    data, results = tiny_beauty(tmp_path / "data"), tmp_path / "results"
    done = run(["benchmarks/train_crm.py", "--config", "configs/sasrec/beauty.yaml", "--name", "seeds", "--seeds", "2",
                f"data.data_dir={data}", f"run_dir={tmp_path / 'runs'}", "crm.hidden=16", "crm_train.epochs=2",
                "device=cpu"], results)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads((results / "seeds.json").read_text())
    a, b = (out["rows"][k]["metrics"]["test"]["NDCG@10"] for k in ("seed_0", "seed_1"))
    assert a != b and out["seeds"] == 2 and len(set(out["made_runs"])) == 2
    assert out["metrics"]["test"]["NDCG@10"] == pytest.approx((a + b) / 2)
    assert out["std"]["test"]["NDCG@10"] == pytest.approx(abs(a - b) / 2 ** 0.5)


def test_teacher_compare_trains_four_rows_on_one_budget_and_compares_them_to_sasrec(tmp_path, monkeypatch):
    """SASRec, text-initialised SASRec, ID-only and text E4SRec on the synthetic data with a tiny backbone: each row's
    metrics are its run's, head and tail users partition the test users, the better/equal/worse shares add to 1, and
    the text E4SRec really reads text while the ID-only one does not."""
    pytest.importorskip("peft")
    from llmd4rec.testing import save_tiny_backbone

    backbone = save_tiny_backbone(tmp_path / "tiny")
    results = tmp_path / "results"
    monkeypatch.setenv("LLMD4REC_CACHE", str(tmp_path / "cache"))  # the text embeddings' cache
    done = run(["benchmarks/teacher_compare.py", "--config", "configs/sasrec/synthetic.yaml", "--name", "teach",
                "--runs", str(tmp_path / "runs"), "data.synthetic_users=60", "data.synthetic_items=40",
                "crm.hidden=16", "crm.max_len=10", "llm.max_len=10", f"llm.backbone={backbone}",
                f"text.backbone={backbone}", "crm_train.epochs=2", "llm_train.epochs=1",
                "llm_train.max_targets_per_user=4", "llm_train.warmup_steps=2", "device=cpu"], results)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads((results / "teach.json").read_text())
    ensembles = ["SASRec+E4SRec", "SASRec+E4SRec_text", "SASRec_text_init+E4SRec_text"]
    assert list(out["rows"]) == ["SASRec", "SASRec_text_init", "E4SRec", "E4SRec_text", *ensembles]
    users = 60
    for row, v in out["rows"].items():
        if row in ensembles:  # its test metrics are its head and tail users' together
            n = {part: v[part]["users"] for part in ("head", "tail")}
            assert v["test"]["HR@10"] == pytest.approx(
                (v["head"]["HR@10"] * n["head"] + v["tail"]["HR@10"] * n["tail"]) / users)
        else:
            saved = json.loads((Path(out["runs"][row]) / "results.json").read_text())
            assert v["test"] == saved["test"] and v["valid"] == saved["valid"] and v["train_seconds"] > 0
        assert v["head"]["users"] + v["tail"]["users"] == users
        if row != "SASRec":
            assert sum(v["vs_SASRec"].values()) == pytest.approx(1.0)
    configs = {row: (Path(out["runs"][row]) / "config.yaml").read_text() for row in out["runs"]}
    assert "item_text: true" in configs["E4SRec_text"] and "item_text: false" in configs["E4SRec"]
    assert "text_init: true" in configs["SASRec_text_init"]
    assert (Path(out["runs"]["E4SRec_text"]) / "llm" / "text_table.safetensors").exists()
    assert out["metrics"]["test"] == out["rows"]["E4SRec_text"]["test"]
