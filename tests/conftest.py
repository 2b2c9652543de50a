"""Shared fixtures and helpers of the end-to-end tests (``test_training.py``,
``test_distributed.py``).

The shipped corpora (``data/``) are sliced and binarized once per session. Every run is a fairseq
command line (``fairseq-train``, ``fairseq-eval-lm``, ``fairseq-generate``: the same ``cli_main``
as the console scripts, ``--user-dir fairseq_agg`` included) in its own process, with a tiny
model on CPU. To keep a dozen runs affordable on a 2-core CI machine, most processes are forked
from one server that has imported fairseq once (``tests/helpers/fork_server.py``); a few runs, and
all of them with ``AGG_E2E_SUBPROCESS=1``, are plain ``python -m fairseq_cli.*`` subprocesses.
Runs that do not depend on each other run concurrently (:func:`run_all`).
"""

import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import subprocess as subprocess_module
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest

REPO = Path(__file__).resolve().parents[1]
USER_DIR = str(REPO / "fairseq_agg")
HELPERS = str(Path(__file__).resolve().parent / "helpers")
DATA = REPO / "data"

# Slices of the shipped corpora: small enough to binarize in a second, large enough that the
# rare group is not the whole vocabulary after a few updates.
LM_TRAIN_LINES, LM_EVAL_LINES, LM_VOCAB = 600, 100, 3000
MT_TRAIN_LINES, MT_EVAL_LINES, MT_VOCAB = 400, 40, 2000

RUN_TIMEOUT = 300  # seconds, per training process

# A tiny transformer_lm with tied input/output embeddings. Dropout 0 and one intra-op thread
# make runs bit-reproducible on CPU.
LM_MODEL = [
    "--arch", "transformer_lm",
    "--decoder-layers", "2",
    "--decoder-embed-dim", "32", "--decoder-input-dim", "32", "--decoder-output-dim", "32",
    "--decoder-ffn-embed-dim", "64",
    "--decoder-attention-heads", "2",
    "--share-decoder-input-output-embed",
    "--dropout", "0", "--attention-dropout", "0", "--activation-dropout", "0",
]
LM_DATA = ["--tokens-per-sample", "32", "--max-tokens", "256"]
MT_MODEL = [
    "--arch", "transformer_wmt_en_de",
    "--encoder-layers", "1", "--decoder-layers", "1",
    "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
    "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64",
    "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
    "--share-all-embeddings",
    "--dropout", "0", "--attention-dropout", "0", "--activation-dropout", "0",
]
MT_DATA = ["--max-tokens", "512", "--max-source-positions", "256", "--max-target-positions", "256"]
COMMON = [
    "--cpu", "--seed", "7",
    "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", "1e-3", "--weight-decay", "0.01",
    "--no-progress-bar", "--log-format", "json", "--log-interval", "1",
    "--num-workers", "0", "--no-epoch-checkpoints",
]


def subprocess_env() -> Dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), HELPERS, env.get("PYTHONPATH")) if p)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- log parsing ---------------------------------------------------------------------------------
# "... | INFO | train_inner | {...}" from the CLI, "INFO:train_inner:{...}" when logging was set up
# before fairseq_cli.train was imported (python -c launches).
_LOG_RECORD = re.compile(r"(?:\| |INFO:)(train_inner|train|valid)(?: \| |:)(\{.*\})\s*$")


def parse_records(log: str) -> Dict[str, List[dict]]:
    """The JSON records fairseq logs with ``--log-format json``, grouped by tag."""
    records: Dict[str, List[dict]] = {"train_inner": [], "train": [], "valid": []}
    for line in log.splitlines():
        match = _LOG_RECORD.search(line)
        if match:
            records[match.group(1)].append(json.loads(match.group(2)))
    return records


class Launcher:
    """Client of ``tests/helpers/fork_server.py``: one server process imports fairseq once and
    forks a fresh child process per run (saves ~5 CPU seconds of imports per run)."""

    def __init__(self):
        self.log_dir = Path(tempfile.mkdtemp(prefix="agg-e2e-runs-"))
        self._server_log = open(self.log_dir / "server.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(HELPERS) / "fork_server.py")],
            cwd=str(REPO),
            env=subprocess_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._server_log,
        )
        self._buffer = b""
        self._replies: Dict[int, dict] = {}
        self._next_id = 0
        if not self._await(lambda: "ready" in self._replies.get(-1, {}), RUN_TIMEOUT, "start-up"):
            self.proc.kill()
            raise RuntimeError(f"the fork server did not start within {RUN_TIMEOUT}s")

    def _pump(self, timeout: float) -> None:
        fd = self.proc.stdout.fileno()
        readable, _, _ = select.select([fd], [], [], timeout)
        if not readable:
            return
        chunk = os.read(fd, 65536)
        if not chunk:
            self._server_log.flush()
            raise RuntimeError(
                "the fork server ended unexpectedly:\n" + (self.log_dir / "server.log").read_text()[-6000:]
            )
        self._buffer += chunk
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            message = json.loads(line)
            self._replies.setdefault(message.pop("id", -1), {}).update(message)

    def _await(self, done, timeout: float, what: str) -> bool:
        deadline = time.time() + timeout
        while not done():
            if time.time() > deadline:
                return False
            self._pump(min(0.5, max(0.0, deadline - time.time())))
        return True

    def submit(self, entry: str, argv: Sequence[str], log: Path, env: Dict[str, str]) -> int:
        self._next_id += 1
        request = {"id": self._next_id, "entry": entry, "argv": list(argv), "log": str(log), "env": env, "cwd": str(REPO)}
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        return self._next_id

    def wait(self, run_id: int, timeout: float) -> Optional[int]:
        """The run's exit code; None (after killing it) if it outlived ``timeout``."""
        if self._await(lambda: "rc" in self._replies.get(run_id, {}), timeout, "run"):
            return self._replies[run_id]["rc"]
        self.kill(run_id)
        return None

    def kill(self, run_id: int) -> None:
        self._await(lambda: "pid" in self._replies.get(run_id, {}), 10, "fork")
        pid = self._replies.get(run_id, {}).get("pid")
        if pid is not None and "rc" not in self._replies[run_id]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._await(lambda: "rc" in self._replies[run_id], 30, "kill")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._server_log.close()
        shutil.rmtree(self.log_dir, ignore_errors=True)


_LAUNCHER: Optional[Launcher] = None


def launcher() -> Launcher:
    global _LAUNCHER
    if _LAUNCHER is None:
        _LAUNCHER = Launcher()
    return _LAUNCHER


def pytest_sessionfinish(session, exitstatus):
    global _LAUNCHER
    if _LAUNCHER is not None:
        _LAUNCHER.close()
        _LAUNCHER = None


# python -c launch of a training run with the test-only traced task registered first.
TRACED_MAIN = (
    "import sys, agg_traced_task; from fairseq_cli.train import cli_main; "
    "sys.argv[0] = 'fairseq-train'; cli_main()"
)


class Run:
    """One fairseq command-line run (``entry``: "train" or "eval_lm") in its own process:
    ``start`` it, then ``wait`` for it.

    By default the process is forked from the launcher (see :class:`Launcher`); with
    ``subprocess=True`` (or ``AGG_E2E_SUBPROCESS=1`` in the environment, for every run) it is a
    plain ``python -m fairseq_cli.<entry>`` (``python -c`` for ``traced`` runs, whose code
    imports the traced task and then calls ``fairseq_cli.train.cli_main()``).
    """

    def __init__(
        self,
        entry: str,
        args: Sequence,
        save_dir: Optional[Path] = None,
        name: str = "run",
        env: Optional[Dict[str, str]] = None,
        traced: bool = False,
        subprocess: bool = False,
    ):
        self.entry = entry
        self.args = [str(a) for a in args]
        self.env = {k: str(v) for k, v in (env or {}).items()}
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self.name = name
        self.traced = traced
        self.use_subprocess = subprocess or os.environ.get("AGG_E2E_SUBPROCESS") == "1"
        self.returncode: Optional[int] = None
        self.log = ""
        self.seconds = 0.0
        self._proc = None
        self._id = None
        self._t0 = None

    @property
    def command(self) -> List[str]:
        if self.traced:
            assert self.entry == "train"
            return [sys.executable, "-c", TRACED_MAIN, *self.args]
        return [sys.executable, "-m", f"fairseq_cli.{self.entry}", *self.args]

    @property
    def started(self) -> bool:
        return self._t0 is not None

    def start(self) -> "Run":
        self._t0 = time.time()
        if self.use_subprocess:
            self._proc = subprocess_module.Popen(
                self.command,
                cwd=str(REPO),
                env={**subprocess_env(), **self.env},
                stdout=subprocess_module.PIPE,
                stderr=subprocess_module.STDOUT,
                text=True,
            )
        else:
            slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.name)
            self._log_path = launcher().log_dir / f"{launcher()._next_id + 1}-{slug}.log"
            self._id = launcher().submit(self.entry, self.args, self._log_path, self.env)
        return self

    def wait(self, check: bool = True) -> "Run":
        if not self.started:
            self.start()
        if self.returncode is None:
            timed_out = False
            if self.use_subprocess:
                try:
                    self.log, _ = self._proc.communicate(timeout=RUN_TIMEOUT)
                except subprocess_module.TimeoutExpired:
                    self._proc.kill()
                    self.log, _ = self._proc.communicate()
                    timed_out = True
                self.returncode = self._proc.returncode
            else:
                rc = launcher().wait(self._id, RUN_TIMEOUT)
                timed_out = rc is None
                self.returncode = -9 if rc is None else rc
                self.log = self._log_path.read_text(errors="replace")
            self.seconds = time.time() - self._t0
            if timed_out:
                raise AssertionError(f"{self.name} timed out after {RUN_TIMEOUT}s:\n{self.log[-6000:]}")
        if check and self.returncode != 0:
            raise AssertionError(
                f"{self.name} exited with {self.returncode}\ncommand: {' '.join(self.command)}\n"
                f"{self.log[-8000:]}"
            )
        return self

    def kill(self) -> None:
        if not self.started or self.returncode is not None:
            return
        if self.use_subprocess:
            self._proc.kill()
            self._proc.communicate()
        else:
            launcher().kill(self._id)
        self.returncode = -9

    @property
    def records(self) -> Dict[str, List[dict]]:
        return parse_records(self.log)

    def checkpoint(self, name: str = "checkpoint_last.pt") -> dict:
        import torch

        return torch.load(self.save_dir / name, map_location="cpu", weights_only=False)


def run_all(runs: Sequence[Run], check: bool = True, parallel: Optional[int] = None) -> List[Run]:
    """Run independent processes, at most ``parallel`` at a time (default: the CPU count, at
    least 2), and wait for all of them."""
    parallel = parallel or max(2, os.cpu_count() or 1)
    pending, active = list(runs), []
    try:
        while pending or active:
            while pending and len(active) < parallel:
                active.append(pending.pop(0).start())
            active.pop(0).wait(check=check)
    finally:
        for run in active:  # only after a failure: do not leave processes behind
            run.kill()
    return list(runs)


def train_run(data_dir, save_dir, *args, name="fairseq-train", **kw) -> Run:
    """``fairseq-train DATA --save-dir SAVE ARGS`` (not started yet); ``kw`` go to :class:`Run`."""
    save_dir = Path(save_dir)
    argv = [str(data_dir), "--save-dir", str(save_dir), *map(str, args)]
    return Run("train", argv, save_dir=save_dir, name=name, **kw)


def lm_train(data_dir, save_dir, *args, criterion="agg_cross_entropy", task="language_modeling_agg", **kw) -> Run:
    return train_run(
        data_dir, save_dir,
        "--user-dir", USER_DIR, "--task", task, "--criterion", criterion,
        *LM_MODEL, *LM_DATA, *COMMON, *args, **kw,
    )


def mt_train(data_dir, save_dir, *args, criterion="agg_cross_entropy", **kw) -> Run:
    return train_run(
        data_dir, save_dir,
        "--user-dir", USER_DIR, "--task", "translation_agg", "--criterion", criterion,
        "--source-lang", "en", "--target-lang", "de",
        *MT_MODEL, *MT_DATA, *COMMON, *args, **kw,
    )


# -- binarized corpora -----------------------------------------------------------------------------
def _head(src: Path, dst: Path, n: int) -> None:
    with open(src, encoding="utf-8") as fin, open(dst, "w", encoding="utf-8") as fout:
        for i, line in enumerate(fin):
            if i >= n:
                break
            fout.write(line)


def _preprocess(argv: List[str]) -> None:
    # In-process: saves the start-up of a fairseq process per corpus.
    from fairseq import options
    from fairseq_cli import preprocess

    parser = options.get_preprocessing_parser()
    args = parser.parse_args([str(a) for a in argv])
    preprocess.main(args)


@pytest.fixture(scope="session")
def lm_data(tmp_path_factory) -> Path:
    """WikiText-2 slice, binarized for language modelling (``--only-source``)."""
    root = tmp_path_factory.mktemp("lm_data")
    src = DATA / "wikitext-2"
    _head(src / "wiki.train.tokens", root / "train.txt", LM_TRAIN_LINES)
    _head(src / "wiki.valid.tokens", root / "valid.txt", LM_EVAL_LINES)
    _head(src / "wiki.test.tokens", root / "test.txt", LM_EVAL_LINES)
    dest = root / "bin"
    _preprocess([
        "--only-source",
        "--trainpref", root / "train.txt", "--validpref", root / "valid.txt", "--testpref", root / "test.txt",
        "--destdir", dest, "--nwordssrc", LM_VOCAB, "--workers", "1",
    ])
    return dest


@pytest.fixture(scope="session")
def mt_data(tmp_path_factory) -> Path:
    """WMT14 En-De sample slice, binarized with a joined dictionary."""
    root = tmp_path_factory.mktemp("mt_data")
    src = DATA / "wmt14-en-de-sample"
    for split, n in (("train", MT_TRAIN_LINES), ("valid", MT_EVAL_LINES), ("test", MT_EVAL_LINES)):
        for lang in ("en", "de"):
            _head(src / f"{split}.{lang}", root / f"{split}.{lang}", n)
    dest = root / "bin"
    _preprocess([
        "--source-lang", "en", "--target-lang", "de",
        "--trainpref", root / "train", "--validpref", root / "valid", "--testpref", root / "test",
        "--destdir", dest, "--joined-dictionary", "--nwordssrc", MT_VOCAB, "--workers", "1",
    ])
    return dest


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """The demo's --quick run (MLE and AGG twins on the shipped WikiText-2 slice): (workdir,
    results). Shared by the demo's tests and the evaluation suite's."""
    from fairseq_agg import demo

    assert demo.REPO_DATA.is_dir(), "the shipped data/wikitext-2 must be next to the package"
    workdir = tmp_path_factory.mktemp("demo")
    results = demo.run_demo(["--quick", "--workdir", str(workdir)])
    return workdir, results


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny matrices: one intra-op thread is faster, and steady on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
