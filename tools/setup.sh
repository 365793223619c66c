#!/usr/bin/env bash
# Create a virtual environment with the packages and the test extras, install the Debian dataset, build the
# offline DATA_DIR.    bash tools/setup.sh                     # .venv: requirements.txt as pinned there
#                      VENV=.venv-colab bash tools/setup.sh    # Colab's versions (requirements-colab.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
apt_install() { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "$@" >/dev/null; }
if [ ! -x "$VENV/bin/python" ]; then
  # Debian's python3 lacks ensurepip until python3-venv is installed
  "$PYTHON" -m venv "$VENV" 2>/dev/null || { rm -rf "$VENV"; apt_install python3-venv; "$PYTHON" -m venv "$VENV"; }
fi
requirements=(-r requirements.txt)
if [ "$VENV" = .venv-colab ]; then  # Colab's pins replace requirements.txt's torch pair
  grep -vE '^(torch|torchvision)==' requirements.txt > "$VENV/requirements-without-torch.txt"
  requirements=(-r requirements-colab.txt -r "$VENV/requirements-without-torch.txt")
fi
log=$(mktemp)
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "${requirements[@]}" -r requirements-test.txt \
  >"$log" 2>&1 || { grep -v "^WARNING: Location" "$log" >&2; echo "pip install failed (output above)" >&2; exit 1; }
rm -f "$log"
# helpers as an editable package (pyproject.toml; compat mode: a plain path entry, so a notebook that unpacks its
# own copy of helpers imports only that copy)
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e . --config-settings editable_mode=compat
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || apt_install dataset-fashion-mnist
export DATA_DIR=${DATA_DIR:-$PWD/data}
[ -f "$DATA_DIR/MNIST/STAND_IN.json" ] && [ -f "$DATA_DIR/FashionMNIST/raw/t10k-labels-idx1-ubyte" ] \
  || "$VENV/bin/python" tools/prepare_data.py "$DATA_DIR"
