"""scripts/test-under-load.sh runs the suite with two CPU-bound processes beside it, passes its
arguments and the suite's exit status through, and stops the busy processes however the suite
ends.

The script runs from a copy of the repository's scripts folder in which scripts/test.sh (which
installs first, then runs the whole suite) is a stand-in running one tiny test file the same way:
``pytest -q tests "$@"``."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

SUITE = 'exec "$PYTHON" -m pytest -q -p no:cacheprovider tests "$@"\n'

# The tiny suite. Its tests find the busy processes as the other children of the script (the
# suite's parent, since scripts/test.sh execs pytest) and write their PIDs to $BUSY_PIDS.
PROBE = '''\
import os
import signal
import time
from pathlib import Path


def _stat(pid):
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def busy_processes():
    """The script's other children: [(pid, CPU ticks used)]."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                fields = _stat(entry.name)
            except OSError:  # ended meanwhile
                continue
            if int(fields[1]) == os.getppid():
                found.append(int(entry.name))
    Path(os.environ["BUSY_PIDS"]).write_text(" ".join(map(str, sorted(found))))
    return found


def cpu_ticks(pid):
    fields = _stat(pid)
    return int(fields[11]) + int(fields[12])  # utime + stime


def test_busy_processes_beside_the_suite():
    busy = busy_processes()
    assert len(busy) == 2
    used = {pid: cpu_ticks(pid) for pid in busy}
    deadline = time.monotonic() + 120
    while any(cpu_ticks(pid) == used[pid] for pid in busy):  # until both have used CPU time meanwhile
        assert time.monotonic() < deadline, "a busy process used no CPU for 120 s"
        time.sleep(0.05)


def test_failing():
    busy_processes()
    assert False, "fails on purpose"


def test_interrupted():
    busy_processes()
    Path(os.environ["BUSY_PIDS"] + ".started").touch()
    signal.pause()  # until Ctrl-C
'''


@pytest.fixture
def tree(tmp_path):
    """A copy of the script beside the stand-in suite: (root, environment)."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "test-under-load.sh", root / "scripts")
    (root / "scripts" / "test.sh").write_text(SUITE)
    (root / "tests").mkdir()
    (root / "tests" / "test_probe.py").write_text(PROBE)
    # (pytest's plugins of this environment, hydra's among them, take seconds to import)
    return root, dict(os.environ, PYTHON=sys.executable, BUSY_PIDS=str(tmp_path / "busy.txt"),
                      PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")


def _busy_pids(env):
    pids = [int(pid) for pid in Path(env["BUSY_PIDS"]).read_text().split()]
    assert len(pids) == 2
    return pids


def _running(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has ended; its new parent reaps it


def _sigint_at_default():
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # as at a terminal, whatever started this suite


def _start(root, env, *args):
    return subprocess.Popen(["bash", str(root / "scripts" / "test-under-load.sh"), *args], cwd=str(root), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=_sigint_at_default)


def _wait_for(path: Path, proc):
    while not path.exists():
        assert proc.poll() is None, f"the suite ended before {path.name} appeared:\n" + "".join(proc.communicate())
        time.sleep(0.05)


@pytest.mark.parametrize("selection, status, summary", [("busy", 0, "1 passed, 2 deselected"),
                                                         ("failing", 1, "1 failed, 2 deselected")])
def test_suite_runs_beside_busy_processes_and_its_status_is_returned(tree, selection, status, summary):
    root, env = tree
    proc = _start(root, env, "-k", selection)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == status, out + err
    assert summary in out  # the selection reached pytest
    busy = _busy_pids(env)
    assert f"2 busy processes ({busy[0]} {busy[1]})" in err
    assert not any(_running(pid) for pid in busy)  # stopped before the script returned


def test_ctrl_c_stops_the_suite_and_the_busy_processes(tree):
    root, env = tree
    proc = _start(root, env, "-k", "interrupted")
    _wait_for(Path(env["BUSY_PIDS"] + ".started"), proc)
    busy = _busy_pids(env)
    assert all(_running(pid) for pid in busy)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the terminal's whole process group
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, out + err  # pytest's status for an interrupted run
    assert not any(_running(pid) for pid in busy)


def test_busy_processes_stop_by_themselves_when_the_script_is_killed(tree):
    root, env = tree
    proc = _start(root, env, "-k", "interrupted")
    try:
        _wait_for(Path(env["BUSY_PIDS"] + ".started"), proc)
        busy = _busy_pids(env)
        os.kill(proc.pid, signal.SIGKILL)  # no trap runs; and the script, not reaped yet, stays a zombie
        deadline = time.monotonic() + 60
        while any(_running(pid) for pid in busy):
            assert time.monotonic() < deadline, "the busy processes outlived the script by 60 s"
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the stand-in suite, orphaned
        proc.communicate()
