#!/usr/bin/env bash
# One-time (and idempotent) set-up of a fresh Debian machine for pretrain:
#   - SLURM (slurmctld, slurmd, client, munge) for the local test cluster (slurm/local-cluster.sh),
#   - the Debian packages of the TTS engines behind the synthetic corpus, and libsndfile1,
#     which brings libFLAC (the data pipeline decodes FLAC with it directly),
#   - real recorded speech for the tests: Asterisk's voice prompts (5 speakers, 8 kHz, CC-BY-SA),
#     where real recordings matter and phone labels do not (tests/conftest.py: recorded_speech),
#   - a virtual environment in .venv with a CPU torch installed *before* everything else,
#     so that deepspeed's resolution never pulls a CUDA torch plus its nvidia wheels,
#   - Libri-light's ABX in .venv/libriabx, for the test that checks ours against it,
#   - the package itself, editable, with the cpu (faiss-cpu) and dev extras; set
#     PRETRAIN_EXTRAS=gpu,dev on a GPU machine for faiss-gpu instead.
# Re-running it is cheap: every step checks whether it is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts flite espeak-ng
              libespeak-ng1 libsndfile1 make slurmctld slurmd slurm-client munge
              asterisk-core-sounds-en-wav asterisk-core-sounds-es-wav asterisk-core-sounds-fr-wav
              asterisk-core-sounds-it-wav asterisk-core-sounds-ru-wav asterisk-prompt-it-menardi-wav)
TORCH_SPEC="${PRETRAIN_TORCH_SPEC:-torch==2.13.0}"
VENV="${PRETRAIN_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi

pip_install() {
  # pip prints a harmless warning per ignored local index location; keep its log for failures.
  local log
  log="$(mktemp)"
  if ! "$VENV/bin/python" -m pip install -q "$@" >"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" >&2
    echo "setup: pip install $* failed" >&2
    exit 1
  fi
  rm -f "$log"
}

# Reinstall only when the declared dependencies change.
stamp="$VENV/.pretrain-installed"
want="$( (cat setup.cfg pyproject.toml scripts/setup.sh; echo "$TORCH_SPEC ${PRETRAIN_EXTRAS:-}") \
        | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing Python packages into $VENV (torch first: $TORCH_SPEC)"
  pip_install "$TORCH_SPEC"
  pip_install -e ".[${PRETRAIN_EXTRAS:-cpu,dev}]"
  # s3prl, for the test that loads our export through its transformers upstream (hf_hubert).
  # Without its dependencies: they pin a torchaudio built for another torch, which would
  # replace ours; the hf_hubert upstream needs only torch and transformers.
  pip_install --no-deps "s3prl==0.4.18"
  # Libri-light's own ABX (eval_ABX, as ZeroSpeech packages it), for the test that runs it next
  # to ours (tests/probe/test_abx_librilight.py); in a folder of its own, never imported by the
  # package. Built from source: the wheel's DTW extension is compiled against numpy 1. Without
  # dependencies: it asks for torchaudio, which has no build for our torch and which its ABX
  # never calls.
  rm -rf "$VENV/libriabx"
  pip_install --no-deps --no-binary zerospeech-libriabx --target "$VENV/libriabx" "zerospeech-libriabx==1.0.5" \
    "progressbar2==4.6.0" "python-utils==4.2.0" "virtual-dataset==1.0.1"
  "$VENV/bin/python" -c "import torch, deepspeed, webdataset, wandb, omegaconf, numba, faiss, soundfile" \
    || { echo "setup: Python packages failed to import" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
