"""Streaming (prequential) evaluation of live updates on a dataset with real timestamps (ml-100k).

SASRec is trained on every event before a cut time (the first --cut of the events in time order). The rest is
replayed in time order in --chunks chunks; each event is scored before any model has learnt from it (its user's
history is every earlier event, the stream's included), full ranking over the model's catalogue with the history
excluded; an item the model does not know yet is a miss, a user with no history gets the popularity ranking. After
each chunk but the last, three strategies go on:

- no_update: the first model throughout;
- incremental: the chunk is appended to the event store and `llmd4rec update` runs on the versioned bundle folder
  (a refused update keeps the previous version);
- retrain: SASRec trained from scratch on every event so far, with the first model's recipe.

Then the incremental folder is served (`llmd4rec serve ROOT --events DB`, loopback) to measure POST /events at
concurrency 8 (one event per request, and batches of 100), and GET /users/{id}/recommendations at concurrency 8 with
and without `current` flipping between two versions every --swap-every seconds.

  python benchmarks/streaming.py --data-dir ../shared/data --chunks 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header  # noqa: E402

from llmd4rec import versions  # noqa: E402
from llmd4rec.config import load_config  # noqa: E402
from llmd4rec.data.dataset import Dataset, leave_one_out  # noqa: E402
from llmd4rec.distributed import free_port  # noqa: E402
from llmd4rec.evaluation import compute_ranks, metrics_from_ranks  # noqa: E402
from llmd4rec.events import Event, SQLiteEventStore  # noqa: E402
from llmd4rec.export import write_bundle  # noqa: E402
from llmd4rec.io import atomic_write_json  # noqa: E402
from llmd4rec.models.sasrec import SASRec  # noqa: E402
from llmd4rec.serve import load_bundle  # noqa: E402
from llmd4rec.testing import wait_until_healthy  # noqa: E402
from llmd4rec.training.crm import fit_crm  # noqa: E402
from llmd4rec.update import UpdateRefused, update_bundle  # noqa: E402

KS = (10,)


def read_events(data_dir: Path) -> list[Event]:
    """ml-100k (RecBole atomic file, else GroupLens u.data) in time order; ties keep file order."""
    atomic, grouplens = data_dir / "ml-100k" / "ml-100k.inter", data_dir / "ml-100k" / "u.data"
    path = atomic if atomic.is_file() else grouplens
    lines = path.read_text().splitlines()[1 if path == atomic else 0:]
    rows = [line.split("\t") for line in lines if line.strip()]
    rows = sorted(((float(r[3]), n, r[0], r[1]) for n, r in enumerate(rows)))
    return [Event(f"e{k}", u, i, t) for k, (t, _, u, i) in enumerate(rows)]


def train_bundle(events: list[Event], out: Path, overrides: list[str], watermark: int) -> dict:
    """The first model's recipe: leave-one-out early stopping on the histories of `events`, then a bundle."""
    histories: dict[str, list[str]] = {}
    for e in events:
        histories.setdefault(e.user, []).append(e.item)
    order = list(dict.fromkeys(e.item for e in events))
    index = {item: i for i, item in enumerate(order, 1)}
    dataset = Dataset("ml-100k", [[index[i] for i in h] for h in histories.values()], len(order), ["<pad>"] + order,
                      list(histories))
    cfg = load_config(None, overrides)
    torch.manual_seed(cfg.seed)
    model = SASRec(dataset.n_items, cfg.crm)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        metrics = fit_crm(model, leave_one_out(dataset), cfg, Path(tmp))
    write_bundle(out, "crm", model, cfg, dataset, extra_info={"watermark": watermark})
    return {"seconds": time.perf_counter() - t0, "best_epoch": metrics["best_epoch"]}


def score_chunk(bundle: Path, cases: list[tuple[list[str], str]]) -> np.ndarray:
    """0-based full-ranking rank of each case's target (history excluded); unknown target: a miss."""
    b = load_bundle(bundle)
    n = b.info["n_items"]
    index = {item: i for i, item in enumerate(b.ids) if i > 0}
    ranks = np.full(len(cases), n, dtype=np.int64)
    model_rows, inputs, targets = [], [], []
    pop = b.popularity.clone()
    pop[0] = float("-inf")
    for r, (hist, target) in enumerate(cases):
        t = index.get(target)
        if t is None:
            continue
        known = [index[i] for i in hist if i in index]
        if known:
            model_rows.append(r)
            inputs.append(known)
            targets.append(t)
        else:
            ranks[r] = int((pop >= pop[t]).sum()) - 1
    if model_rows:
        ranks[model_rows] = compute_ranks(b.model, inputs, targets, n, exclude_seen=True)
    return ranks


def metrics(ranks: np.ndarray) -> dict[str, float]:
    m = metrics_from_ranks(ranks, KS)
    return {"NDCG@10": m["NDCG@10"], "HR@10": m["HR@10"], "events": int(len(ranks))}


async def load(url: str, make, n: int, concurrency: int, during=None) -> dict:
    """n requests made by make(client, k) shared by `concurrency` clients; `during()` runs alongside until they end."""
    latencies, codes, next_k = [], [], iter(range(n))
    clients = [httpx.AsyncClient(base_url=url, timeout=60) for _ in range(concurrency)]

    async def worker(c: httpx.AsyncClient) -> None:
        for k in next_k:
            t0 = time.perf_counter()
            r = await make(c, k)
            latencies.append(time.perf_counter() - t0)
            codes.append(r.status_code)

    try:
        await asyncio.gather(*(c.get("/health") for c in clients))
        t0 = time.perf_counter()
        side = asyncio.ensure_future(during()) if during else None
        await asyncio.gather(*(worker(c) for c in clients))
        wall = time.perf_counter() - t0
        if side:
            side.cancel()
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    ms = np.array(latencies) * 1000
    return {"requests": n, "errors": sum(c != 200 for c in codes), "seconds": round(wall, 3),
            "per_second": round(n / wall, 1), "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2)}


def start_live(root: Path, db: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "llmd4rec", "serve", str(root), "--events", str(db),
                             "--watch-interval", "0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if wait_until_healthy(proc, port, tries=1200):
        return proc
    proc.kill()
    raise SystemExit("the live server did not start")


def serving(root: Path, stream: list[Event], users: list[str], args: argparse.Namespace, work: Path) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    shutil.copy(work / "incremental.db", work / "serve.db")  # users with histories to rank for
    proc = start_live(root, work / "serve.db", port)
    out: dict = {}
    try:
        single = stream[:args.ingest_events]
        batches = [stream[s:s + 100] for s in range(0, len(stream) - 99, 100)][:args.ingest_batches]

        def body(prefix: str, e: Event) -> dict:
            return {"id": prefix + e.id, "user": e.user, "item": e.item, "timestamp": e.ts}

        async def one(c, k):
            return await c.post("/events", json=body("s", single[k]))

        async def many(c, k):
            return await c.post("/events", json={"events": [body("b", e) for e in batches[k]]})

        async def rec(c, k):
            return await c.get(f"/users/{users[k % len(users)]}/recommendations", params={"k": 10})

        out["ingest_single_c8"] = asyncio.run(load(url, one, len(single), 8))
        out["ingest_single_c8"]["events_per_second"] = out["ingest_single_c8"]["per_second"]
        out["ingest_batch100_c8"] = asyncio.run(load(url, many, len(batches), 8))
        out["ingest_batch100_c8"]["events_per_second"] = round(out["ingest_batch100_c8"]["per_second"] * 100, 1)
        out["recommend_c8"] = asyncio.run(load(url, rec, args.swap_requests, 8))
        names = sorted((p.name for p in (root / "versions").iterdir()), key=int)[-2:]
        swaps = [0]

        async def flip() -> None:
            while True:
                await asyncio.sleep(args.swap_every)
                versions.set_current(root, names[swaps[0] % 2])
                swaps[0] += 1

        out["recommend_c8_during_swaps"] = asyncio.run(load(url, rec, args.swap_requests, 8, flip))
        out["recommend_c8_during_swaps"].update({"swaps": swaps[0], "versions": names,
                                                 "swap_every_seconds": args.swap_every})
    finally:
        proc.terminate()
        proc.wait(30)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--cut", type=float, default=0.8, help="share of the events (in time order) trained on first")
    p.add_argument("--chunks", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ingest-events", type=int, default=2000)
    p.add_argument("--ingest-batches", type=int, default=100)
    p.add_argument("--swap-requests", type=int, default=3000)
    p.add_argument("--swap-every", type=float, default=0.5, help="seconds between flips of `current`")
    p.add_argument("--work", help="folder for bundles and event stores (default: a temporary one)")
    p.add_argument("--out", default="benchmarks/results/streaming_ml100k.json")
    p.add_argument("overrides", nargs="*", help="training config, e.g. crm_train.epochs=30 update.epochs=5")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    overrides = ["device=cpu", "crm.max_len=50", "crm.dropout=0.2", "crm_train.epochs=30", "crm_train.patience=3",
                 "crm_train.users_per_batch=32", *args.overrides]
    events = read_events(Path(args.data_dir))
    cut = int(len(events) * args.cut)
    stream = events[cut:]
    chunks = np.array_split(np.arange(len(stream)), args.chunks)
    work = Path(args.work or tempfile.mkdtemp(prefix="streaming-"))
    roots = {s: work / s for s in ("no_update", "incremental", "retrain")}
    first = train_bundle(events[:cut], roots["no_update"] / "versions" / "1", overrides, cut)
    print(f"first model: {first}", flush=True)
    for s in ("incremental", "retrain"):
        shutil.copytree(roots["no_update"] / "versions" / "1", roots[s] / "versions" / "1")
    for s in roots:
        versions.set_current(roots[s], "1")
    store = SQLiteEventStore(work / "incremental.db")
    store.append(events[:cut])
    histories: dict[str, list[str]] = {}
    for e in events[:cut]:
        histories.setdefault(e.user, []).append(e.item)
    ranks = {s: [] for s in roots}
    updates = {s: [] for s in ("incremental", "retrain")}
    for c, rows in enumerate(chunks):
        part = [stream[r] for r in rows]
        cases = []
        for e in part:
            cases.append((list(histories.get(e.user, [])), e.item))
            histories.setdefault(e.user, []).append(e.item)
        for s, root in roots.items():
            ranks[s].append(score_chunk(versions.bundle_path(root), cases))
            print(f"chunk {c + 1}: {s} {metrics(ranks[s][-1])}", flush=True)
        if c == len(chunks) - 1:
            break
        store.append(part)
        t0 = time.perf_counter()
        try:
            report = update_bundle(roots["incremental"], work / "incremental.db", None, overrides)
            updates["incremental"].append({"seconds": time.perf_counter() - t0, "accepted": True,
                                           "users": report["users"], "new_items": report["new_items"],
                                           "held_out_ndcg10": [report["held_out_before"]["NDCG@10"],
                                                               report["held_out_after"]["NDCG@10"]]})
        except UpdateRefused as e:
            updates["incremental"].append({"seconds": time.perf_counter() - t0, "accepted": False, "reason": str(e)})
        print(f"incremental update {c + 1}: {updates['incremental'][-1]}", flush=True)
        so_far = events[:cut + int(rows[-1]) + 1]
        name = versions.next_version(roots["retrain"])
        updates["retrain"].append(train_bundle(so_far, roots["retrain"] / "versions" / name, overrides, len(so_far)))
        versions.set_current(roots["retrain"], name)
        print(f"retrain {c + 1}: {updates['retrain'][-1]}", flush=True)
    store.close()
    rows_out = {}
    for s in roots:
        rows_out[s] = {"chunks": [metrics(r) for r in ranks[s]], "overall": metrics(np.concatenate(ranks[s]))}
        if s in updates:
            secs = [u["seconds"] for u in updates[s]]
            rows_out[s].update({"updates": updates[s], "seconds_per_update": float(np.mean(secs))})
    users = list(dict.fromkeys(e.user for e in events[:cut]))
    result = {**header({**vars(args), "overrides": overrides, "events": len(events), "cut_events": cut,
                        "cut_time": events[cut].ts, "stream_events": len(stream)}),
              "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
              "load_before": os.getloadavg()[0], "first_model": first, "rows": rows_out,
              "serving": serving(roots["incremental"], stream, users, args, work)}
    result["machine"]["threads"] = args.threads
    atomic_write_json(args.out, result)
    print(json.dumps({s: r["overall"] for s, r in rows_out.items()}))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
