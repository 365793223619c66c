#!/usr/bin/env bash
# Create .venv with the pinned packages and the test extras, install the Debian dataset, build the offline DATA_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-test.txt 2>&1 \
  | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, torchvision" \
  || { echo "torch/torchvision did not install: see the pip output above" >&2; exit 1; }
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
export DATA_DIR=${DATA_DIR:-$PWD/data}
[ -f "$DATA_DIR/MNIST/STAND_IN.json" ] && [ -f "$DATA_DIR/FashionMNIST/raw/t10k-labels-idx1-ubyte" ] \
  || .venv/bin/python -m helpers.data prepare-offline "$DATA_DIR"
