#!/usr/bin/env bash
# Prepare .gpu/ for benchmarks/gpu_check.sh on a GPU machine that has a CUDA torch (Python 3.12,
# x86-64) but neither network access nor our other packages nor TTS engines; run it here, with
# this repository set up (scripts/setup.sh), then carry .gpu/ (about 32 MB) there.
# WHEEL_PYTHON=3.11 makes wheels for another Python (the default, 3.12, is the device image's).
#   .gpu/wheels/   what the check needs beyond such an image. faiss-gpu is not among them:
#                  PyPI's faiss-gpu-cu12 needs CUDA 12's cuBLAS (hundreds of MB) and is 1.14,
#                  older than the 1.15 our k-means++ seeding needs; the check then times
#                  faiss-cpu alone and says so.
#   .gpu/corpora/  the test suite's TTS corpora (tiny, small), synthesized here, so that the
#                  gpu-marked tests run there on the same speech (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p .gpu/wheels .gpu/corpora
grep -qxF "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >> .git/info/exclude
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
for pkg in hjson pydantic pydantic-core annotated-types typing-inspection webdataset braceexpand omegaconf \
           soundfile cffi pycparser soxr praatio faiss-cpu; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "${WHEEL_PYTHON:-3.12}" --implementation cp "${platforms[@]}" \
    -d .gpu/wheels "$pkg"
done
# Published as source only; both are pure Python, so a wheel built here installs anywhere.
"$PY" -m pip wheel -q --no-deps -w .gpu/wheels "deepspeed==0.19.8" "python-hostlist>=1.23"
# -c, not a here-document: the synthesis's process pool re-imports the main module.
"$PY" -c "
import shutil, sys
from pathlib import Path
sys.path.insert(0, '.')
from tests.conftest import synthesize_test_corpus
for name in ('tiny', 'small'):
    out = Path('.gpu/corpora').resolve() / name
    if not (out / 'corpus.json').is_file():
        shutil.rmtree(out, ignore_errors=True)  # an interrupted synthesis
        synthesize_test_corpus(name, out)
"
du -sh .gpu/wheels .gpu/corpora
