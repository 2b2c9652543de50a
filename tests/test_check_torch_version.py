"""scripts/check-torch-version.sh: bad input is refused in one line before any work and leaves
nothing behind; a failing environment gives one FAIL line naming each failed step and the kept
logs. (A PASS run trains for minutes under another torch: it is run by hand, not here.)"""

import os
import subprocess
import sys

from conftest import REPO

SCRIPT = REPO / "scripts" / "check-torch-version.sh"


def _run(tmp_path, *args):
    work = tmp_path / "tmpdir"
    work.mkdir(exist_ok=True)
    env = dict(os.environ, TMPDIR=str(work))
    proc = subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=env, timeout=120)
    return proc, sorted(work.iterdir())


def _refused_in_one_line(proc, left, *words):
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("check-torch-version: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in lines[0]
    assert left == []


def test_without_an_interpreter_it_prints_its_usage(tmp_path):
    proc, left = _run(tmp_path)
    _refused_in_one_line(proc, left, "usage: scripts/check-torch-version.sh VENV_PYTHON")


def test_a_folder_or_a_missing_file_is_refused(tmp_path):
    for path in (tmp_path, tmp_path / "no-such-python"):
        proc, left = _run(tmp_path, path)
        _refused_in_one_line(proc, left, f"{path} is not an executable Python interpreter")


def test_a_program_that_is_not_python_is_refused(tmp_path):
    proc, left = _run(tmp_path, "/bin/true")
    _refused_in_one_line(proc, left, "/bin/true did not run as a Python 3 interpreter")


def test_an_environment_without_torch_is_refused_with_the_install_steps(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    proc, left = _run(tmp_path, python)
    _refused_in_one_line(proc, left, f"{python} cannot import torch", f"PYTHON={python} bash scripts/setup.sh")


def test_failed_steps_are_named_in_one_fail_line_and_their_logs_kept(tmp_path):
    # Answers the environment probe as a complete torch 2.6 environment, then fails every step.
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\n[ "$1" = "-c" ] && { echo 2.6.0; exit 0; }\necho "step failed: $*"; exit 1\n')
    fake.chmod(0o755)
    proc, left = _run(tmp_path, fake)
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"check-torch-version: FAIL torch 2.6.0 ({fake}): "), proc.stdout
    assert "fast subset (pytest exit 1: step failed: -m pytest" in lines[0]
    assert "fairseq-preprocess" in lines[0]
    assert len(left) == 1 and lines[0].endswith(f"logs kept in {left[0]}")
    assert (left[0] / "pytest.log").read_text().startswith("step failed: -m pytest")
