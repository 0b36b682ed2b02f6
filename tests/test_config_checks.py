"""Config and command-line checks: every bad value is one line and exit 2 before any run folder exists; --resume
continues under the run's own config.yaml; reused runs must match the data and model shapes."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmd4rec.cli import main
from llmd4rec.config import Config, config_history, flat_keys, load_config

SMALL = ["data.synthetic_users=120", "data.synthetic_items=40", "crm.hidden=16", "crm_train.users_per_batch=32",
         "device=cpu"]


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def train_crm(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return ["train-crm", "--config", "configs/sasrec/synthetic.yaml", *SMALL, f"run_dir={tmp_path}",
            f"run_name={name}", *extra]


# ------------------------------------------------------------------------------------------ the cases

@pytest.mark.parametrize("override, needle", [
    ("eval.mode=bogus", "'eval.mode' must be one of full, sampled, got 'bogus'"),
    ("crm_train.loss=bogus", "'crm_train.loss' must be one of ce, ce_chunked, sampled_ce, bce"),
    ("distill.direction=sideways", "'distill.direction' must be one of both, upward, downward"),
    ("device=bogus", "'device' must be auto, cpu, mps, cuda or cuda:N"),
    ("eval.ks=0,-1", "'eval.ks' must be at least 1, got 0"),
    ("eval.ks=5", "'eval.ks' must include 10"),
    ("crm_train.users_per_batch=0", "'crm_train.users_per_batch' must be at least 1"),
    ("crm_train.lr=-1", "'crm_train.lr' must be greater than 0"),
    ("crm_train.lr=nan", "'crm_train.lr' must be a finite number"),
    ("crm.n_heads=3", "'crm.n_heads' must divide crm.hidden (16), got 3"),
    ("crm.dropout=2", "'crm.dropout' must be less than 1"),
    ("crm.max_len=0", "'crm.max_len' must be at least 1"),
    ("llm_train.loss=bce", "'llm_train.loss' must be one of ce, ce_chunked, got 'bce'"),
    ("llm_train.zero_stage=4", "'llm_train.zero_stage' must be one of 0, 1, 2, 3"),
    ("run_name=..", "'run_name' must be one folder name"),
    ("seed=-1", "'seed' must be at least 0"),
])
def test_bad_values_are_one_line_before_any_run_folder(tmp_path, capsys, override, needle):
    assert main(train_crm(tmp_path, "x", override)) == 2
    assert needle in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("override, needle", [
    ("crm_train.batch_size=64", "config key 'crm_train.batch_size' is now 'crm_train.users_per_batch'"),
    ("llm_train.batch_size=64", "config key 'llm_train.batch_size' is now 'llm_train.samples_per_batch'"),
    ("text.batch_size=8", "config key 'text.batch_size' is now 'text.texts_per_batch'"),
    ("data.max_len=50", "config key 'data.max_len' was removed (nothing read it"),
    ("llm_train.eval_every=2", "config key 'llm_train.eval_every' was removed"),
    ("crm_train.warmup_steps=5", "config key 'crm_train.warmup_steps' was removed"),
])
def test_a_retired_key_names_its_replacement(tmp_path, capsys, override, needle):
    assert main(train_crm(tmp_path, "x", override)) == 2
    assert needle in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "x").exists()


def test_the_config_of_a_run_from_before_the_renames_is_refused_with_the_new_keys(tmp_path):
    """A saved config.yaml names every key: one written before a rename names all its retired keys in one line."""
    from llmd4rec.config import config_to_dict
    from llmd4rec.config_rules import RETIRED
    from llmd4rec.errors import InputError

    old = config_to_dict(Config())
    old["crm_train"]["batch_size"] = old["crm_train"].pop("users_per_batch")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old, sort_keys=False))
    with pytest.raises(InputError, match="'crm_train.batch_size' is now 'crm_train.users_per_batch'"):
        load_config(path)
    old["data"]["max_len"] = 50
    path.write_text(yaml.safe_dump(old, sort_keys=False))
    with pytest.raises(InputError) as e:
        load_config(path)
    assert str(e.value) == (f"{path}: retired config keys: rename crm_train.batch_size -> crm_train.users_per_batch; "
                            "delete data.max_len")
    assert not set(RETIRED) & set(flat_keys(Config()))  # a retired name is never a live key again


def test_a_run_from_before_the_renames_still_evaluates_and_resumes(tmp_path, capsys):
    """A run's own config.yaml is read with its retired keys upgraded (one warning line), so old runs and bundles
    keep working; the old LLM batch size also sized the LLM teacher cache's batches and carries over."""
    assert main(train_crm(tmp_path, "old", "crm_train.epochs=2", "crm_train.users_per_batch=24")) == 0
    run = tmp_path / "old"
    data = yaml.safe_load((run / "config.yaml").read_text())
    data["crm_train"]["batch_size"] = data["crm_train"].pop("users_per_batch")
    data["llm_train"]["batch_size"] = data["llm_train"].pop("samples_per_batch")
    del data["distill"]["cache_users_per_batch"]
    data["data"]["max_len"] = 50
    (run / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    capsys.readouterr()

    cfg = load_config(run / "config.yaml", saved=True)
    assert cfg.crm_train.users_per_batch == 24
    assert cfg.distill.cache_users_per_batch == cfg.llm_train.samples_per_batch == data["llm_train"]["batch_size"]
    warning = capsys.readouterr().err
    assert "crm_train.batch_size -> crm_train.users_per_batch" in warning and "data.max_len dropped" in warning
    assert main(["evaluate", str(run)]) == 0
    assert main(["train-crm", "--resume", str(run), "crm_train.epochs=3"]) == 0
    assert load_config(run / "config.yaml").crm_train.users_per_batch == 24  # saved again under the new names


def test_eval_ks_of_one_value_is_a_list():
    assert load_config(None, ["eval.ks=10"]).eval.ks == [10]


def test_cuda_on_a_machine_without_it_is_one_line(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(train_crm(tmp_path, "x", "device=cuda")) == 2
    assert "device=cuda, but this machine has 0 CUDA devices" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "x").exists()


def test_train_llm_without_crm_run_is_one_line(tmp_path, capsys):
    assert main(["train-llm", *SMALL, f"run_dir={tmp_path}", "run_name=llm"]) == 2
    assert "train-llm needs crm_run=RUN_DIR" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "llm").exists()


@pytest.fixture(scope="module")
def crm_run(tmp_path_factory) -> Path:
    """A one-epoch SASRec run of the sasrec synthetic preset (2000 users, 500 items)."""
    root = tmp_path_factory.mktemp("crm")
    assert main(["train-crm", "--config", "configs/sasrec/synthetic.yaml", "data.synthetic_users=300",
                 "crm.hidden=16", "crm_train.epochs=1", "device=cpu", f"run_dir={root}", "run_name=crm"]) == 0
    return root / "crm"


def test_distill_with_a_crm_run_of_another_catalogue_is_one_line(crm_run, tmp_path, capsys):
    """The README's natural sequence: the two synthetic presets differ in catalogue size."""
    assert main(["distill", "--config", "configs/llmd4rec/synthetic.yaml", f"crm_run={crm_run}", "device=cpu",
                 f"run_dir={tmp_path}", "run_name=d"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "crm_run was trained on other data or model shapes" in line and "data.synthetic_users=300 there" in line
    assert not (tmp_path / "d").exists()


def test_evaluate_a_run_with_a_model_override_is_one_line(crm_run, capsys):
    assert main(["evaluate", str(crm_run), "crm.hidden=32"]) == 2
    assert "crm.hidden: a run folder is evaluated as it was trained" in one_error_line(capsys.readouterr().err)
    assert main(["evaluate", str(crm_run), "--model", "llm"]) == 2
    assert "a 'sasrec' run has no llm model" in one_error_line(capsys.readouterr().err)


def test_evaluate_without_arguments_is_one_line(capsys):
    assert main(["evaluate"]) == 2
    assert "give a run folder to evaluate" in one_error_line(capsys.readouterr().err)


def test_evaluate_a_run_with_eval_overrides(crm_run, capsys):
    assert main(["evaluate", str(crm_run), "eval.ks=10,50", "--data-dir", "/unused-for-synthetic"]) == 0
    out = capsys.readouterr().out
    assert "HR@50" in out and "HR@5 " not in out


def test_train_crm_writes_its_curves(crm_run):
    assert (crm_run / "curves.png").stat().st_size > 1000


# ------------------------------------------------------------------------------------------ resume

def test_resume_uses_the_runs_own_config_and_records_what_grew(tmp_path, capsys):
    assert main(train_crm(tmp_path, "r", "crm_train.epochs=1", "crm_train.patience=1")) == 0
    run = tmp_path / "r"
    # no --config and no overrides: the run's own config.yaml, not the defaults
    assert main(["train-crm", "--resume", str(run)]) == 0
    assert load_config(run / "config.yaml").crm.hidden == 16 and config_history(run / "config.yaml") == []
    capsys.readouterr()
    assert main(["train-crm", "--resume", str(run), "crm.hidden=32"]) == 2
    assert "not crm.hidden: 16 -> 32" in one_error_line(capsys.readouterr().err)
    assert main(["train-crm", "--resume", str(run), "crm_train.epochs=0"]) == 2  # invalid, before anything
    assert main(["train-crm", "--resume", str(run), "crm_train.epochs=1"]) == 0  # repeating a value is no change
    assert main(["train-crm", "--resume", str(run), "crm_train.epochs=2", "crm_train.patience=3"]) == 0
    cfg = load_config(run / "config.yaml")
    assert (cfg.crm_train.epochs, cfg.crm_train.patience) == (2, 3)
    (line,) = config_history(run / "config.yaml")
    assert line.startswith("resumed ") and "crm_train.epochs: 1 -> 2; crm_train.patience: 1 -> 3" in line
    epochs = [r["epoch"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    assert epochs == [1, 2]  # the second epoch ran after the limit grew
    capsys.readouterr()
    assert main(["train-crm", "--resume", str(run), "crm_train.epochs=1"]) == 2  # limits never shrink
    assert "crm_train.epochs: 2 -> 1" in one_error_line(capsys.readouterr().err)


# ------------------------------------------------------------------------------------------ run folders

def test_runs_started_together_get_distinct_folders(tmp_path):
    from llmd4rec.runs import make_run_dir

    cfg = load_config(None, [f"run_dir={tmp_path}", "data.name=csv:/some/where.csv"])
    paths = {make_run_dir(cfg, "sasrec") for _ in range(5)}
    assert len(paths) == 5 and all(p.parent == tmp_path and p.name.startswith("sasrec-csv_some_where.csv-")
                                   for p in paths)


def test_a_failed_start_does_not_block_its_run_name(tmp_path, capsys):
    data = tmp_path / "d.csv"
    data.write_text("user,item,timestamp\n1,a,1\n1,b,2\n")  # no user with 3 interactions
    args = ["train-crm", *SMALL, f"data.name=csv:{data}", f"run_dir={tmp_path}", "run_name=r", "crm_train.epochs=1"]
    assert main(args) == 2
    assert "no user has 3 or more interactions" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "r").exists()
    (tmp_path / "r").mkdir()  # what a start killed right after making its folder leaves
    (tmp_path / "r" / "config.yaml").write_text("seed: 1\n")
    data.write_text("user,item,timestamp\n" + "".join(f"{u},{i},{t}\n" for u in range(30) for t, i in
                                                      enumerate("abcde")) + "0,a,0\n0,a,0\n")  # (0, a, 0) is in there already: twice more
    assert main(args) == 0
    assert "note: 2 duplicate (user, item, timestamp) rows dropped, 150 interactions kept" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ property test

def _bad_values(key: str, value, rules) -> list[str]:
    """Values a key must refuse, from its declaration."""
    tp = typing.get_type_hints(_owner(key))[key.split(".")[-1]]
    out = ["{}", "[[1]]"]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        out += ["bogus-choice", "-7"]
    if tp in (int, float) or int in args or float in args or (origin is list and args[0] is int):
        out += ["abc", "nan", "inf", "1e400"] if float in (tp, *args) else ["abc", "1.5"]
    for name, delta in (("min", -1), ("gt", 0), ("max", 1), ("lt", 0)):
        if name in rules:
            out.append(str(rules[name] + delta))
    if tp is bool:
        out += ["maybe", "2"]
    if "pattern" in rules:
        out.append("" if rules["pattern"][0] == ".+" else "a/b" if "/" in rules["pattern"][0] else "bogus-device")
    return out


def _owner(key: str):
    if "." not in key:
        return Config
    return type(getattr(Config(), key.split(".")[0]))


BAD = [(k, v) for k, (value, rules) in sorted(flat_keys(Config()).items())
       for v in _bad_values(k, value, rules) if not (k in ("data.data_dir", "crm_run", "llm_run") and v == "[[1]]")]
BAD = [(k, v) for k, v in BAD if k not in ("llm.instruction", "llm.response") or v in ("{}", "[[1]]")]
COMMANDS = [["train-crm"], ["train-llm", "crm_run=/nowhere"], ["distill"], ["evaluate", "--model", "mostpop"]]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad=st.sampled_from(BAD), command=st.sampled_from(COMMANDS), seed=st.integers(0, 3))
def test_every_key_refuses_bad_values_in_every_command(tmp_path, capsys, bad, command, seed):
    key, value = bad
    argv = [*command, f"{key}={value}", f"run_dir={tmp_path}", f"run_name=p{seed}"]
    assert main(argv) == 2, argv
    line = one_error_line(capsys.readouterr().err)
    assert f"'{key}'" in line or key in line, (argv, line)
    assert not (tmp_path / f"p{seed}").exists()


def test_every_key_has_bad_values_declared():
    keys = {k for k, _ in BAD}
    assert keys == set(flat_keys(Config())), set(flat_keys(Config())) - keys


@settings(max_examples=40, deadline=None)
@given(bad=st.sampled_from(BAD))
def test_bad_values_in_a_yaml_file_name_the_file(tmp_path_factory, bad):
    from llmd4rec.errors import InputError

    key, value = bad
    section, _, leaf = key.rpartition(".")
    loaded = yaml.safe_load(value) if value not in ("nan", "inf", "") else value
    doc = {section: {leaf: loaded}} if section else {leaf: loaded}
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(InputError) as e:
        load_config(path)
    assert str(e.value).startswith(str(path))


def test_declarations_are_data_classes_all_the_way_down():
    assert all(dataclasses.is_dataclass(getattr(Config(), f.name)) or not dataclasses.is_dataclass(f.type)
               for f in dataclasses.fields(Config))


def test_report_to_tensorboard_logs_every_epoch(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main(train_crm(tmp_path, "tb", "crm_train.epochs=2", "report_to=tensorboard")) == 0
    run = tmp_path / "tb"
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    loss = [(e.step, e.value) for e in events.Scalars("crm/loss")]
    assert loss == [(r["epoch"], pytest.approx(r["loss"])) for r in records]
    assert [e.value for e in events.Scalars("crm/valid/NDCG@10")] == pytest.approx(
        [r["valid"]["NDCG@10"] for r in records])


def test_report_to_is_only_what_was_asked(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    assert main(train_crm(tmp_path, "ml", "report_to=mlflow")) == 2
    assert "report_to=mlflow needs the mlflow package" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "ml").exists()
    assert main(train_crm(tmp_path, "plain", "crm_train.epochs=1")) == 0
    assert not (tmp_path / "plain" / "tensorboard").exists()
