"""The HTTP server: the served top-K is the trained model's ranking, and no client input gets a 5xx."""

import asyncio
import json
import socket
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from _serve_helpers import MAX_LEN, N_ITEMS, assert_same, post, reference  # noqa: E402
from llmd4rec import cli  # noqa: E402
from llmd4rec.data.dataset import pad_left  # noqa: E402
from llmd4rec.distributed import free_port  # noqa: E402
from llmd4rec.errors import InputError  # noqa: E402
from llmd4rec.models.sasrec import SASRec  # noqa: E402
from llmd4rec.serve import create_app  # noqa: E402


def test_topk_matches_model(served_client, served_run):
    long = served_run.split.test_inputs[0] * 5  # longer than max_len: the latest items are used
    assert len(long) > MAX_LEN
    for h in [served_run.split.test_inputs[1], served_run.split.test_inputs[2][:1], long]:
        for k, exclude in [(10, True), (3, False), (N_ITEMS, True)]:
            r = post(served_client, "/recommend", {"history": [served_run.dataset.item_ids[i] for i in h], "k": k,
                                            "exclude_seen": exclude})
            assert r.status_code == 200, r.text
            n_unseen = N_ITEMS - len(set(h)) if exclude else N_ITEMS
            ids, scores = reference(served_run.model, [h], k, exclude)[0]
            assert_same(r.json(), (ids[:n_unseen], scores[:n_unseen]), served_run)  # masked items are never listed
            assert r.json()["source"] == "model"
            assert all(x["title"] == served_run.dataset.titles[int(x["item"])] for x in r.json()["items"])


def test_integer_ids_and_defaults(served_client, served_run):
    h = served_run.split.test_inputs[3]
    r = post(served_client, "/recommend", {"history": [int(served_run.dataset.item_ids[i]) for i in h]})
    assert r.status_code == 200
    assert_same(r.json(), reference(served_run.model, [h], 10, True)[0], served_run)


def test_long_history_keeps_latest(served_client, served_run):
    h = served_run.split.test_inputs[0] * 5
    ids = [served_run.dataset.item_ids[i] for i in h]
    full = post(served_client, "/recommend", {"history": ids, "exclude_seen": False}).json()
    latest = post(served_client, "/recommend", {"history": ids[-MAX_LEN:], "exclude_seen": False}).json()
    assert full == latest


def test_batch_is_one_pass(served_client, served_run, monkeypatch):
    hs = [served_run.split.test_inputs[i] for i in range(5)]
    ks, excl = [5, 1, 10, 7, 3], [True, False, True, True, False]
    calls = []
    original = SASRec.score_all
    monkeypatch.setattr(SASRec, "score_all", lambda self, x: calls.append(x.shape) or original(self, x))
    ids = served_run.dataset.item_ids
    r = post(served_client, "/recommend/batch", {"requests": [
        {"history": [ids[i] for i in h], "k": k, "exclude_seen": e} for h, k, e in zip(hs, ks, excl)]})
    assert r.status_code == 200, r.text
    assert calls == [(5, MAX_LEN)]
    monkeypatch.undo()
    with torch.no_grad():
        scores = served_run.model.score_all(pad_left(hs, MAX_LEN))
    scores[:, 0] = float("-inf")
    for r_, (h, k, e, answer) in enumerate(zip(hs, ks, excl, r.json()["results"])):
        if e:
            scores[r_, h] = float("-inf")
        top = torch.topk(scores[r_], k)
        assert_same(answer, (top.indices.tolist(), top.values.tolist()), served_run)


def test_concurrent_requests_share_a_pass(served_bundle, served_run, monkeypatch):
    """Requests that arrive together are scored in one pass; each still gets its own history's ranking."""
    app = create_app(served_bundle)
    calls = []
    original = SASRec.score_all
    monkeypatch.setattr(SASRec, "score_all", lambda self, x: calls.append(len(x)) or original(self, x))
    hs = [served_run.split.test_inputs[i] for i in range(6)]

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            ids = served_run.dataset.item_ids
            return await asyncio.gather(*(c.post("/recommend", json={"history": [ids[i] for i in h], "k": 5})
                                          for h in hs))

    answers = asyncio.run(go())
    assert sum(calls) == len(hs) and len(calls) < len(hs)
    monkeypatch.undo()
    for h, answer in zip(hs, answers):
        ids, scores = reference(served_run.model, [h], 5, True)[0]
        assert [r["item"] for r in answer.json()["items"]] == [served_run.dataset.item_ids[i] for i in ids]
        assert [r["score"] for r in answer.json()["items"]] == pytest.approx(scores, abs=1e-4)


@pytest.mark.parametrize("body, fragment", [
    ({"history": ["1", "nope", "99999"]}, "unknown item ids: 'nope', '99999'"),
    ({"history": ["\ud800"]}, "unknown item ids: '\\ud800'"),  # a lone surrogate must not break the reply
    ({"history": []}, "history is empty"),
    ({"history": ["1"], "k": 0}, "k must be an integer between 1 and 60"),
    ({"history": ["1"], "k": N_ITEMS + 1}, "k must be"),
    ({"history": ["1"], "k": "3"}, "k must be"),
    ({"history": ["1"], "k": True}, "k must be"),
    ({"history": ["1"], "k": 2.0}, "k must be"),
    ({"history": ["1"], "exclude_seen": "yes"}, "exclude_seen must be"),
    ({"history": "1,2"}, "history must be a list"),
    ({"history": [1.5]}, "history[0] must be an item id"),
    ({"history": [True]}, "history[0] must be an item id"),
    ({"history": [["1"]]}, "history[0] must be an item id"),
    ({"k": 3}, "missing field 'history'"),
    ({"history": ["1"], "topk": 3}, "unknown field(s) 'topk'"),
    ([1, 2, 3], "must be a JSON object"),
    (None, "must be a JSON object"),
])
def test_bad_requests_are_422(served_client, body, fragment):
    r = post(served_client, "/recommend", body)
    assert r.status_code == 422
    assert fragment in r.json()["detail"]


def test_unknown_ids_are_all_named(served_client):
    r = post(served_client, "/recommend", {"history": [f"x{i}" for i in range(25)]})
    assert r.status_code == 422 and "'x19'" in r.json()["detail"] and "(+5 more)" in r.json()["detail"]


@pytest.mark.parametrize("body, fragment", [
    ({"requests": []}, "1 to 256 requests"),
    ({"requests": [{"history": ["1"]}] * 257}, "1 to 256 requests"),
    ({"requests": [{"history": ["1"]}, {"history": ["zz"]}]}, "requests[1]: unknown item ids: 'zz'"),
    ({"history": ["1"]}, '{"requests": [request, ...]}'),
    ({"requests": {"history": ["1"]}}, '{"requests": [request, ...]}'),
])
def test_bad_batches_are_422(served_client, body, fragment):
    r = post(served_client, "/recommend/batch", body)
    assert r.status_code == 422
    assert fragment in r.json()["detail"]


def test_fewer_unseen_items_than_k(served_client, served_run):
    r = post(served_client, "/recommend", {"history": [str(i) for i in range(1, N_ITEMS - 1)], "k": 5})
    assert r.status_code == 200
    assert sorted(x["item"] for x in r.json()["items"]) == [str(N_ITEMS - 1), str(N_ITEMS)]


def test_popularity_fallback(served_bundle, served_run):
    served_client = TestClient(create_app(served_bundle, empty_history="popular"))
    counts = torch.zeros(N_ITEMS + 1)
    for seq in served_run.dataset.sequences:
        for i in seq:
            counts[i] += 1
    share = counts / counts.sum()
    counts[0] = float("-inf")
    top = torch.topk(counts, 4)
    r = post(served_client, "/recommend", {"history": [], "k": 4})
    assert r.status_code == 200 and r.json()["source"] == "popular"
    assert [x["item"] for x in r.json()["items"]] == [served_run.dataset.item_ids[i] for i in top.indices.tolist()]
    # scores are each item's share of all interactions, not raw counts
    assert [x["score"] for x in r.json()["items"]] == pytest.approx(share[top.indices].tolist())
    batch = post(served_client, "/recommend/batch",
                 {"requests": [{"history": []}, {"history": ["1"]}]}).json()["results"]
    assert [b["source"] for b in batch] == ["popular", "model"]
    assert served_client.get("/info").json()["empty_history"] == "popular"
    with pytest.raises(InputError, match="empty_history must be one of"):
        create_app(served_bundle, empty_history="random")


def test_malformed_json_is_400(served_client):
    for raw in [b"{", b"not json", b"\xff\xfe\x00", b"[" * 100_000, b""]:
        r = served_client.post("/recommend", content=raw)
        assert r.status_code == 400, raw[:10]
        assert r.json()["detail"] == "request body is not valid JSON"


def test_body_limit_is_413(served_bundle):
    served_client = TestClient(create_app(served_bundle, max_body_bytes=1000))
    big = json.dumps({"history": ["1"] * 400}).encode()
    assert served_client.post("/recommend", content=big).status_code == 413
    chunked = served_client.post("/recommend", content=iter([big[:600], big[600:]]))  # no content length
    assert chunked.status_code == 413
    assert served_client.post("/recommend", content=json.dumps({"history": ["1"] * 100})).status_code == 200


def test_default_body_limit_is_1mib(served_client):
    assert served_client.post("/recommend", content=b" " * (1 << 20 | 1)).status_code == 413


def test_health_info_and_routes(served_client):
    assert served_client.get("/health").json() == {"status": "ok"}
    info = served_client.get("/info").json()
    assert info["kind"] == "crm" and info["dataset"] == "synthetic" and info["n_items"] == N_ITEMS
    assert info["max_len"] == MAX_LEN and info["version"] and info["empty_history"] == "error"
    assert served_client.get("/recommend").status_code == 405
    assert served_client.get("/nothing").status_code == 404


def test_openapi_documents_the_request_bodies(served_client):
    paths = served_client.get("/openapi.json").json()["paths"]
    one = paths["/recommend"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert one["required"] == ["history"] and set(one["properties"]) == {"history", "k", "exclude_seen"}
    assert one["additionalProperties"] is False
    batch = paths["/recommend/batch"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert batch["properties"]["requests"]["items"] == one and batch["properties"]["requests"]["maxItems"] == 256


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=25)
near_valid = st.fixed_dictionaries(
    {"history": st.lists(st.integers(-2, N_ITEMS + 2) | st.text(max_size=3) | json_values, max_size=70)},
    optional={"k": st.integers(-3, N_ITEMS + 3) | json_values, "exclude_seen": json_values, "x": json_values})


@settings(max_examples=150, deadline=None)
@given(body=json_values | near_valid | st.fixed_dictionaries({"requests": st.lists(near_valid | json_values,
                                                                                     max_size=4)}))
def test_fuzz_json_never_5xx(served_client, body):
    for path in ("/recommend", "/recommend/batch"):
        r = served_client.post(path, content=json.dumps(body))
        assert r.status_code < 500 and r.status_code in (200, 422), r.text


@settings(max_examples=100, deadline=None)
@given(raw=st.binary(max_size=200))
def test_fuzz_bytes_never_5xx(served_client, raw):
    for path in ("/recommend", "/recommend/batch"):
        assert served_client.post(path, content=raw).status_code < 500


def test_real_server_process(served_bundle, served_run):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llmd4rec", "serve", str(served_bundle), "--host", "127.0.0.1",
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not answer /health within 60 s"
            time.sleep(0.2)
        h = served_run.split.test_inputs[0]
        history = [served_run.dataset.item_ids[i] for i in h]
        r = httpx.post(f"{url}/recommend", json={"history": history, "k": 3}, timeout=10)
        assert r.status_code == 200
        assert_same(r.json(), reference(served_run.model, [h], 3, True)[0], served_run)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_non_finite_scores_are_never_served(served_client, served_run, monkeypatch):
    rec = served_client.app.state.recommender

    def nan_scores(x):
        out = torch.arange(N_ITEMS + 1, dtype=torch.float32).repeat(len(x), 1)
        out[:, N_ITEMS] = float("nan")  # would be the top item
        out[:, N_ITEMS - 1] = float("inf")
        return out

    monkeypatch.setattr(rec.model, "score_all", nan_scores)
    r = post(served_client, "/recommend", {"history": ["1"], "k": 3})
    assert r.status_code == 200 and "NaN" not in r.text and "Infinity" not in r.text
    assert [x["item"] for x in r.json()["items"]] == [str(N_ITEMS - 2), str(N_ITEMS - 3), str(N_ITEMS - 4)]


@pytest.mark.parametrize("port, needle", [(99999, "--port must be between 0 and 65535"),
                                          ("busy", "cannot listen on 127.0.0.1:")])
def test_serve_bad_port_is_one_line(served_bundle, capsys, port, needle):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        if port == "busy":
            port = s.getsockname()[1]
        assert cli.main(["serve", str(served_bundle), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err
