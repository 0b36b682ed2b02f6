"""Shared pieces of the benchmark scripts: the result-file header (command, machine, date), the command line of
the recipe benchmarks, and writing benchmarks/results/NAME.json."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch


def header(config: dict) -> dict:
    machine = {"cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
               "processor": platform.processor() or platform.machine()}
    if torch.cuda.is_available():
        machine["gpu"] = torch.cuda.get_device_name(0)
    return {"command": " ".join(["python"] + sys.argv), "machine": machine, "config": config,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def recipe_args(doc: str) -> argparse.Namespace:
    """--config, --name, --resume and dotted overrides: the command line of train_crm.py and train_llm.py."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--name", required=True, help="result file benchmarks/results/NAME.json")
    p.add_argument("--resume", help="continue a stopped benchmark run folder")
    p.add_argument("overrides", nargs="*")
    return p.parse_args()


def write_result(name: str, out: dict) -> Path:
    path = Path(__file__).resolve().parent / "results" / f"{name}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    return path
