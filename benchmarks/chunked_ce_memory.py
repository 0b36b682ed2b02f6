"""Peak memory of one forward + backward of the CRM loss: full softmax CE (`ce`) against `ce_chunked`.

The loss sees every position of a batch (batch x length rows of hidden states, all valid) and the item table; only
its own memory is measured, each case in a fresh subprocess so that one out-of-memory kill loses only that case:
on CPU the peak RSS (ru_maxrss) above the RSS with the inputs in place, on a GPU torch.cuda.max_memory_allocated
above the inputs. A full CE whose estimated peak (4 x positions x items float32: logits, log-softmax and two
gradients, as measured at small sizes) exceeds 80% of the available memory is skipped and recorded as such.

Example: python benchmarks/chunked_ce_memory.py --items 50000 100000 1000000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, write_result  # noqa: E402

from llmd4rec.config import CRMTrainConfig  # noqa: E402
from llmd4rec.training.crm import rec_loss  # noqa: E402


def available_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def current_rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def measure(loss: str, items: int, positions: int, dim: int, chunk: int, device: str) -> dict:
    """One case, in this process: peak bytes above the inputs, seconds, the loss value."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(positions, dim, generator=g).to(device).requires_grad_()
    w = (0.1 * torch.randn(items + 1, dim, generator=g)).to(device).requires_grad_()
    targets = torch.randint(1, items + 1, (positions,), generator=g).to(device)
    model = types.SimpleNamespace(output_weight=w, n_items=items)
    cfg = CRMTrainConfig(loss=loss, item_chunk=chunk)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = current_rss_bytes()
    t0 = time.perf_counter()
    value, _ = rec_loss(model, h, targets, cfg, g)
    value.backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"peak_bytes": peak, "peak_gib": peak / 2**30, "seconds": time.perf_counter() - t0,
            "loss_value": float(value)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, nargs="+", default=[50_000, 100_000, 1_000_000])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--length", type=int, default=50)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--chunks", type=int, nargs="+", default=[CRMTrainConfig().item_chunk, 8192],
                   help="item_chunk values to measure ce_chunked with")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default="chunked_ce_memory", help="result file benchmarks/results/NAME.json")
    p.add_argument("--one", nargs=3, metavar=("LOSS", "ITEMS", "CHUNK"), help=argparse.SUPPRESS)  # one case (child)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    positions = args.batch * args.length
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), positions, args.dim, int(args.one[2]), device)))
        return
    rows = []
    for items in args.items:
        for loss, chunk in [("ce", 0)] + [("ce_chunked", c) for c in args.chunks]:
            row = {"loss": loss, "items": items, "positions": positions, "dim": args.dim,
                   "item_chunk": chunk if loss == "ce_chunked" else None}
            estimate = 4 * positions * (items + 1) * 4
            if loss == "ce" and estimate > 0.8 * available_bytes(device):
                row["skipped"] = (f"full CE needs about {estimate / 2**30:.1f} GiB (4 x positions x items float32), "
                                  f"{available_bytes(device) / 2**30:.1f} GiB available")
            else:
                cmd = [sys.executable, __file__, "--one", loss, str(items), str(chunk), "--batch", str(args.batch),
                       "--length", str(args.length), "--dim", str(args.dim), "--threads", str(args.threads)]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode == 0:
                    row.update(json.loads(done.stdout.strip().splitlines()[-1]))
                else:
                    row["failed"] = f"exit code {done.returncode}: {done.stderr.strip()[-300:]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = header({"batch": args.batch, "length": args.length, "positions": positions, "dim": args.dim,
                  "item_chunks": args.chunks, "threads": args.threads, "device": device,
                  "measure": "torch.cuda.max_memory_allocated above the inputs" if device == "cuda"
                  else "peak RSS (ru_maxrss) above the RSS with the inputs in place, fresh subprocess per row"})
    out["rows"] = rows
    write_result(args.name, out)


if __name__ == "__main__":
    main()
