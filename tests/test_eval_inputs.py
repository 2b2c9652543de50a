"""fairseq-agg-eval checks every input before it loads a model or scores a split: a bad input
fails in one line on stderr (problem and fix, no traceback), with a non-zero exit status, within
seconds of the start of the process, and before any scoring output.

The checkpoints are real: one update of the tiny LM and translation models of conftest.py."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from fairseq_agg import eval as agg_eval

from conftest import REPO, lm_train, mt_train, run_all, subprocess_env

# The checks must run before any scoring: a refusal costs the command's start-up (importing torch
# and fairseq, about 2.5 s on an idle 2-core machine) plus well under a second, never a scoring
# pass. Measured against the start-up of the same interpreter on the same machine, so that a
# loaded CI runner does not fail it; the budget is 5 s in all on an idle machine.
CHECK_BUDGET = 2.0  # seconds beyond the start-up

# fairseq 0.12's text_to_speech task configures the root logger when fairseq is imported and,
# without tensorboardX installed, logs this notice before any code of the plug-in runs.


@pytest.fixture(scope="module")
def checkpoints(lm_data, mt_data, tmp_path_factory):
    """{"lm": checkpoint, "mt": checkpoint} after one update each."""
    root = tmp_path_factory.mktemp("eval_inputs")
    run_all([lm_train(lm_data, root / "lm", "--max-update", "1", "--disable-validation", name="lm-1-update"),
             mt_train(mt_data, root / "mt", "--max-update", "1", "--disable-validation", name="mt-1-update")])
    return {kind: root / kind / "checkpoint_last.pt" for kind in ("lm", "mt")}


def _file(folder: Path, name: str, content: bytes) -> Path:
    path = folder / name
    path.write_bytes(content)
    return path


GOOD_PAIRS = b"word1 word2 score\nthe of 5.0\nand in 3.5\n"
NAN_PAIRS = GOOD_PAIRS + b"for to nan\n"  # the score on line 4
INF_PAIRS = b"the of 5.0\nand in inf\n"  # line 2
LATIN1_PAIRS = GOOD_PAIRS + "café tea 6.0\n".encode("latin-1")  # 0xe9 on line 4
BINARY = bytes(range(256)) * 4

# id -> (subcommand, f(tmp_path, checkpoints) -> {option: value} replacing or adding to the
# valid defaults, fragments the message names). Every other input is valid: without its check,
# the run would go on to load the model and score the split.
CASES = {
    "out-is-a-file": ("lm", lambda t, ck: {"--out": _file(t, "taken", b"x")},
                      ["--out", "taken", "is an existing file"]),
    "out-inside-a-file": ("lm", lambda t, ck: {"--out": _file(t, "taken", b"x") / "eval"},
                          ["--out", "cannot be created", "taken is a file"]),
    "mt-out-is-a-file": ("mt", lambda t, ck: {"--out": _file(t, "taken", b"x")}, ["--out", "is an existing file"]),
    "wordsim-missing": ("lm", lambda t, ck: {"--wordsim": f"MEN={t / 'no-such-men.txt'}"},
                        ["word-similarity file for MEN not found", "no-such-men.txt"]),
    "wordsim-nan": ("lm", lambda t, ck: {"--wordsim": f"WS353={_file(t, 'ws-nan.txt', NAN_PAIRS)}"},
                    ["ws-nan.txt", "line 4", "'nan' is not a finite number"]),
    "wordsim-inf": ("lm", lambda t, ck: {"--wordsim": f"RG65={_file(t, 'rg-inf.txt', INF_PAIRS)}"},
                    ["rg-inf.txt", "line 2", "'inf' is not a finite number"]),
    "wordsim-latin1": ("lm", lambda t, ck: {"--wordsim": f"RW={_file(t, 'rw-latin1.txt', LATIN1_PAIRS)}"},
                       ["rw-latin1.txt", "not UTF-8", "byte 0xe9 at line 4"]),
    "wordsim-binary": ("lm", lambda t, ck: {"--wordsim": f"MEN={_file(t, 'men.bin', BINARY)}"},
                       ["men.bin", "is a binary file"]),
    "translation-checkpoint-to-lm": ("lm", lambda t, ck: {"--path": ck["mt"]},
                                     ["is a translation checkpoint (task translation_agg)",
                                      "score it with `fairseq-agg-eval mt`"]),
    "lm-checkpoint-to-mt": ("mt", lambda t, ck: {"--path": ck["lm"]},
                            ["is a language-model checkpoint (task language_modeling_agg)",
                             "score it with `fairseq-agg-eval lm`"]),
}


@pytest.fixture
def startup_seconds():
    """Wall time of starting the command without running it, measured now (the machine's load now)."""
    start = time.monotonic()
    subprocess.run([sys.executable, "-c", "import fairseq_agg.eval"], check=True, capture_output=True,
                   env=subprocess_env(), cwd=str(REPO), timeout=300)
    return time.monotonic() - start


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_in_one_line_before_scoring(case, checkpoints, lm_data, mt_data, tmp_path, startup_seconds):
    command, changes, fragments = CASES[case]
    options = {"--path": checkpoints[command], "--out": tmp_path / "out", **changes(tmp_path, checkpoints)}
    argv = [sys.executable, "-m", "fairseq_agg.eval", command, str(lm_data if command == "lm" else mt_data),
            "--cpu", "--no-progress-bar", *(str(x) for item in options.items() for x in item)]
    if command == "lm":
        argv += ["--num-texts", "2", "--no-training-curves"]
    start = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, env=subprocess_env(), cwd=str(REPO), timeout=300)
    elapsed = time.monotonic() - start
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-3000:]
    message = lines[0]
    assert message.startswith("fairseq-agg-eval: ")
    for fragment in fragments:
        assert fragment in message, message
    assert "[eval]" not in proc.stderr + proc.stdout  # no scoring (nor anything after it) was started
    assert not (tmp_path / "out").exists()
    assert elapsed - startup_seconds < CHECK_BUDGET, f"failed after {elapsed:.1f}s (start-up {startup_seconds:.1f}s): {message}"


def _refusal(argv) -> str:
    with pytest.raises(SystemExit) as raised:
        agg_eval.main([str(a) for a in argv])
    message = str(raised.value.code)
    assert raised.value.code != 0 and "\n" not in message
    return message


def test_other_inputs_are_checked_first(checkpoints, lm_data, mt_data, tmp_path):
    out = tmp_path / "out"
    lm = ["lm", lm_data, "--path", checkpoints["lm"], "--out", out, "--cpu"]
    mt = ["mt", mt_data, "--path", checkpoints["mt"], "--out", out, "--cpu"]
    assert "missing.pt does not exist" in _refusal(["lm", lm_data, "--path", tmp_path / "missing.pt", "--out", out])
    assert "is a folder" in _refusal(["lm", lm_data, "--path", checkpoints["lm"].parent, "--out", out])
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    assert "cannot read checkpoint" in _refusal(["lm", lm_data, "--path", tmp_path / "text.pt", "--out", out])
    assert "--train-log" in _refusal(lm + ["--train-log", tmp_path / "train.log"])
    assert "has no 'nosuch' split" in _refusal(lm + ["--subset", "nosuch"])
    assert "has no 'nosuch' split" in _refusal(mt + ["--subset", "nosuch"])
    assert "has no dict.txt" in _refusal(["lm", mt_data, "--path", checkpoints["lm"], "--out", out])
    assert "not in the dictionary" in _refusal(mt + ["--neighbours", "no-such-token-xyz"])
    assert "expected NAME=FILE" in _refusal(lm + ["--wordsim", "=x.txt"])
    assert "--bpe-codes" in _refusal(lm + ["--bpe", "subword_nmt"])
    (tmp_path / "ref.de").write_bytes("Grüße\n".encode("latin-1"))
    assert "not UTF-8" in _refusal(mt + ["--reference", tmp_path / "ref.de"])
    (tmp_path / "results.json").write_text("{")
    assert "is not valid JSON" in _refusal(["compare", tmp_path / "results.json", "--out", out])
    assert not out.exists()


def test_valid_inputs_pass_the_checks(checkpoints, lm_data, mt_data, tmp_path):
    """No false refusals on the real checkpoints and data; nothing is created; the word
    pairs (UTF-8 byte-order mark, CRLF line ends, a header) are read once and kept."""
    wordsim = _file(tmp_path, "pairs.txt", b"\xef\xbb\xbf" + GOOD_PAIRS.replace(b"\n", b"\r\n"))
    for command, data, extra in (("lm", lm_data, ["--wordsim", f"MINE={wordsim}", "--neighbours", "the"]),
                                 ("mt", mt_data, ["--neighbours", "the"])):
        out = tmp_path / command / "eval"
        args = agg_eval.build_parser().parse_args(
            [command, str(data), "--path", str(checkpoints[command]), "--out", str(out), *extra])
        agg_eval.check_inputs(args)
        assert not (tmp_path / command).exists()  # checked, not created
        if command == "lm":
            path, pairs = args.wordsim_loaded["MINE"]
            assert path == wordsim and pairs == [("the", "of", 5.0), ("and", "in", 3.5)]
