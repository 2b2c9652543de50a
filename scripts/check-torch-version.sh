#!/usr/bin/env bash
# Checks this checkout under one Python environment, e.g. another torch release: the fast test
# subset (docs/development.md), a 3-update fairseq-train with the AGG task and criterion on a slice of the
# shipped WikiText-2, and a resume from its checkpoint_last.pt for 2 more updates (fairseq's
# torch.load there is weights-only on torch >= 2.6, so the resume exercises the plug-in's
# allow-list). Prints one summary line: PASS or FAIL with the torch version.
#
#   scripts/check-torch-version.sh VENV_PYTHON
#
# Exit 0 on PASS, 1 on FAIL (its work folder with the logs is kept and named), 2 on bad input.
# Writes only into a new folder under ${TMPDIR:-/tmp}, removed after a PASS.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
ME="check-torch-version"

refuse() { echo "$ME: $1" >&2; exit 2; }

[ $# -eq 1 ] || refuse "usage: scripts/check-torch-version.sh VENV_PYTHON (the interpreter of the environment to check, e.g. /work/venvs/torch-2.6/bin/python)"
PY=$1
[ -x "$PY" ] && [ ! -d "$PY" ] || refuse "$PY is not an executable Python interpreter; pass one, e.g. /work/venvs/torch-2.6/bin/python"

# This checkout first on the path, whatever fairseq_agg the environment may have installed.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONWARNINGS=ignore
# The torch version, or "missing: " and the first module the environment cannot import.
PROBE='
import importlib
for name in ("torch", "fairseq", "pytest", "fairseq_agg.criterions", "fairseq_agg.tasks"):
    try:
        importlib.import_module(name)
    except Exception as exc:
        raise SystemExit(print(f"missing: {name} ({type(exc).__name__}: {exc})".splitlines()[0]))
import torch
print(torch.__version__)
'
probe=$("$PY" -c "$PROBE" 2>/dev/null | tail -n 1)
case "$probe" in
    "missing: "*) refuse "$PY cannot import ${probe#missing: }; install the environment first: its torch, then PYTHON=$PY bash scripts/setup.sh" ;;
    [0-9]*) TORCH=$probe ;;
    *) refuse "$PY did not run as a Python 3 interpreter; pass one, e.g. /work/venvs/torch-2.6/bin/python" ;;
esac

WORK=$(mktemp -d "${TMPDIR:-/tmp}/$ME-XXXXXX") || refuse "cannot create a work folder under ${TMPDIR:-/tmp}; set TMPDIR to a writable folder"
cd "$REPO"
failures=()
note() { echo "[$ME] $*" >&2; }

# -- 1. the fast subset ---------------------------------------------------------------------------
note "torch $TORCH: fast test subset (log: $WORK/pytest.log)"
timeout 1800 "$PY" -m pytest -q -p no:cacheprovider --basetemp="$WORK/pytest" \
    tests/test_gradients.py tests/test_counter.py tests/test_device_gradients.py \
    tests/test_precision.py tests/test_isotropy.py tests/test_metrics.py >"$WORK/pytest.log" 2>&1
rc=$?
pytest_summary=$(grep -v '^[[:space:]]*$' "$WORK/pytest.log" | tail -n 1 | tr -d '=' | sed 's/^ *//; s/ *$//')  # pytest's last line
[ $rc -eq 0 ] || failures+=("fast subset (pytest exit $rc: ${pytest_summary:-no summary})")

# -- 2. a short fairseq-train, then 3. its resume --------------------------------------------------
# The tiny model and data slice of tests/conftest.py; one thread, as the end-to-end tests run.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
head -n 600 data/wikitext-2/wiki.train.tokens >"$WORK/train.txt"
head -n 100 data/wikitext-2/wiki.valid.tokens >"$WORK/valid.txt"
TRAIN=(
    "$WORK/data-bin" --user-dir "$REPO/fairseq_agg" --task language_modeling_agg --criterion agg_cross_entropy
    --arch transformer_lm --decoder-layers 2 --decoder-embed-dim 32 --decoder-input-dim 32
    --decoder-output-dim 32 --decoder-ffn-embed-dim 64 --decoder-attention-heads 2
    --share-decoder-input-output-embed --dropout 0 --tokens-per-sample 32 --max-tokens 256
    --optimizer adam --lr 1e-3 --cpu --seed 7 --num-workers 0 --no-progress-bar --log-format json
    --log-interval 1 --save-dir "$WORK/checkpoints" --no-epoch-checkpoints
)
# The last update a run logged ("num_updates" of its last train_inner record).
last_update() { grep -o '"num_updates": "[0-9]*"' "$1" | tail -n 1 | grep -o '[0-9]*'; }

note "torch $TORCH: fairseq-train, 3 updates (log: $WORK/train.log)"
if ! "$PY" -m fairseq_cli.preprocess --only-source --trainpref "$WORK/train.txt" --validpref "$WORK/valid.txt" \
        --destdir "$WORK/data-bin" --nwordssrc 3000 --workers 1 >"$WORK/preprocess.log" 2>&1; then
    failures+=("fairseq-preprocess (see $WORK/preprocess.log)")
else
    timeout 600 "$PY" -m fairseq_cli.train "${TRAIN[@]}" --max-update 3 >"$WORK/train.log" 2>&1
    rc=$?; last=$(last_update "$WORK/train.log")
    if [ $rc -ne 0 ] || [ "$last" != 3 ] || [ ! -s "$WORK/checkpoints/checkpoint_last.pt" ]; then
        failures+=("train (exit $rc, last update ${last:-none}, see $WORK/train.log)")
    else
        note "torch $TORCH: resume from checkpoint_last.pt to update 5 (log: $WORK/resume.log)"
        timeout 600 "$PY" -m fairseq_cli.train "${TRAIN[@]}" --max-update 5 >"$WORK/resume.log" 2>&1
        rc=$?; last=$(last_update "$WORK/resume.log")
        if [ $rc -ne 0 ] || [ "$last" != 5 ] \
                || ! grep -q "Loaded checkpoint .*checkpoint_last.pt (epoch [0-9]* @ 3 updates)" "$WORK/resume.log"; then
            failures+=("resume (exit $rc, last update ${last:-none}, see $WORK/resume.log)")
        fi
    fi
fi

if [ ${#failures[@]} -eq 0 ]; then
    rm -rf "$WORK"
    echo "$ME: PASS torch $TORCH ($PY): fast subset ($pytest_summary), fairseq-train 3 updates, resume from checkpoint_last.pt to 5"
    exit 0
fi
joined=$(printf '%s; ' "${failures[@]}")
echo "$ME: FAIL torch $TORCH ($PY): ${joined%; }; logs kept in $WORK"
exit 1
