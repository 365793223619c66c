#!/usr/bin/env bash
# `make gpu-check`: every CUDA path of the collection on a machine with a CUDA GPU and no internet, as one
# pass/fail table (tools/gpu_check.py says what each row runs). Exits 2 with "no CUDA device" elsewhere.
#   bash tools/gpu_check.sh                 # everything, about 10 minutes on one GPU
#   bash tools/gpu_check.sh --only 04 05    # some notebooks
# PYTHON picks the interpreter (default: .venv/bin/python when it exists, else python3: a lent GPU machine
# brings its own torch). DATA_DIR must hold the offline stand-ins (tools/setup.sh builds them into data/).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3; [ -x .venv/bin/python ] && PYTHON=.venv/bin/python
fi
export DATA_DIR=${DATA_DIR:-$PWD/data}
exec "$PYTHON" tools/gpu_check.py "$@"
