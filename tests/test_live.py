"""Live updates: durable idempotent events, ranking from stored histories, incremental updates behind a validation
gate, and model swaps that no request notices."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from llmd4rec import cli, versions  # noqa: E402
from llmd4rec.config import load_config  # noqa: E402
from llmd4rec.distributed import free_port  # noqa: E402
from llmd4rec.events import Event, SQLiteEventStore  # noqa: E402
from llmd4rec.export import export_bundle  # noqa: E402
from llmd4rec.growth import grow_rows, grow_sasrec, related_by_history, related_by_title  # noqa: E402
from llmd4rec.live import create_live_app  # noqa: E402
from llmd4rec.serve import Query, Recommender, load_bundle  # noqa: E402
from llmd4rec.testing import wait_until_healthy  # noqa: E402
from llmd4rec.update import teacher_hook  # noqa: E402

N_ITEMS, MAX_LEN = 60, 12
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A tiny SASRec trained for one epoch on the synthetic data, exported as a plain bundle."""
    from llmd4rec.recipes import train_crm

    root = tmp_path_factory.mktemp("live")
    cfg = load_config(None, ["data.name=synthetic", "data.synthetic_users=200", f"data.synthetic_items={N_ITEMS}",
                             "crm_train.epochs=1", "crm.hidden=16", f"crm.max_len={MAX_LEN}",
                             "device=cpu", f"run_dir={root}", "run_name=sasrec"])
    return export_bundle(train_crm.run(cfg), root / "bundle")


@pytest.fixture
def root(bundle, tmp_path) -> Path:
    """A versioned folder whose version 1 is the bundle."""
    shutil.copytree(bundle, tmp_path / "root" / "versions" / "1")
    versions.set_current(tmp_path / "root", "1")
    return tmp_path / "root"


def stream(users: int = 40, new_items: int = 5) -> list[Event]:
    """The histories of `users` synthetic users (the catalogue and topics the bundle was trained on), every 7th
    event replaced by one of `new_items` unknown items (n61, n62, ...) with a title."""
    from llmd4rec.data.synthetic import generate

    out = []
    for u, seq in enumerate(generate(users, N_ITEMS, seed=0).sequences):
        for p, i in enumerate(seq):
            n = len(out)
            item = f"n{N_ITEMS + 1 + n % new_items}" if new_items and n % 7 == 6 else str(i)
            title = f"Amber Anchor Kitchen {item}" if item[0] == "n" else None
            out.append(Event(f"ev{n}", f"u{u}", item, 1000.0 + p, title))
    return out


def test_store_is_idempotent_and_ordered(tmp_path):
    store = SQLiteEventStore(tmp_path / "ev.db")
    first = [Event("a", "u1", "5", 3.0), Event("b", "u1", "7", 1.0), Event("a", "u1", "9", 2.0),
             Event("c", "u2", "new", 5.0, "A New Thing")]
    assert store.append(first) == [True, True, False, True]  # "a" twice in one call: the second is ignored
    assert store.append([Event("b", "u9", "1", 0.0), Event("d", "u1", "5", 2.0)]) == [False, True]
    assert store.max_seq() == 4
    assert store.history("u1") == ["7", "5", "5"]  # by timestamp: b (1.0), d (2.0), a (3.0)
    assert store.history("u1", upto=2) == ["7", "5"]
    assert store.history("u9") is None  # the duplicate did not create its user
    assert store.items() == [("5", None), ("7", None), ("new", "A New Thing")]
    assert store.changed_histories(3, 4) == {"u1": ["7", "5", "5"]}
    assert store.counts_since(1, 4) == {"7": 1, "new": 1, "5": 1}
    store.close()
    reopened = SQLiteEventStore(tmp_path / "ev.db")
    assert reopened.max_seq() == 4 and reopened.history("u2") == ["new"]
    assert reopened.stored(["a", "zz", "d"]) == {"a", "d"}
    reopened.close()


def test_growth_initialises_new_items_from_their_neighbours():
    w = torch.arange(12, dtype=torch.float32).view(6, 2)  # padding + items 1..5
    histories = [[1, 6, 2], [3, 4, 5, 1, 7], [6, 2]]
    assert related_by_history(histories, 5, 10) == {6: [2, 1], 7: [1, 4, 5]}  # 2 is next to 6 twice
    assert related_by_history(histories, 5, 2) == {6: [2, 1], 7: [1, 4]}
    grown = grow_rows(w, 8, {6: [2, 1], 7: [1, 4, 5]})
    assert torch.equal(grown[:6], w)
    assert grown[6].tolist() == [3.0, 4.0]  # mean of rows 2 and 1
    assert grown[7].tolist() == pytest.approx([20 / 3, 23 / 3])  # mean of rows 4, 5, 1
    assert grown[8].tolist() == [6.0, 7.0]  # no neighbour: mean of items 1..5
    titles = [None, "Red Kettle", "Blue Kettle", "Red Lamp", None, "Garden Kettle"]
    # idf: "red" (2 of 5 titles) weighs log(5/2), "kettle" (3 of 5) log(5/3)
    assert related_by_title({6: "Red Kettle Deluxe", 7: "Unrelated"}, titles, 10) == {6: [1, 3, 2, 5]}
    assert related_by_title({6: "red kettle"}, titles, 2) == {6: [1, 3]}


def test_teacher_term_vanishes_for_the_teacher_itself(bundle):
    """The grown model with no new item is the teacher: the KL it adds is 0 at every cell."""
    old = load_bundle(bundle)
    cfg = load_config(bundle / "config.yaml")
    same = grow_sasrec(old.model, cfg.crm, N_ITEMS, {}).eval()
    train = [[1, 2, 3, 4], [5, 6, 7], [8, 9]]
    from llmd4rec.data.dataset import all_positions

    x, y = all_positions(train, MAX_LEN)
    users, cols = (y > 0).nonzero(as_tuple=True)
    logits = same.hidden(x)[users, cols] @ same.output_weight.T
    kd = teacher_hook(old.model, train, cfg)
    assert kd(users, cols, logits, y[y > 0]).item() == pytest.approx(0.0, abs=1e-6)
    assert kd(users, cols, torch.randn_like(logits), y[y > 0]).item() > 0.01


def test_events_and_user_recommendations(root, tmp_path):
    app = create_live_app(root, tmp_path / "ev.db", watch_interval=0)
    with TestClient(app) as client:
        r = client.post("/events", json={"id": "1", "user": "alice", "item": "3", "timestamp": 1.0})
        assert r.status_code == 200 and r.json() == {"stored": 1, "duplicates": 0}
        batch = [{"id": "2", "user": "alice", "item": "8", "timestamp": 2.0},
                 {"id": "1", "user": "alice", "item": "9", "timestamp": 3.0},
                 {"id": "3", "user": "alice", "item": "brand-new", "title": "Shiny", "timestamp": 4.0},
                 {"id": 4, "user": 7, "item": 5}]
        assert client.post("/events", json={"events": batch}).json() == {"stored": 3, "duplicates": 1}
        r = client.get("/users/alice/recommendations", params={"k": 5})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["history_length"] == 3 and body["bundle_version"] == "1"
        rec = Recommender(load_bundle(root / "versions" / "1"))
        expected = rec.recommend([Query([3, 8], 5, True)])[0]  # the unknown item is left out of the input
        assert [i["item"] for i in body["items"]] == [i["item"] for i in expected["items"]]
        assert {"3", "8"}.isdisjoint(i["item"] for i in body["items"])
        assert client.get("/users/7/recommendations").status_code == 200  # a user created by a numeric id
        assert client.get("/users/bob/recommendations").status_code == 404
        assert client.get("/users/alice/recommendations", params={"k": 0}).status_code == 422
        for bad in ({"user": "a", "item": "1"}, {"id": "x", "user": "a", "item": "1", "colour": "red"},
                    {"id": "x", "user": "a", "item": "1", "timestamp": "soon"}, {"events": []}):
            r = client.post("/events", json=bad)
            assert r.status_code == 422 and "\n" not in r.json()["detail"], (bad, r.text)
        assert client.post("/events", content=b"{not json").status_code == 400
        assert client.post("/admin/reload").status_code == 404  # no admin token configured
    store = SQLiteEventStore(tmp_path / "ev.db")
    assert store.history("alice") == ["3", "8", "brand-new"] and store.items()[-1] == ("5", None)
    store.close()


def test_update_grows_the_catalogue_and_becomes_current(root, tmp_path, capsys):
    db = tmp_path / "ev.db"
    store = SQLiteEventStore(db)
    events = stream()
    store.append(events)
    store.close()
    assert cli.main(["update", str(root), "--events", str(db), "update.epochs=2"]) == 0
    assert versions.current_version(root) == "2"
    info = json.loads((root / "versions" / "2" / "bundle.json").read_text())
    new = load_bundle(root / "versions" / "2")
    assert info["watermark"] == len(events) and info["n_items"] == N_ITEMS + 5 and info["update"]["users"] == 40
    assert new.ids[:N_ITEMS + 1] == load_bundle(root / "versions" / "1").ids  # old ids keep their meaning
    assert sorted(new.ids[N_ITEMS + 1:]) == [f"n{i}" for i in range(N_ITEMS + 1, N_ITEMS + 6)]
    counts = torch.bincount(torch.tensor([new.ids.index(e.item) for e in events]), minlength=N_ITEMS + 6)
    old_counts = load_bundle(root / "versions" / "1").popularity
    assert torch.equal(new.popularity, torch.cat([old_counts, torch.zeros(5)]) + counts.float())
    assert "held-out NDCG@10" in capsys.readouterr().out
    # nothing new since the watermark: refused in one line, exit 2, the current version stays
    assert cli.main(["update", str(root), "--events", str(db)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"no events after the bundle's watermark {len(events)};" in err
    assert versions.current_version(root) == "2"


def test_worse_update_is_refused_and_the_old_bundle_keeps_serving(root, tmp_path, capsys, monkeypatch):
    db = tmp_path / "ev.db"
    app = create_live_app(root, db, watch_interval=0.05)
    with TestClient(app) as client:
        events = [{"id": e.id, "user": e.user, "item": e.item, "timestamp": e.ts} for e in stream(new_items=0)]
        assert client.post("/events", json={"events": events}).json()["stored"] == len(events)
        served = app.state.slot.current

        def ruin(model, *args, **kwargs):  # training that destroys the model: random weights
            with torch.no_grad():
                for p in model.parameters():
                    p.normal_(0, 1, generator=torch.Generator().manual_seed(0))

        monkeypatch.setattr("llmd4rec.training.crm.fit_crm", ruin)
        assert cli.main(["update", str(root), "--events", str(db)]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "update refused: held-out NDCG@10" in err
        assert not (root / "versions" / "2").exists() and versions.current_version(root) == "1"
        time.sleep(0.3)  # several watcher polls
        assert app.state.slot.current is served
        assert client.get("/users/u1/recommendations").json()["bundle_version"] == "1"


def start_server(args: list[str], port: int, env: dict | None = None) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "llmd4rec", "serve", *args, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    if wait_until_healthy(proc, port):
        return proc
    if proc.poll() is not None:
        pytest.fail(f"server exited: {proc.stderr.read()[-2000:]}")
    proc.kill()
    pytest.fail("server did not start")


def test_acknowledged_events_survive_sigkill_mid_batch(root, tmp_path):
    db, port = tmp_path / "ev.db", free_port()
    proc = start_server([str(root), "--events", str(db)], port)
    acked: list[str] = []
    stop = threading.Event()

    def client(c: int) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as h:
            for b in range(200):  # bounded; the kill ends it much sooner
                ids = [f"c{c}-b{b}-{j}" for j in range(50)]
                try:
                    r = h.post("/events", json={"events": [{"id": i, "user": f"u{c}", "item": str(1 + j % N_ITEMS)}
                                                           for j, i in enumerate(ids)]})
                except httpx.TransportError:
                    return
                if r.status_code == 200:
                    acked.extend(ids)
                if stop.is_set():
                    return

    threads = [threading.Thread(target=client, args=(c,)) for c in range(4)]
    for t in threads:
        t.start()
    for _ in range(200):
        if len(acked) >= 400:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # with requests in flight: clients are posting in a loop
    stop.set()
    for t in threads:
        t.join(30)
    proc.wait(10)
    proc.stderr.close()
    assert len(acked) >= 400
    store = SQLiteEventStore(db)
    assert store.stored(acked) == set(acked)
    assert store.max_seq() % 50 == 0  # whole batches or nothing: a batch is one transaction
    store.close()


def test_swap_under_load_drops_no_request(root, tmp_path):
    """Clients hammer the server while `current` flips between two versions and the admin endpoint reloads."""
    db = tmp_path / "ev.db"
    store = SQLiteEventStore(db)
    store.append(stream())
    store.close()
    assert cli.main(["update", str(root), "--events", str(db), "update.epochs=1", "update.min_gain=-1"]) == 0
    port = free_port()
    proc = start_server([str(root), "--events", str(db), "--watch-interval", "0.05"], port,
                        {"LLMD4REC_ADMIN_TOKEN": TOKEN})
    codes: list[int] = []
    seen_versions: set[str] = set()
    done = threading.Event()

    def client(c: int) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as h:
            for n in range(400):
                if n % 2:
                    r = h.get(f"/users/u{(c * 7 + n) % 40}/recommendations", params={"k": 10})
                    if r.status_code == 200:
                        seen_versions.add(r.json()["bundle_version"])
                else:
                    r = h.post("/recommend", json={"history": ["1", "2", str(1 + n % N_ITEMS)], "k": 5})
                codes.append(r.status_code)
                if done.is_set() and n > 50:
                    return

    threads = [threading.Thread(target=client, args=(c,)) for c in range(4)]
    try:
        for t in threads:
            t.start()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as admin:
            headers = {"authorization": f"Bearer {TOKEN}"}
            assert admin.post("/admin/reload", headers={"authorization": "Bearer wrong"}).status_code == 401
            for flip in range(6):
                if flip % 2:
                    r = admin.post("/admin/reload", headers=headers, params={"version": "1" if flip % 4 == 1 else "2"})
                    assert r.status_code == 200, r.text
                else:
                    versions.set_current(root, "2" if flip % 4 == 0 else "1")
                time.sleep(0.3)
        done.set()
        for t in threads:
            t.join(120)
    finally:
        proc.terminate()
        proc.wait(30)
        proc.stderr.close()
    assert codes and set(codes) == {200}
    assert seen_versions == {"1", "2"}
