"""The alternating loop end to end through the CLI, on real data with a tiny random Qwen2 backbone."""

import json

import pytest
import torch

from llmd4rec.cli import main
from llmd4rec.distill import TeacherCache
from llmd4rec.distill.teacher import kd_hook, sample_index
from llmd4rec.loading import load_run
from llmd4rec.evaluation import evaluate_split
from llmd4rec.training.llm import sample_grid


def _args(tmp_path, backbone, name, *extra):
    return ["distill", "--config", "configs/llmd4rec/synthetic.yaml", f"llm.backbone={backbone}",
            "llm.keep_layers=null", "crm_train.epochs=2", "distill.crm_epochs=1", "llm_train.samples_per_batch=32",
            "distill.cache_users_per_batch=32", f"run_dir={tmp_path}", f"run_name={name}", *extra]


def test_one_round_on_lastfm_writes_every_output(tmp_path, shared_data, tiny_backbone_dir, capsys):
    args = _args(tmp_path, tiny_backbone_dir, "lastfm", "data.name=lastfm", f"data.data_dir={shared_data}",
                 "distill.cache_topk=64", "llm_train.max_targets_per_user=2")
    assert main(args) == 0
    run = tmp_path / "lastfm"
    results = json.loads((run / "results.json").read_text())
    assert set(results["rows"]) == {"SASRec", "E4SRec", "LLMD4Rec_C", "LLMD4Rec_L",
                                    "LLMD4Rec_C (distilled, no fall-back)", "LLMD4Rec_L (distilled, no fall-back)"}
    assert [h["round"] for h in results["history"]] == [0, 1]
    for name in ("results.md", "rounds.png", "metrics.jsonl", "config.yaml", "round1-up/best.safetensors",
                 "round1-down/best.safetensors", "round1-cache-crm/header.json", "round1-cache-llm/header.json"):
        assert (run / name).exists(), name
    assert "LLMD4Rec_C vs SASRec" in (run / "results.md").read_text()
    # the LLM teacher cache covers every CRM training position of LastFM; the CRM one the LLM's last 2 targets
    loaded = load_run(run)
    _, crm_targets = sample_grid(loaded.split.train, 50, 0)
    assert len(TeacherCache.open(run / "round1-cache-llm")) == int((crm_targets > 0).sum())
    assert len(TeacherCache.open(run / "round1-cache-crm")) == sum(min(2, len(s) - 1) for s in loaded.split.train
                                                                   if len(s) >= 2)
    # a phase records its best distilled epoch; with keep_start it deploys the start when that validates better
    phases = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    up = [p for p in phases if p.get("phase") == "round1-up" and "valid" in p]
    done = json.loads((run / "round1-up" / "done.json").read_text())
    best = max(p["valid"]["NDCG@10"] for p in up)
    assert done["distilled"]["valid"]["NDCG@10"] == pytest.approx(best)
    assert done["kept_start"] == (best <= done["start"]["valid"]["NDCG@10"])
    assert done["start"] == results["history"][0]["crm"]
    deployed = results["history"][1]["crm"]["valid"]["NDCG@10"]
    assert deployed == pytest.approx(max(best, done["start"]["valid"]["NDCG@10"]))
    assert results["rows"]["LLMD4Rec_C (distilled, no fall-back)"] == done["distilled"]
    # evaluating the run folder reproduces the distilled CRM's test metrics
    again = evaluate_split(loaded.model, loaded.split, loaded.cfg.eval, "test")
    assert again == pytest.approx(results["rows"]["LLMD4Rec_C"]["test"])
    # resuming a finished run (under its own config.yaml) recomputes nothing and gives the same table
    capsys.readouterr()
    assert main(["distill", "--resume", str(run)]) == 0
    assert json.loads((run / "results.json").read_text())["rows"] == results["rows"]


@pytest.mark.parametrize("extra", [["distill.direction=upward", "distill.adaptive_weights=false"],
                                   ["distill.direction=downward", "distill.embedding_update=false"],
                                   ["distill.direction=downward", "llm.item_head=tied"]])
def test_ablation_switches(tmp_path, tiny_backbone_dir, extra):
    args = _args(tmp_path, tiny_backbone_dir, "ablation", "data.synthetic_users=150", "data.synthetic_items=60",
                 *extra)
    assert main(args) == 0
    run = tmp_path / "ablation"
    up = (run / "round1-up").exists()
    down = (run / "round1-down").exists()
    assert (up, down) == (("upward" in extra[0]), ("downward" in extra[0]))
    results = json.loads((run / "results.json").read_text())
    if not down:  # the LLM side is untouched without a downward phase
        assert results["rows"]["LLMD4Rec_L"] == results["rows"]["E4SRec"]
    if not up:
        assert results["rows"]["LLMD4Rec_C"] == results["rows"]["SASRec"]


@pytest.mark.parametrize("extra, caches", [
    (["distill.teacher=self", "distill.upward_init=scratch", "distill.keep_start=false"], {"round1-cache-crm"}),
    (["distill.teacher=ensemble", "distill.upward_lr=0.0001"], {"round1-cache-ensemble"}),
    (["distill.beta=0", "distill.keep_start=false"], set()),
    (["distill.upward_loss=rank", "distill.rank_k=5", "distill.keep_start=false"], {"round1-cache-llm"}),
])
def test_upward_strategies_and_controls(tmp_path, tiny_backbone_dir, extra, caches):
    """Upward only: the teacher (LLM, the two-model ensemble, or the CRM itself), a fresh or continued student, and
    beta=0 (no KD term, no teacher cache). Without keep_start the deployed CRM is the distilled one, whatever it
    validates; a scratch student does not start from the baseline's weights."""
    args = _args(tmp_path, tiny_backbone_dir, "up", "data.synthetic_users=150", "data.synthetic_items=60",
                 "distill.direction=upward", *extra)
    assert main(args) == 0
    run = tmp_path / "up"
    assert {p.name for p in run.glob("round1-cache-*")} == caches
    if "round1-cache-ensemble" in caches:  # the mix is part of what the cache holds: another alpha rebuilds it
        header = json.loads((run / "round1-cache-ensemble" / "header.json").read_text())
        assert header["info"]["ensemble_alpha"] == 0.5
    done = json.loads((run / "round1-up" / "done.json").read_text())
    results = json.loads((run / "results.json").read_text())
    if "distill.keep_start=false" in extra:
        assert not done["kept_start"]
        assert results["rows"]["LLMD4Rec_C"] == {k: done["distilled"][k] for k in ("valid", "test")}
        assert results["rows"]["LLMD4Rec_C (distilled, no fall-back)"] == done["distilled"]
    loaded = load_run(run)
    again = evaluate_split(loaded.model, loaded.split, loaded.cfg.eval, "test")
    assert again == pytest.approx(results["rows"]["LLMD4Rec_C"]["test"])


@pytest.mark.parametrize("extra, columns, protocol", [
    (["eval.ks=10"], ["HR@10", "NDCG@10"], "full ranking over all items, exclude_seen=True"),
    (["eval.mode=sampled", "eval.n_negatives=20"], [f"sampled_{m}@{k}" for m in ("HR", "NDCG") for k in (5, 10, 20)],
     "sampled ranking against 20 unseen negatives per user"),
])
def test_results_table_follows_the_eval_config(tmp_path, tiny_backbone_dir, extra, columns, protocol):
    """The table's columns are eval.ks under eval.mode's keys, in the order of the other recipes' tables, and its
    title names the ranking protocol."""
    args = _args(tmp_path, tiny_backbone_dir, "eval", "data.synthetic_users=150", "data.synthetic_items=60",
                 "distill.direction=upward", *extra)
    assert main(args) == 0
    run = tmp_path / "eval"
    lines = (run / "results.md").read_text().splitlines()
    assert f"({protocol}," in lines[0]
    cells = " | ".join(columns)
    assert f"| model | {cells} |" in lines and f"| relative gain (%) | {cells} |" in lines
    assert "nan" not in "\n".join(lines)
    assert (run / "rounds.png").exists()


def test_kd_hook_uses_cache_rows_and_weights(tmp_path):
    """The hook's loss equals the hand-assembled beta * w2 * KL averaged over the batch's positions."""
    from llmd4rec.distill import kd_kl, target_ranks, weights_llm_to_crm

    g = torch.Generator().manual_seed(0)
    targets_grid = torch.tensor([[0, 3, 4], [0, 0, 2]])
    teacher = torch.randn(3, 6, generator=g)
    writer = TeacherCache.create(tmp_path / "c", 3, 5, k=5, temperature=0.2, mode="full")
    tgt = targets_grid[targets_grid > 0]
    writer.write(0, teacher, tgt)
    cache = writer.finalize()
    kd = kd_hook(cache, sample_index(targets_grid), scale=0.5, t_squared=False, adaptive=True, student="crm")
    student = torch.randn(3, 6, generator=g)
    users, cols = torch.tensor([0, 0, 1]), torch.tensor([1, 2, 2])
    got = kd(users, cols, student, tgt)
    w = weights_llm_to_crm(target_ranks(student, tgt), target_ranks(teacher, tgt))
    want = 0.5 * (w * kd_kl(student, teacher.half().float(), 0.2)).sum() / 3
    assert got.item() == pytest.approx(want.item(), rel=5e-3)


def test_cache_from_reads_a_finished_upward_cache_instead_of_computing_it(tmp_path, tiny_backbone_dir, monkeypatch):
    """A second run with the first's teacher settings and distill.cache_from gets the same results without running
    its teacher; with another temperature the copied cache is rejected and rebuilt."""
    from llmd4rec.distill import teacher

    common = ["data.synthetic_users=150", "data.synthetic_items=60", "distill.direction=upward",
              "distill.keep_start=false", "distill.t2=1.0"]
    assert main(_args(tmp_path, tiny_backbone_dir, "a", *common)) == 0
    first = json.loads((tmp_path / "a" / "results.json").read_text())["rows"]

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher cache was computed again")

    with monkeypatch.context() as m:
        m.setattr(teacher.TeacherCache, "create", no_teacher)
        assert main(_args(tmp_path, tiny_backbone_dir, "b", *common, f"distill.cache_from={tmp_path / 'a'}")) == 0
    assert json.loads((tmp_path / "b" / "results.json").read_text())["rows"] == first
    assert main(_args(tmp_path, tiny_backbone_dir, "c", *common[:-1], "distill.t2=0.5",
                      f"distill.cache_from={tmp_path / 'a'}")) == 0
    header = json.loads((tmp_path / "c" / "round1-cache-llm" / "header.json").read_text())
    assert header["temperature"] == 0.5


def test_reused_baselines_report_their_recorded_metrics_unless_scored_otherwise(tmp_path, tiny_backbone_dir):
    """A given crm_run / llm_run under the same data, model and eval settings reports the metrics its run recorded
    (not scored again); under other eval settings it is scored here, by the same evaluator as any model."""
    common = ["data.synthetic_users=150", "data.synthetic_items=60", "device=cpu", f"run_dir={tmp_path}"]
    assert main(["train-crm", "--config", "configs/llmd4rec/synthetic.yaml", "crm_train.epochs=2",
                 "run_name=crm", *common]) == 0
    assert main(["train-llm", "--config", "configs/llmd4rec/synthetic.yaml", f"llm.backbone={tiny_backbone_dir}",
                 "llm.keep_layers=null", "llm_train.epochs=1", "llm_train.samples_per_batch=32",
                 f"crm_run={tmp_path / 'crm'}", "run_name=llm", *common]) == 0
    given = [f"crm_run={tmp_path / 'crm'}", f"llm_run={tmp_path / 'llm'}", "distill.direction=upward",
             "data.synthetic_users=150", "data.synthetic_items=60"]
    recorded = {}
    for k in ("crm", "llm"):  # marked, so that reading it back and scoring again give different numbers
        path = tmp_path / k / "results.json"
        recorded[k] = json.loads(path.read_text())
        recorded[k]["valid"]["NDCG@10"] += 1.0
        path.write_text(json.dumps(recorded[k]))
    # SASRec's dropout shapes its training only: its recorded metrics still hold
    for name, extra in (("same", []), ("crm_dropout", ["crm.dropout=0.1"]), ("other_eval", ["eval.ks=[10,15]"])):
        assert main(_args(tmp_path, tiny_backbone_dir, name, *given, *extra)) == 0
        base = json.loads((tmp_path / name / "results.json").read_text())["history"][0]
        for row, kind in (("crm", "crm"), ("llm", "llm")):
            if name != "other_eval":
                assert base[row] == {w: recorded[kind][w] for w in ("valid", "test")}
            else:
                loaded = load_run(tmp_path / kind)
                assert set(base[row]["test"]) == {f"{m}@{k}" for m in ("HR", "NDCG", "MRR") for k in (10, 15)}
                assert base[row]["test"]["NDCG@10"] == pytest.approx(
                    evaluate_split(loaded.model, loaded.split, loaded.cfg.eval, "test")["NDCG@10"])
