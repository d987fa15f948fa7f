#!/usr/bin/env bash
# The GPU check, one command on one GPU, about 8 minutes: JSON lines on stdout and in
# $OUT/gpu_check.jsonl (benchmarks/gpu_check.py says what each line measures).
#
#   On a GPU machine with this package installed (scripts/setup.sh with PRETRAIN_EXTRAS=gpu,dev,
#   or pip install -e ".[gpu,dev]" over a CUDA torch):   bash benchmarks/gpu_check.sh
#   On a machine that has a CUDA torch but neither our other packages, network nor TTS engines:
#   run benchmarks/gpu_prepare.sh where pip works, carry the .gpu folder it fills, then run
#   this; it makes a virtual environment over the machine's own packages (its torch), installs
#   the wheels and this package there, and points the tests at the carried corpora.
# Extra arguments go to gpu_check.py (--smoke checks the script itself on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
if [ -d .gpu/wheels ] && { [ -n "${GPU_CHECK_VENV:-}" ] || ! "$PY" -c "import deepspeed, webdataset, pretrain" 2>/dev/null; }; then
  # A virtual environment that sees the machine's own packages (its CUDA torch) through a .pth
  # file: --system-site-packages would see the base interpreter's only, and images often keep
  # torch in a virtual environment of their own.
  venv=/tmp/gpu-check-venv
  rm -rf "$venv"
  "$PY" -m venv --without-pip "$venv" 2>/dev/null || "$PY" -m venv "$venv"
  site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  "$PY" -c "import site, sys; print('\n'.join(p for p in site.getsitepackages() + [site.getusersitepackages()] if p))" \
    > "$site/gpu-check-parent.pth"
  # The parent's pip, run by the new interpreter, installs into the new environment.
  "$venv/bin/python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .gpu/wheels/*.whl
  # --no-build-isolation: setuptools from the machine, nothing fetched.
  "$venv/bin/python" -m pip install -q --no-index --no-deps --no-build-isolation -e .
  PY=$venv/bin/python
fi
[ -d .gpu/corpora ] && export PRETRAIN_TEST_CORPORA=$PWD/.gpu/corpora
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled OUT
start=$(date +%s)
timeout 540 "$PY" benchmarks/gpu_check.py --out "$OUT" "$@"
echo "{\"check\": \"total\", \"seconds\": $(( $(date +%s) - start ))}" | tee -a "$OUT/gpu_check.jsonl"
