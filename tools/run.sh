#!/usr/bin/env bash
# The main job: set up, then execute notebooks headless in full mode and keep the executed copies.
#   bash tools/run.sh                                  # CPU: the MNIST GAN, full mode, bounded to a few minutes
#   NB="03_style_transfer 05_pix2pixhd" bash tools/run.sh   # on a GPU: the notebooks you name
#   SMOKE=1 bash tools/run.sh                          # the CI-sized run instead
# Without a GPU the GAN notebooks train CPU_GAN_EPOCHS epochs unless GAN_EPOCHS says otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export DATA_DIR=${DATA_DIR:-$PWD/data} RUN_DIR=${RUN_DIR:-$PWD/runs} MPLBACKEND=Agg SMOKE=${SMOKE:-0}
CPU_GAN_EPOCHS=100
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export GAN_EPOCHS=${GAN_EPOCHS:-$CPU_GAN_EPOCHS}
  echo "no GPU: full mode on the CPU, GAN notebooks bounded to GAN_EPOCHS=$GAN_EPOCHS epochs"
fi
for name in ${NB:-01_mnist_gan}; do
  [ -f "notebooks/$name.ipynb" ] || { echo "no notebook notebooks/$name.ipynb; NB takes names like 01_mnist_gan"; exit 2; }
  .venv/bin/python tools/execute.py "notebooks/$name.ipynb" "$RUN_DIR/executed/$name.ipynb"
  folder="$RUN_DIR/$name$([ "$SMOKE" = 1 ] && echo -smoke)"
  echo "$name: figures, checkpoints and metrics.json in $folder"
  .venv/bin/python -c "import json, sys; m = json.load(open(sys.argv[1])); print('quality:', json.dumps(m['quality']))" \
    "$folder/metrics.json"
done
