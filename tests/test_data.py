"""Datasets: real-file stats, readers' ordering rules, the split helpers, bad input and downloads."""

from __future__ import annotations

import hashlib
import tempfile
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmd4rec.data import registry
from llmd4rec.data.dataset import Dataset, all_positions, leave_one_out, pad_left
from llmd4rec.data.readers import read_atomic, read_ml1m, read_ml100k, read_s3rec, read_table
from llmd4rec.data.registry import Source, dataset_names, load_dataset
from llmd4rec.errors import InputError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared real data not found at {SHARED}")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """No test may see the user's data folder or cache, so none can reach the network by accident."""
    monkeypatch.delenv("LLMD4REC_DATA", raising=False)
    monkeypatch.setenv("LLMD4REC_CACHE", str(tmp_path / "cache"))


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


# --- real data ------------------------------------------------------------------------------------


@needs_shared
@pytest.mark.slow
@pytest.mark.parametrize(
    "name, users, items, interactions",
    [
        ("beauty", 22363, 12101, 198502),
        ("toys", 19412, 11924, 167597),
        ("lastfm", 1090, 3646, 52551),
        ("ml-100k", 943, 1682, 100000),
    ],
)
def test_real_dataset_stats(name, users, items, interactions):
    ds = load_dataset(name, data_dir=str(SHARED))
    stats = ds.stats()
    assert (stats["users"], stats["items"], stats["interactions"]) == (users, items, interactions)
    assert ds.name == name and Path(ds.source).is_file()
    assert len(ds.item_ids) == items + 1 and len(ds.user_ids) == users


@needs_shared
def test_beauty_titles_come_from_item_text_else_asins_and_ids_are_identity():
    ds = load_dataset("beauty", data_dir=SHARED)
    assert ds.titles[1] == "OPI Nail Lacquer, Simmer and Shimmer, 0.5-Fluid Ounce" and ds.titles[0] == ""
    assert ds.titles[495] == "ASIN B001DJ2USM"  # no title in item_text.tsv: the ASIN from item_asin.tsv
    assert ds.item_ids[12101] == "12101"
    assert ds.sequences[0] == [1, 2, 3, 4, 5]


@needs_shared
def test_env_var_is_honoured(monkeypatch):
    monkeypatch.setenv("LLMD4REC_DATA", str(SHARED))
    ds = load_dataset("lastfm")
    assert ds.source == str(SHARED / "LastFM" / "LastFM.txt")


def test_env_var_points_at_hand_written_folder(monkeypatch, tmp_path):
    write(tmp_path / "data" / "LastFM" / "LastFM.txt", "1 1 2\n2 2 3 1\n")
    monkeypatch.setenv("LLMD4REC_DATA", str(tmp_path / "data"))
    ds = load_dataset("LastFM")
    assert ds.sequences == [[1, 2], [2, 3, 1]] and ds.titles is None


def test_data_dir_without_the_file_names_the_expected_path(tmp_path):
    with pytest.raises(InputError, match="Yelp/Yelp.txt"):
        load_dataset("yelp", data_dir=tmp_path)
    with pytest.raises(InputError, match="ml-100k.inter or .*u.data"):
        load_dataset("ml-100k", data_dir=tmp_path)
    assert not (tmp_path / "cache").exists()  # no silent download


def test_unknown_name_lists_known_names():
    with pytest.raises(InputError) as e:
        load_dataset("netflix")
    for name in ("beauty", "ml-1m", "synthetic", "csv:PATH"):
        assert name in str(e.value)
    assert {"beauty", "sports", "toys", "yelp", "lastfm", "ml-100k", "ml-1m", "synthetic"} == set(dataset_names())


# --- readers --------------------------------------------------------------------------------------


def test_s3rec_sparse_ids_keep_numeric_order_and_asin_titles(tmp_path):
    path = write(tmp_path / "Beauty" / "Beauty.txt", "7 30 10\n\n3 20 10 30\n")
    write(tmp_path / "Beauty" / "item_asin.tsv", "item_id\tasin\n10\tB001\n30\tB003\n")
    ds = read_s3rec(path, "beauty")
    assert ds.item_ids == ["<pad>", "10", "20", "30"]
    assert ds.user_ids == ["7", "3"]
    assert ds.sequences == [[3, 1], [2, 1, 3]]
    assert ds.titles == ["", "ASIN B001", "", "ASIN B003"]


def test_atomic_orders_by_timestamp_ties_in_file_order(tmp_path):
    header = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    rows = ["2\t5\t3\t100", "1\t9\t4\t50", "1\t3\t4\t10", "1\t7\t5\t50", "1\t4\t1\t50", "2\t3\t2\t90"]
    path = write(tmp_path / "ml-100k" / "ml-100k.inter", header + "\n".join(rows) + "\n")
    write(tmp_path / "ml-100k" / "ml-100k.item", "item_id:token\tmovie_title:token_seq\n3\tHeat\n9\tFargo\n")
    ds = read_atomic(path, "ml-100k")
    assert ds.user_ids == ["1", "2"]
    assert ds.item_ids == ["<pad>", "3", "4", "5", "7", "9"]
    original = [[ds.item_ids[i] for i in s] for s in ds.sequences]
    assert original == [["3", "9", "7", "4"], ["3", "5"]]
    assert ds.titles[1] == "Heat" and ds.titles[5] == "Fargo" and ds.titles[2] == ""
    assert load_dataset("ml-100k", data_dir=tmp_path).sequences == ds.sequences


def test_grouplens_readers(tmp_path):
    u_data = write(tmp_path / "ml-100k" / "u.data", "1\t2\t5\t20\n1\t1\t3\t10\n2\t2\t4\t5\n")
    write(tmp_path / "ml-100k" / "u.item", "1|Caf\xe9 (1995)|x\n2|Heat (1995)|y\n".encode("latin-1"))
    ds = read_ml100k(u_data, "ml-100k")
    assert ds.sequences == [[1, 2], [2]] and ds.titles == ["", "Caf\xe9 (1995)", "Heat (1995)"]
    assert load_dataset("ml-100k", data_dir=tmp_path).source == str(u_data)
    ratings = write(tmp_path / "ml-1m" / "ratings.dat", "1::20::5::9\n1::10::3::9\n")
    write(tmp_path / "ml-1m" / "movies.dat", "10::Alien (1979)::Horror\n20::Big (1988)::Comedy\n")
    ds = read_ml1m(ratings, "ml-1m")
    assert ds.sequences == [[2, 1]] and ds.item_ids == ["<pad>", "10", "20"] and ds.titles[2] == "Big (1988)"


def test_csv_first_appearance_and_stable_time_order(tmp_path):
    text = "timestamp,user_id,item_id\n5,bob,x\n3,ann,y\n1,bob,z\n5,bob,w\n2,ann,x\n"
    path = write(tmp_path / "log.csv", text)
    for name in (str(path), f"csv:{path}"):
        ds = load_dataset(name)
        assert ds.user_ids == ["bob", "ann"]
        assert [[ds.item_ids[i] for i in s] for s in ds.sequences] == [["z", "x", "w"], ["x", "y"]]
        assert ds.item_ids == ["<pad>", "z", "x", "w", "y"] and ds.source == str(path)
    tsv = write(tmp_path / "log.tsv", "user\titem\ttimestamp\nu\ta\t2024-01-02\nu\tb\t2024-01-01\n")
    assert load_dataset(f"tsv:{tsv}").sequences == [[1, 2]]
    assert [load_dataset(str(tsv)).item_ids[i] for i in [1, 2]] == ["b", "a"]


# --- split helpers --------------------------------------------------------------------------------


def _toy(sequences: list[list[int]], n_items: int) -> Dataset:
    return Dataset("toy", sequences, n_items, ["<pad>"] + [str(i) for i in range(1, n_items + 1)],
                   [str(u) for u in range(len(sequences))])


def test_leave_one_out():
    split = leave_one_out(_toy([[1, 2, 3, 4], [5, 6], [7], [2, 4, 6]], 7))
    assert split.train == [[1, 2], [5, 6], [7], [2]]
    assert split.valid_inputs == [[1, 2], [2]] and split.valid_targets == [3, 4]
    assert split.test_inputs == [[1, 2, 3], [2, 4]] and split.test_targets == [4, 6]
    for vi, vt, ti in zip(split.valid_inputs, split.valid_targets, split.test_inputs):
        assert ti == vi + [vt]  # the test input holds the validation item and everything before it
    assert split.eval_users == [0, 3] and split.n_items == 7


def test_pad_left_and_all_positions():
    assert pad_left([[1, 2, 3], [4], []], 2).tolist() == [[2, 3], [0, 4], [0, 0]]
    assert pad_left([[5], [6, 7]]).tolist() == [[0, 5], [6, 7]]
    inputs, targets = all_positions([[1, 2, 3, 4], [5], [6, 7]], 2)
    assert inputs.tolist() == [[2, 3], [0, 6]]
    assert targets.tolist() == [[3, 4], [0, 7]]


# --- bad input ------------------------------------------------------------------------------------

S3REC_BAD = [
    ("1 1 2\n2 x 3\n", 2, "not an integer"),
    ("1 1 2\n\n2 0 3\n", 3, "positive"),
    ("1 1 2\n2 -4 3\n", 2, "positive"),
    ("1 1 2\n1 3 4\n", 2, "already appeared on line 1"),
    ("1 1 2\n2\n", 2, "no items"),
    (b"1 1 2\n2 3\n3 \xff\n", 3, "undecodable"),
    ("1 1 2\n2 ".encode() + "\u0663".encode() + b"\n", 2, "not an integer"),
]


@pytest.mark.parametrize("text, line, problem", S3REC_BAD)
def test_s3rec_bad_input(tmp_path, text, line, problem):
    path = write(tmp_path / "Bad.txt", text)
    with pytest.raises(InputError, match=problem) as e:
        read_s3rec(path, "bad")
    assert f"Bad.txt:{line}:" in str(e.value) and e.value.line == line


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(InputError, match="Nope.txt: file not found"):
        read_s3rec(tmp_path / "Nope.txt", "x")
    for reader in (lambda p: read_s3rec(p, "x"), lambda p: read_table(p, "x"), lambda p: read_atomic(p, "x")):
        with pytest.raises(InputError, match="Empty.txt: .*empty"):
            reader(write(tmp_path / "Empty.txt", "\n  \n"))


@pytest.mark.parametrize(
    "text, line, problem",
    [
        ("user,item\nu,a\n", 1, "lacks a timestamp column"),
        ("user,item,timestamp\nu,a,1\nu,b\n", 3, "expected 3 columns, got 2"),
        ("user,item,timestamp\nu,a,1\nu,b,soon\n", 3, "neither a number"),
        ("user,item,timestamp\nu,a,1\n,b,2\n", 3, "empty user"),
        ("user,item,timestamp\n", None, "no interactions"),
    ],
)
def test_csv_bad_input(tmp_path, text, line, problem):
    path = write(tmp_path / "log.csv", text)
    with pytest.raises(InputError, match=problem) as e:
        read_table(path, "log")
    assert ("log.csv:" if line is None else f"log.csv:{line}:") in str(e.value)


@pytest.mark.parametrize(
    "text, line, problem",
    [
        ("user_id:token\titem_id:token\n1\t2\n", 1, "lacks a timestamp column"),
        ("user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n1\t2\n", 3, "expected 3"),
        ("user_id:token\titem_id:token\ttimestamp:float\n1\tB\t3\n", 2, "not an integer"),
        ("user_id:token\titem_id:token\ttimestamp:float\n1\t2\tnan\n", 2, "not finite"),
    ],
)
def test_atomic_bad_input(tmp_path, text, line, problem):
    path = write(tmp_path / "ml-100k.inter", text)
    with pytest.raises(InputError, match=problem) as e:
        read_atomic(path, "ml-100k")
    assert f"ml-100k.inter:{line}:" in str(e.value)


def test_grouplens_bad_column_count(tmp_path):
    path = write(tmp_path / "ratings.dat", "1::2::3::4\n1::2::3\n")
    with pytest.raises(InputError, match=r"ratings.dat:2: expected 4 '::'-separated columns, got 3"):
        read_ml1m(path, "ml-1m")


# --- downloads (file:// URLs: never the network) ----------------------------------------------------


def test_pinned_download_is_checked_and_cached(tmp_path, monkeypatch):
    origin = write(tmp_path / "origin" / "Tiny.txt", "1 1 2\n2 2 1 3\n")
    good = hashlib.sha256(origin.read_bytes()).hexdigest()
    monkeypatch.setitem(registry.DATASETS, "tiny", Source((("Tiny/Tiny.txt", read_s3rec),), origin.as_uri(), good))
    ds = load_dataset("tiny")
    cached = tmp_path / "cache" / "Tiny" / "Tiny.txt"
    assert ds.source == str(cached) and ds.n_interactions == 5
    origin.unlink()  # the second load reads the cache only
    assert load_dataset("tiny").sequences == ds.sequences
    write(cached, "1 1 2\n")
    with pytest.raises(InputError, match="Tiny.txt: sha256 mismatch"):
        load_dataset("tiny")


def test_pinned_download_with_wrong_bytes_leaves_nothing(tmp_path, monkeypatch):
    origin = write(tmp_path / "Tiny.txt", "1 1 2\n")
    monkeypatch.setitem(registry.DATASETS, "tiny", Source((("Tiny/Tiny.txt", read_s3rec),), origin.as_uri(), "0" * 64))
    with pytest.raises(InputError, match="Tiny.txt: sha256 mismatch"):
        load_dataset("tiny")
    assert list((tmp_path / "cache" / "Tiny").iterdir()) == []


def test_unpinned_archive_records_its_hash(tmp_path, monkeypatch):
    archive = tmp_path / "ml-100k.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("ml-100k/u.data", "1\t2\t5\t20\n1\t1\t3\t10\n")
        z.writestr("ml-100k/u.item", "1|One|x\n2|Two|y\n")
        z.writestr("ml-100k/README", "hi")
    source = Source((("ml-100k/ml-100k.inter", read_atomic), ("ml-100k/u.data", read_ml100k)), archive.as_uri(), archive=True)
    monkeypatch.setitem(registry.DATASETS, "ml-100k", source)
    ds = load_dataset("ml-100k")
    cache = tmp_path / "cache"
    assert ds.sequences == [[1, 2]] and ds.titles == ["", "One", "Two"]
    assert (cache / "ml-100k.zip.sha256").read_text().strip() == hashlib.sha256(archive.read_bytes()).hexdigest()
    write(cache / "ml-100k" / "u.data", "1\t2\t5\t20\n")
    with pytest.raises(InputError, match="u.data: sha256 mismatch"):
        load_dataset("ml-100k")


def test_unreadable_zip_names_the_file(tmp_path, monkeypatch):
    bogus = write(tmp_path / "ml-1m.zip", b"not a zip at all")
    monkeypatch.setitem(registry.DATASETS, "ml-1m", Source((("ml-1m/ratings.dat", read_ml1m),), bogus.as_uri(), archive=True))
    with pytest.raises(InputError, match=r"ml-1m.zip: unreadable zip"):
        load_dataset("ml-1m")


# --- synthetic ------------------------------------------------------------------------------------


def test_synthetic_is_deterministic_and_seeded():
    a = load_dataset("synthetic", synthetic_users=300, synthetic_items=120, seed=3)
    b = load_dataset("synthetic", synthetic_users=300, synthetic_items=120, seed=3)
    c = load_dataset("synthetic", synthetic_users=300, synthetic_items=120, seed=4)
    assert a.sequences == b.sequences and a.titles == b.titles
    assert a.sequences != c.sequences
    assert a.n_users == 300 and a.n_items == 120 and len(a.titles) == 121
    lengths = [len(s) for s in a.sequences]
    assert min(lengths) >= 5 and max(lengths) <= 50
    assert all(1 <= i <= 120 for s in a.sequences for i in s)
    assert len(set(a.titles[1:])) == 120 and all(len(t.split()) == 3 for t in a.titles[1:])


def test_synthetic_default_size():
    ds = load_dataset("synthetic")
    assert (ds.n_users, ds.n_items) == (2000, 500)
    with pytest.raises(InputError, match="at least"):
        load_dataset("synthetic", synthetic_items=1)


# --- fuzz -----------------------------------------------------------------------------------------

_lines = st.lists(
    st.one_of(st.text(alphabet="0123456789 -\t,\r", max_size=20), st.text(max_size=12)), max_size=8
).map(lambda ls: "\n".join(ls).encode("utf-8", "surrogatepass"))
_payload = st.one_of(st.binary(max_size=200), _lines, _lines.map(lambda b: b"user,item,timestamp\n" + b))
_fuzz = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_fuzz
@given(payload=_payload, reader=st.sampled_from(["s3rec", "csv", "tsv"]))
def test_readers_fail_only_with_input_error(payload, reader):
    with tempfile.TemporaryDirectory() as d:
        path = write(Path(d) / "f.txt", payload)
        try:
            if reader == "s3rec":
                ds = read_s3rec(path, "f")
            else:
                ds = read_table(path, "f", "," if reader == "csv" else "\t")
        except InputError as e:
            assert "f.txt" in str(e)
            return
        assert ds.n_users >= 1 and all(1 <= i <= ds.n_items for s in ds.sequences for i in s)
