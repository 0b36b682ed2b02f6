"""Serving latency: each bundle's `llmd4rec serve` process on 127.0.0.1, driven by a bounded async client.

For every concurrency level, `--requests` POST /recommend calls (real test-split histories of the bundle's
dataset, k=10, exclude_seen) are shared by that many client tasks, stopping early at `--duration-limit`
seconds; p50/p99 latency (ms) and requests/s are recorded per level. The client runs on the same machine, so
on a small one the numbers include its CPU share. A bundle is given as a folder (`--bundle NAME=PATH`) or made
here from a run folder (`--from-run NAME=RUN_DIR[:crm|llm]`, exported with `llmd4rec export` into --bundle-dir);
the result records each bundle's export command and the run it came from.

  python benchmarks/serve_latency.py --from-run beauty-sasrec=runs/all/sasrec_beauty/RUN --concurrency 1 8 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULT_HELP, builds_on, header, write_result  # noqa: E402

from llmd4rec.config import load_config  # noqa: E402
from llmd4rec.distributed import free_port  # noqa: E402
from llmd4rec.io import read_json  # noqa: E402
from llmd4rec.loading import load_data  # noqa: E402


def histories(bundle: Path, data_dir: str | None, n: int, seed: int) -> list[list[str]]:
    """n test-split histories of the bundle's dataset as original ids (its config says where the data lives)."""
    overrides = [f"data.data_dir={data_dir}"] if data_dir else []
    dataset, split = load_data(load_config(bundle / "config.yaml", overrides))
    rows = random.Random(seed).choices(split.test_inputs, k=n)
    return [[dataset.item_ids[i] for i in h] for h in rows]


def start_server(bundle: Path, port: int, timeout: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "llmd4rec", "serve", str(bundle), "--host", "127.0.0.1",
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server for {bundle} exited: {proc.stderr.read().strip()[-500:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit(f"server for {bundle} did not answer /health within {timeout:.0f} s")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def level(url: str, bodies: list[bytes], concurrency: int, time_cap: float, server_pid: int) -> dict:
    """`concurrency` tasks take bodies from one queue until it is empty or the time cap passes.

    Each task has its own client and keep-alive connection, opened before the clock starts: one shared pool costs
    the client more CPU per request as concurrency grows, and on a small machine that CPU is taken from the
    server. Server and client CPU per request are recorded, since whichever saturates first sets the requests/s.
    """
    queue = list(reversed(bodies))
    latencies: list[float] = []
    errors = 0
    headers = {"content-type": "application/json"}
    clients = [httpx.AsyncClient(base_url=url, timeout=60) for _ in range(concurrency)]
    try:
        await asyncio.gather(*(c.get("/health") for c in clients))
        start, server0, client0 = time.perf_counter(), cpu_seconds(server_pid), time.process_time()

        async def worker(client: httpx.AsyncClient) -> None:
            nonlocal errors
            while queue and time.perf_counter() - start < time_cap:
                body = queue.pop()
                t0 = time.perf_counter()
                r = await client.post("/recommend", content=body, headers=headers)
                latencies.append(time.perf_counter() - t0)
                errors += r.status_code != 200

        await asyncio.gather(*(worker(c) for c in clients))
        wall = time.perf_counter() - start
        server_cpu, client_cpu = cpu_seconds(server_pid) - server0, time.process_time() - client0
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    ms = np.array(latencies) * 1000
    n = max(len(latencies), 1)
    return {"requests": len(latencies), "errors": errors, "seconds": round(wall, 3),
            "p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "mean_ms": round(float(ms.mean()), 2), "rps": round(len(latencies) / wall, 1),
            "server_cpu_ms_per_request": round(1000 * server_cpu / n, 3),
            "client_cpu_ms_per_request": round(1000 * client_cpu / n, 3), "capped": len(latencies) < len(bodies)}


def bench_bundle(name: str, bundle: Path, args: argparse.Namespace) -> dict:
    hist = histories(bundle, args.data_dir, args.requests + args.warmup, args.seed)
    bodies = [json.dumps({"history": h, "k": args.k, "exclude_seen": True}).encode() for h in hist]
    port = free_port()
    proc = start_server(bundle, port, args.start_timeout)
    url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(level(url, bodies[:args.warmup], 1, args.duration_limit, proc.pid))
        rows = {}
        for c in args.concurrency:
            rows[f"c{c}"] = asyncio.run(level(url, bodies[args.warmup:], c, args.duration_limit, proc.pid))
            print(f"{name} c={c}: " + json.dumps(rows[f"c{c}"]), flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return rows


def export(name: str, spec: str, bundle_dir: Path) -> tuple[Path, dict]:
    """RUN_DIR[:MODEL] -> a fresh bundle under bundle_dir, through the CLI; returns it and how it was made."""
    run_dir, _, model = spec.partition(":")
    out_dir = bundle_dir / name
    cmd = [sys.executable, "-m", "llmd4rec", "export", run_dir, str(out_dir)] + (["--model", model] if model else [])
    subprocess.run(cmd, check=True)
    return out_dir, {"run": run_dir, "export_command": " ".join(["llmd4rec", *cmd[3:]])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", action="append", default=[], metavar="NAME=PATH", help="repeatable")
    p.add_argument("--from-run", action="append", default=[], metavar="NAME=RUN_DIR[:MODEL]",
                   help="repeatable: export the run's model (crm or llm) into --bundle-dir/NAME first")
    p.add_argument("--bundle-dir", default=f"runs/bench/bundles/{time.strftime('%Y%m%d-%H%M%S')}")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=1000, help="requests per concurrency level")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--duration-limit", type=float, default=30.0, help="seconds per level, at most")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--data-dir", help="where the bundles' datasets live, if not where their configs say")
    p.add_argument("--start-timeout", type=float, default=300.0, help="seconds to wait for a server's /health")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="serve_latency", help=RESULT_HELP)
    args = p.parse_args()
    if not args.bundle and not args.from_run:
        p.error("give at least one --bundle or --from-run")
    bundles, made = {}, {}
    for spec in args.bundle:
        name, sep, path = spec.partition("=")
        if not sep or not name or not (Path(path) / "bundle.json").is_file():
            p.error(f"--bundle must be NAME=PATH to a bundle folder, got {spec!r}")
        bundles[name] = Path(path)
        made[name] = {"run": None, "export_command": None}
    for spec in args.from_run:
        name, sep, run = spec.partition("=")
        if not sep or not name or not (Path(run.partition(":")[0]) / "config.yaml").is_file():
            p.error(f"--from-run must be NAME=RUN_DIR[:MODEL] with a run folder, got {spec!r}")
        bundles[name], made[name] = export(name, run, Path(args.bundle_dir))
    config = {k: v for k, v in vars(args).items() if k not in ("out", "bundle", "from_run")}
    config["bundles"] = {name: {"path": str(path), **made[name], **read_json(path / "bundle.json")}
                         for name, path in bundles.items()}
    result = header(config, builds_on(*(m["run"] for m in made.values())))
    result["rows"] = {name: bench_bundle(name, path, args) for name, path in bundles.items()}
    write_result(args.out, result)


if __name__ == "__main__":
    main()
