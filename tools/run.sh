#!/usr/bin/env bash
# The main job: execute notebooks headless and keep the executed copies (with outputs) beside their runs.
#   bash tools/run.sh                      # 01_mnist_gan, smoke mode unless a CUDA GPU is present
#   NB="03_style_transfer 05_pix2pixhd" SMOKE=0 bash tools/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export DATA_DIR=${DATA_DIR:-$PWD/data} MPLBACKEND=Agg
export RUN_DIR=${RUN_DIR:-$PWD/runs}
if [ -z "${SMOKE:-}" ]; then
  SMOKE=$(.venv/bin/python -c "import torch; print(0 if torch.cuda.is_available() else 1)")
fi
export SMOKE
for name in ${NB:-01_mnist_gan}; do
  .venv/bin/python tools/execute.py "notebooks/$name.ipynb" "$RUN_DIR/executed/$name.ipynb"
done
