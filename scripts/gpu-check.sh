#!/usr/bin/env bash
# One GPU, under 10 minutes: AGG's gradients on CUDA, fp16/bf16 fairseq-train runs and their
# resumes, the host-sync check and the output-layer benchmark, as a pass/fail table and JSON
# (runs/gpu-check/gpu-check.json). Without CUDA it runs the same steps in a reduced form on the
# CPU (what CI runs). Options: --device auto|cuda|cpu, --out DIR, --updates N.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
