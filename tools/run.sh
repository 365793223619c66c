#!/usr/bin/env bash
# The main job: set up, then execute notebooks headless in full mode and keep the executed copies.
#   bash tools/run.sh                                  # CPU: the MNIST GAN, full mode, bounded to a few minutes
#   NB="03_style_transfer 05_pix2pixhd" bash tools/run.sh   # on a GPU: the notebooks you name
#   SMOKE=1 bash tools/run.sh                          # the CI-sized run instead
# GAN_EPOCHS sets the GAN notebooks' length in epochs of 937 iterations (their full mode: 200 epochs, the baseline
# recipe's 187,400 iterations). Without a GPU it defaults to CPU_GAN_EPOCHS, chosen so that the default run
# (01, both recipes) takes about 4 minutes on an idle 2-core CPU (245 s measured: README, "Measured results").
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export DATA_DIR=${DATA_DIR:-$PWD/data} RUN_DIR=${RUN_DIR:-$PWD/runs} MPLBACKEND=Agg SMOKE=${SMOKE:-0}
CPU_GAN_EPOCHS=6
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export GAN_EPOCHS=${GAN_EPOCHS:-$CPU_GAN_EPOCHS}
  echo "no GPU: full mode on the CPU, GAN notebooks bounded to GAN_EPOCHS=$GAN_EPOCHS epochs of 937 iterations"
fi
for name in ${NB:-01_mnist_gan}; do
  [ -f "notebooks/$name.ipynb" ] || { echo "no notebook notebooks/$name.ipynb; NB takes names like 01_mnist_gan"; exit 2; }
  .venv/bin/python tools/execute.py "notebooks/$name.ipynb" "$RUN_DIR/executed/$name.ipynb"
  folder="$RUN_DIR/$name"
  if [ "$SMOKE" = 1 ]; then folder="$folder-smoke"; fi
  echo "$name: executed notebook $RUN_DIR/executed/$name.ipynb; figures, samples, checkpoints and metrics.json in $folder"
  .venv/bin/python - "$folder" <<'EOF'
import json, sys
from pathlib import Path
folder = Path(sys.argv[1])
m = json.loads((folder / "metrics.json").read_text())
q = m["quality"]
print(f"  {m['mode']} mode on {m['device']}: {m['iterations']:,} iterations in {m['seconds']:.0f} s of training")
if "fd_baseline" in q:  # the GAN notebooks: both recipes, scored on the samples in samples.npz
    print(f"  FD (lower is better): improved recipe {q['fd']:.2f}, baseline recipe {q['fd_baseline']:.2f}; class coverage "
          f"{q['coverage_nats']:.3f} vs {q['coverage_nats_baseline']:.3f} nats (max 2.303)")
    print(f"  samples: {folder / 'samples.npz'}; figures: {', '.join(p.name for p in sorted(folder.glob('*.png')))}")
else:
    print("  quality:", json.dumps(q))
for note in m["stand_ins"]:
    print("  STAND-IN:", note)
EOF
done
echo "tools/run.sh: done in ${SECONDS} s of wall time"
