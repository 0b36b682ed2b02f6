"""Shared header for benchmark result files: the command, the machine and the date."""

from __future__ import annotations

import os
import platform
import sys
import time

import torch


def header(config: dict) -> dict:
    machine = {"cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
               "processor": platform.processor() or platform.machine()}
    if torch.cuda.is_available():
        machine["gpu"] = torch.cuda.get_device_name(0)
    return {"command": " ".join(["python"] + sys.argv), "machine": machine, "config": config,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
