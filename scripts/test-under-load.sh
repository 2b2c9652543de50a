#!/usr/bin/env bash
# Runs the test suite (scripts/test.sh, its arguments passed through) with two CPU-bound busy
# processes beside it, as on a shared machine or a loaded CI runner: a test that times itself or
# synchronises by sleeping fails here first. Exits with the suite's status.
#
#   bash scripts/test-under-load.sh                      # the whole suite
#   bash scripts/test-under-load.sh tests/test_prepare.py -k interrupted
#
# The busy processes are stopped however the suite ends (passed, failed, Ctrl-C, a signal to
# this script); killed outright (SIGKILL), where no trap runs, the script leaves them to stop by
# themselves once they see it gone.
set -euo pipefail
cd "$(dirname "$0")/.."

BUSY_PROCESSES=2
busy_pids=()

# busy_loop: spins a CPU while this script runs. Between rounds of a fraction of a second it
# checks that its parent is still this script: a parent that died is a zombie (kill -0 would
# still find it) until whoever started it reaps it, and its children are handed to another
# process at once.
busy_loop() {
    local i parent
    while read -r _ _ _ parent _ <"/proc/$BASHPID/stat" && ((parent == $$)); do
        for ((i = 0; i < 100000; i++)); do :; done
    done
}

stop_busy() {
    local rc=$?
    if ((${#busy_pids[@]})); then
        kill "${busy_pids[@]}" 2>/dev/null || true
        wait "${busy_pids[@]}" 2>/dev/null || true
        echo "test-under-load.sh: stopped the busy processes ${busy_pids[*]}" >&2
    fi
    exit "$rc"
}
# Also run when INT, TERM or HUP ends the script (no trap of their own, so that Ctrl-C returns
# the suite's status: pytest's 2). bash acts on a signal once the suite in the foreground has
# ended, so a signal to this script alone waits for the suite; Ctrl-C at a terminal, or a
# signal to the process group, stops the suite too.
trap stop_busy EXIT

for ((n = 0; n < BUSY_PROCESSES; n++)); do
    busy_loop </dev/null >/dev/null 2>&1 & # not holding the suite's output open, whoever reads it to its end
    busy_pids+=($!)
done
echo "test-under-load.sh: $BUSY_PROCESSES busy processes (${busy_pids[*]}) beside the suite" >&2

bash scripts/test.sh "$@"
