"""The command line: real-data runs, reproducible evaluation from a run folder, one-line errors with exit 2."""

import json

import pytest

from llmd4rec.cli import main


def test_data_stats_beauty(shared_data, capsys):
    assert main(["data", "stats", "--dataset", "beauty", "--data-dir", str(shared_data), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["users"], stats["items"], stats["interactions"]) == (22363, 12101, 198502)


def test_mostpop_on_beauty_end_to_end(shared_data, tmp_path, capsys):
    out = tmp_path / "mostpop.json"
    assert main(["evaluate", "--model", "mostpop", "--dataset", "beauty", "--data-dir", str(shared_data),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["exclude_seen"] is True and result["eval_mode"] == "full"
    test = result["metrics"]["test"]
    assert 0 < test["HR@10"] < 0.05 and test["NDCG@10"] <= test["HR@10"]
    assert f"{test['HR@10']:.4f}" in printed


def test_train_evaluate_and_plot_a_run(tmp_path, capsys):
    args = ["train-crm", "--config", "configs/sasrec/synthetic.yaml", "data.synthetic_users=200",
            "data.synthetic_items=50", "crm_train.epochs=2", f"run_dir={tmp_path}", "run_name=r"]
    assert main(args) == 0
    run = tmp_path / "r"
    test = json.loads((run / "results.json").read_text())["test"]
    capsys.readouterr()
    assert main(["evaluate", str(run)]) == 0
    assert f"{test['NDCG@10']:.4f}" in capsys.readouterr().out
    assert main(["plot", str(run)]) == 0
    assert (run / "curves.png").stat().st_size > 1000
    saved = (run / "config.yaml").read_text()
    assert "synthetic_users: 200" in saved and "epochs: 2" in saved
    from llmd4rec.precision import resolve
    assert f"precision: {resolve('auto', 'cpu')}" in saved  # the saved config says what ran, never "auto"


@pytest.mark.parametrize("argv, needle", [
    (["data", "stats", "--dataset", "no-such-set"], "no-such-set"),
    (["data", "stats", "--dataset", "beauty", "--data-dir", "/nonexistent"], "Beauty.txt"),
    (["train-crm", "crm_train.nope=1"], "crm_train.nope"),
    (["train-crm", "crm_train.lr=fast"], "crm_train.lr"),
    (["train-crm", "--config", "/nonexistent.yaml"], "/nonexistent.yaml"),
    (["evaluate", "/nonexistent-run"], "/nonexistent-run"),
])
def test_bad_input_is_one_line_and_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_bad_data_file_names_file_and_line(tmp_path, capsys):
    folder = tmp_path / "LastFM"
    folder.mkdir()
    (folder / "LastFM.txt").write_text("1 1 2 3\n2 4 x 6\n")
    assert main(["data", "stats", "--dataset", "lastfm", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "LastFM.txt:2" in err and err.count("\n") == 1
