#!/usr/bin/env bash
# Installs fairseq-agg and its dependencies into the current Python environment.
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch 2.13.0"
  # Installed first and alone: otherwise pip resolves fairseq's `torch` requirement to the
  # newest release with several GB of CUDA packages.
  "$PY" -m pip install -q torch==2.13.0
fi
if ! "$PY" -c "import fairseq" 2>/dev/null; then
  echo "[setup] installing fairseq (builds its extensions, about 4 minutes)"
  # No build isolation: an isolated build environment would download another torch.
  "$PY" -m pip install -q cython wheel "setuptools<81" numpy
  if "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
    "$PY" -m pip install -q --no-build-isolation fairseq-fixed==0.12.3.1
  else
    "$PY" -m pip install -q --no-build-isolation fairseq==0.12.2
  fi
fi
# hf: transformers + accelerate for fairseq_agg.hf; docs: mkdocs for the site the tests build
"$PY" -m pip install -q --no-build-isolation -e ".[test,hf,docs]"
"$PY" -c "import fairseq_agg.criterions, fairseq_agg.tasks; print('[setup] fairseq-agg ready')"
