"""train-llm on one process and sharded (DDP, FSDP, DeepSpeed ZeRO-2 and ZeRO-3) on the same data and backbone.

Each mode is one `torchrun` launch of `llmd4rec train-llm` on the package's synthetic dataset, with a random Qwen2
of the given shape as the backbone (random weights: this measures the engines, not recommendation quality) and
a random SASRec item table. Rows hold every epoch's training loss, the validation and test metrics, the training
seconds and, on GPUs, rank 0's peak GPU memory; `agreement` gives each mode's largest relative loss difference and
largest metric difference from the one-process run. Modes that need more processes than --nproc are skipped.

On a GPU machine (one process per GPU; the default shape is Qwen2.5-0.5B's decoder with a byte-level vocabulary):
    python benchmarks/sharded_llm.py --name sharded_llm_h200
On CPU (gloo), a small shape:
    python benchmarks/sharded_llm.py --nproc 2 --hidden 64 --layers 2 --heads 4 --kv-heads 2 --intermediate 128 \
        --dtype float32 --users 200 --items 100 --name sharded_llm_cpu
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, write_result  # noqa: E402

from llmd4rec.config import load_config  # noqa: E402
from llmd4rec.io import save_tensors  # noqa: E402
from llmd4rec.models.sasrec import SASRec  # noqa: E402
from llmd4rec.testing import save_tiny_backbone  # noqa: E402

MODES = {"single": (1, []), "ddp": (0, []), "fsdp": (0, ["llm_train.fsdp=true"]),
         "zero2": (0, ["llm_train.zero_stage=2"]), "zero3": (0, ["llm_train.zero_stage=3"])}
"""mode -> (processes, 0 for --nproc; overrides)."""


def launch(nproc: int, overrides: list[str], log: Path) -> int:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "llmd4rec", "train-llm", *overrides]
    with log.open("w") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"}
                              ).returncode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="result file benchmarks/results/NAME.json")
    p.add_argument("--nproc", type=int, default=torch.cuda.device_count() or 2)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--heads", type=int, default=14)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=4864)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--items", type=int, default=500)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256, help="samples per optimizer step (global)")
    p.add_argument("--work-dir", default="runs/bench/sharded_llm")
    args = p.parse_args()

    work = Path(args.work_dir) / time.strftime("%Y%m%d-%H%M%S")
    backbone = save_tiny_backbone(work / "backbone", hidden=args.hidden, layers=args.layers, heads=args.heads,
                                  kv_heads=args.kv_heads, intermediate=args.intermediate, dtype=args.dtype)
    with safe_open(str(next(backbone.glob("*.safetensors"))), "pt") as f:
        n_params = sum(torch.Size(f.get_slice(k).get_shape()).numel() for k in f.keys())
    data = [f"data.synthetic_users={args.users}", f"data.synthetic_items={args.items}"]
    torch.manual_seed(0)
    save_tensors(work / "crm" / "crm" / "best.safetensors", SASRec(args.items, load_config(None, data).crm).state_dict())
    common = data + [f"llm.backbone={backbone}", "llm.keep_layers=null", f"llm.dtype={args.dtype}",
                     "llm.lora_dropout=0", f"llm_train.epochs={args.epochs}", "llm_train.patience=100",
                     f"llm_train.samples_per_batch={args.batch_size}", f"crm_run={work / 'crm'}", f"run_dir={work}"]
    rows: dict[str, dict] = {}
    for mode in args.modes:
        nproc, extra = MODES[mode]
        nproc = nproc or args.nproc
        if mode == "fsdp" and nproc < 2:
            rows[mode] = {"skipped": "FSDP shards over 2 or more processes"}
            continue
        run = work / mode
        t0 = time.perf_counter()
        code = launch(nproc, common + extra + [f"run_name={mode}"], work / f"{mode}.log")
        if code != 0:
            tail = (work / f"{mode}.log").read_text().strip().splitlines()[-5:]
            rows[mode] = {"failed": f"exit code {code}: " + " | ".join(tail)[-600:]}
        else:
            res = json.loads((run / "results.json").read_text())
            records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            losses = [r["loss"] for r in records if r.get("phase") == "llm" and "loss" in r]
            rows[mode] = {"processes": res["world_size"], "fsdp": res["fsdp"], "zero_stage": res["zero_stage"],
                          "losses": losses, "valid": res["valid"], "test": res["test"],
                          "train_seconds": res["train_seconds"], "wall_seconds": time.perf_counter() - t0,
                          **({"peak_gpu_memory_gib": res["peak_gpu_memory_gib"]}
                             if "peak_gpu_memory_gib" in res else {})}
        print(mode, json.dumps(rows[mode]), flush=True)

    agreement = {}
    ref = rows.get("single", {})
    for mode, row in rows.items():
        if mode != "single" and "losses" in row and "losses" in ref:
            agreement[mode] = {
                "max_rel_loss_diff": max(abs(a - b) / abs(b) for a, b in zip(row["losses"], ref["losses"])),
                "max_metric_diff": max(abs(row[w][k] - ref[w][k]) for w in ("valid", "test") for k in ref[w])}
    out = header({"backbone": {"architecture": "Qwen2 (random weights)", "hidden": args.hidden,
                               "layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads,
                               "intermediate": args.intermediate, "dtype": args.dtype, "parameters": n_params},
                  "data": {"dataset": "synthetic", "users": args.users, "items": args.items},
                  "epochs": args.epochs, "batch_size": args.batch_size, "nproc": args.nproc,
                  "device": "cuda" if torch.cuda.is_available() else "cpu"})
    out["rows"] = rows
    out["agreement"] = agreement
    write_result(args.name, out)


if __name__ == "__main__":
    main()
