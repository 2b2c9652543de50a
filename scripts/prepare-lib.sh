# Sourced by scripts/prepare-*.sh: messages, the up-front checks of tools and Python modules,
# downloads, and the output discipline: everything is written into OUT.partial.PID next to the
# destination, which gets a COMPLETE marker and is moved to OUT only when every step succeeded.
# So OUT either does not exist or is complete, whatever interrupts a run; a partial directory
# left by a killed run is removed by the next run. With --force, the previous OUT is renamed to
# OUT.old.PID just before the new one takes its place: a run stopped between the two renames
# moves it back on its way out, and one killed there (SIGKILL, power loss) leaves it to the next
# run, which moves it back to OUT first thing, so a complete output is never lost.

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
COMPLETE_MARKER=COMPLETE
# The text tools of fairseq_agg/prepare, run as files (importing the fairseq_agg package would
# import fairseq, seconds of start-up per step).
PREPARE_PY=$REPO_ROOT/fairseq_agg/prepare

log() { printf '[%s %s] %s\n' "$PROG" "$(date +%H:%M:%S)" "$*" >&2; }

die() {
    printf '%s: error: %s\n' "$PROG" "$1" >&2
    shift
    local line
    for line in "$@"; do printf '  %s\n' "$line" >&2; done
    exit 1
}

# nproc would report OMP_NUM_THREADS instead of the CPUs, when it is set.
cpu_count() { (unset OMP_NUM_THREADS OMP_THREAD_LIMIT; nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1); }

# require_commands NAME...: every command must be on PATH.
require_commands() {
    local name missing=()
    for name in "$@"; do
        command -v "$name" >/dev/null 2>&1 || missing+=("$name")
    done
    ((${#missing[@]} == 0)) && return 0
    local hints=()
    for name in "${missing[@]}"; do
        hints+=("$name: install it with your package manager (e.g. apt-get install $name)")
    done
    die "missing command(s): ${missing[*]}" "${hints[@]}"
}

# require_python_modules MODULE=PIP_PACKAGE...: every module must be importable by $PYTHON.
# Checked with importlib.util.find_spec, which finds a module without importing it (fairseq
# takes seconds to import).
require_python_modules() {
    command -v "$PYTHON" >/dev/null 2>&1 ||
        die "Python interpreter '$PYTHON' not found" "set PYTHON=/path/to/python3 (3.8 or later)"
    local missing
    missing=$("$PYTHON" - "$@" <<'EOF'
import importlib.util
import sys

for spec in sys.argv[1:]:
    module, _, package = spec.partition("=")
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        print(f"{module}={package}")
EOF
    ) || die "could not run $PYTHON to check for Python modules"
    [[ -z $missing ]] && return 0
    local entry modules=() hints=() packages=()
    while IFS= read -r entry; do
        local module=${entry%%=*} package=${entry#*=}
        modules+=("$module")
        if [[ $package == fairseq ]]; then
            hints+=("$module: part of fairseq; 'bash scripts/setup.sh' installs torch, then fairseq and this package")
        else
            hints+=("$module: pip install $package")
            packages+=("$package")
        fi
    done <<<"$missing"
    ((${#packages[@]} == 0)) || hints+=("all at once: $PYTHON -m pip install ${packages[*]}")
    hints+=("(these are for $PYTHON, that is $(command -v "$PYTHON"); set PYTHON to use another interpreter)")
    die "missing Python module(s): ${modules[*]}" "${hints[@]}"
}

# download URL DEST HINT...: DEST appears only once the transfer is complete (curl writes
# DEST.part first, and resumes it on a later run).
download() {
    local url=$1 dest=$2
    shift 2
    mkdir -p "$(dirname "$dest")"
    log "downloading $url -> $dest"
    local progress_option=(-sS)
    [[ -t 2 ]] && progress_option=(--progress-bar)
    local curl=(curl -fL --retry 3 --retry-delay 5 --connect-timeout 30 "${progress_option[@]}" -o "$dest.part")
    local rc=0
    "${curl[@]}" -C - "$url" || rc=$?
    if ((rc == 33)); then # the server cannot resume the DEST.part of an earlier run: start over
        rm -f "$dest.part"
        rc=0
        "${curl[@]}" "$url" || rc=$?
    fi
    if ((rc != 0)); then
        die "download failed (curl exit code $rc): $url" \
            "Check the network and the URL, or download the file yourself and put it at $dest" "$@"
    fi
    mv "$dest.part" "$dest"
    log "downloaded $(du -h "$dest" | cut -f1) to $dest"
}

# exit_if_complete DIR: exits 0 when DIR is already complete, unless FORCE=1. First moves back
# to DIR an output that an interrupted --force run had moved aside (restore_moved_aside).
exit_if_complete() {
    restore_moved_aside "${1%/}"
    local marker=${1%/}/$COMPLETE_MARKER
    if [[ -f $marker && ${FORCE:-0} != 1 ]]; then
        log "${1%/} is already complete; nothing to do (--force redoes it). $marker says:"
        sed 's/^/    /' "$marker" >&2
        exit 0
    fi
}

# begin_output DIR: sets OUT and PARTIAL; refuses a DIR that exists without the marker
# (unless FORCE=1).
begin_output() {
    OUT=${1%/}
    exit_if_complete "$OUT"
    if [[ -e $OUT && ! -f $OUT/$COMPLETE_MARKER && ${FORCE:-0} != 1 ]]; then
        die "$OUT exists but has no $COMPLETE_MARKER marker, so it was not completed by this script" \
            "remove it, or pass --force to replace it"
    fi
    mkdir -p "$(dirname "$OUT")"
    remove_stale "$OUT".partial.*
    # (exit_if_complete has moved back an output that an interrupted run had moved aside.)
    # An older output moved aside is deleted only when OUT holds a complete one.
    if [[ -f $OUT/$COMPLETE_MARKER ]]; then
        remove_stale "$OUT".old.*
    else
        local kept
        for kept in "$OUT".old.*; do
            if [[ -e $kept ]]; then
                log "keeping $kept (an earlier output moved aside by an interrupted run), as $OUT is not complete"
            fi
        done
    fi
    PARTIAL="$OUT.partial.$$"
    rm -rf "$PARTIAL"
    mkdir "$PARTIAL"
    trap _end_output EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    trap 'exit 129' HUP
}

# remove_stale PATH...: removes each PATH.PID whose process PID is gone (an interrupted run).
remove_stale() {
    local stale pid
    for stale in "$@"; do
        [[ -e $stale ]] || continue
        pid=${stale##*.}
        if [[ $pid =~ ^[0-9]+$ ]] && ! kill -0 "$pid" 2>/dev/null; then
            log "removing $stale, left by an interrupted run"
            rm -rf "$stale"
        fi
    done
}

# restore_moved_aside DIR: when DIR does not exist but DIR.old.PID does, PID gone, DIR was
# moved aside by a --force run killed before its new output took DIR's place (finish_output):
# moves it back (the newest complete one, if there are several). A no-op otherwise.
restore_moved_aside() {
    local dir=$1 candidate pid best=
    [[ -e $dir ]] && return 0
    for candidate in "$dir".old.*; do
        [[ -d $candidate ]] || continue
        pid=${candidate##*.}
        [[ $pid =~ ^[0-9]+$ ]] && ! kill -0 "$pid" 2>/dev/null || continue
        if [[ -z $best ]] ||
            { [[ -f $candidate/$COMPLETE_MARKER ]] &&
                { [[ ! -f $best/$COMPLETE_MARKER ]] || [[ $candidate/$COMPLETE_MARKER -nt $best/$COMPLETE_MARKER ]]; }; }; then
            best=$candidate
        fi
    done
    [[ -n $best ]] || return 0
    mv "$best" "$dir" ||
        die "could not move $best back to $dir" "it holds the output an interrupted run had moved aside; move it back yourself"
    if [[ -f $dir/$COMPLETE_MARKER ]]; then
        log "restored $dir from $best: the complete output that an interrupted --force run had moved aside"
    else
        log "restored $dir from $best: what an interrupted --force run had moved aside (it has no $COMPLETE_MARKER marker)"
    fi
}

# Scratch paths outside PARTIAL, removed when the run exits.
SCRATCH_PATHS=()
# OUT.old.PID while finish_output swaps the new output in.
MOVED_ASIDE=

_end_output() {
    local rc=$?
    if ((${#SCRATCH_PATHS[@]})); then
        rm -rf "${SCRATCH_PATHS[@]}"
    fi
    if [[ -n ${PARTIAL:-} && -d $PARTIAL ]]; then
        rm -rf "$PARTIAL"
        log "stopped (exit code $rc); removed $PARTIAL, nothing was written to $OUT"
    fi
    if [[ -n $MOVED_ASIDE && -e $MOVED_ASIDE ]]; then
        if [[ -e $OUT ]]; then # the new output took OUT's place: the old one is no longer needed
            rm -rf "$MOVED_ASIDE"
        elif mv "$MOVED_ASIDE" "$OUT"; then
            log "stopped while replacing $OUT; its previous output is back in place"
        else
            log "stopped while replacing $OUT; its previous output is in $MOVED_ASIDE, which the next run moves back to $OUT (or move it back yourself)"
        fi
    fi
}

# finish_output SUMMARY_LINE...: writes the marker into PARTIAL, then moves PARTIAL to OUT
# (replacing a previous OUT only now, with --force).
finish_output() {
    {
        echo "prepared by $PROG on $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        printf '%s\n' "$@"
    } >"$PARTIAL/$COMPLETE_MARKER"
    if [[ -e $OUT ]]; then
        # OUT is away only between these two renames; a run stopped there puts it back
        # (_end_output), and the next run after one killed there does (restore_moved_aside).
        MOVED_ASIDE="$OUT.old.$$"
        local n=0
        while [[ -e $MOVED_ASIDE ]]; do MOVED_ASIDE="$OUT.old.$((++n)).$$"; done # a kept one, same PID
        mv "$OUT" "$MOVED_ASIDE"
    fi
    mv "$PARTIAL" "$OUT"
    PARTIAL=
    if [[ -n $MOVED_ASIDE ]]; then
        rm -rf "$MOVED_ASIDE"
        MOVED_ASIDE=
    fi
    log "done: $OUT"
}

# step NAME MESSAGE: the start of step NAME, logged right before its command is launched, with
# the time since the start of the run: "step NAME:" in a log says which step was running when a
# run stopped (tests that interrupt a run at a given step wait for it).
step() {
    local name=$1
    shift
    log "[$((SECONDS / 60))m$((SECONDS % 60))s] step $name: $*"
}

need_value() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"; }

