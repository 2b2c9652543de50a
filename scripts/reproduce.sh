#!/usr/bin/env bash
# Reproduce one of the paper's tables: train its runs, evaluate them, write OUT/table<N>.md.
#
#   bash scripts/reproduce.sh TABLE [--smoke] [--out DIR] [--dry-run] [--jobs N] [-- FAIRSEQ-TRAIN OPTIONS]
#
# TABLE: 1 2 3 4 6 7 8 9 fig5 (alpha sweep) all. --smoke: tiny models on the shipped data, on CPU,
# through the same steps. The table definitions and the steps live in fairseq_agg/reproduce.py;
# `--help` lists every option. PYTHON picks the interpreter.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$repo_root${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m fairseq_agg.reproduce "$@"
