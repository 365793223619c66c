#!/usr/bin/env bash
# Create .venv with the pinned packages and the test extras, install the Debian dataset, build the offline DATA_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
apt_install() { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "$@" >/dev/null; }
if [ ! -x .venv/bin/python ]; then
  # Debian's python3 lacks ensurepip until python3-venv is installed
  "$PYTHON" -m venv .venv 2>/dev/null || { rm -rf .venv; apt_install python3-venv; "$PYTHON" -m venv .venv; }
fi
log=$(mktemp)
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-test.txt >"$log" 2>&1 \
  || { grep -v "^WARNING: Location" "$log" >&2; echo "pip install failed (output above)" >&2; exit 1; }
rm -f "$log"
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || apt_install dataset-fashion-mnist
export DATA_DIR=${DATA_DIR:-$PWD/data}
[ -f "$DATA_DIR/MNIST/STAND_IN.json" ] && [ -f "$DATA_DIR/FashionMNIST/raw/t10k-labels-idx1-ubyte" ] \
  || .venv/bin/python -m helpers.data prepare-offline "$DATA_DIR"
