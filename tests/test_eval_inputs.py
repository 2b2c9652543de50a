"""fairseq-agg-eval checks every input before it loads a model or scores a split: a bad input
fails in one line on stderr (problem and fix, no traceback), with a non-zero exit status, before
the checkpoint's model is loaded and before any scoring output.

The checkpoints are real: one update of the tiny LM and translation models of conftest.py."""

import subprocess
import sys
from pathlib import Path

import pytest

from fairseq_agg import eval as agg_eval

from conftest import REPO, lm_train, mt_train, run_all, subprocess_env

# fairseq-agg-eval as its console script runs it, with fairseq's checkpoint loading (where
# scoring starts: loading the model) writing a marker file first, named by the first argument.
EVAL_WITH_LOAD_MARKER = """\
import sys
from pathlib import Path

import fairseq_agg.eval
from fairseq import checkpoint_utils

marker = Path(sys.argv.pop(1))
load = checkpoint_utils.load_checkpoint_to_cpu


def load_checkpoint_to_cpu(*args, **kwargs):
    marker.write_text("the checkpoint was loaded")
    return load(*args, **kwargs)


checkpoint_utils.load_checkpoint_to_cpu = load_checkpoint_to_cpu
sys.argv[0] = "fairseq-agg-eval"
sys.exit(fairseq_agg.eval.main())
"""


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
# valid defaults ("DATA": the data folder argument), fragments the message names). Every other
# input is valid: without its check, the run would go on to load the model and score the split.
CASES = {
    "out-is-a-file": ("lm", lambda t, ck: {"--out": _file(t, "taken", b"x")},
                      ["--out", "taken", "is an existing file"]),
    # /proc accepts no new folder or file, whatever its permission bits (and root) say
    "out-cannot-be-created": ("lm", lambda t, ck: {"--out": Path("/proc/fairseq-agg-eval-out")},
                              ["--out /proc/fairseq-agg-eval-out cannot be created", "choose another --out"]),
    "out-is-not-writable": ("mt", lambda t, ck: {"--out": Path("/proc")},
                            ["--out /proc is not writable", "choose another folder"]),
    "data-is-a-file": ("lm", lambda t, ck: {"DATA": _file(t, "train.bin", b"x")},
                       ["train.bin is a file, not a folder", "data-bin folder", "fairseq-preprocess"]),
    "mt-data-is-a-file": ("mt", lambda t, ck: {"DATA": _file(t, "test.de", b"x")},
                          ["test.de is a file, not a folder", "data-bin folder"]),
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


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_in_one_line_before_scoring(case, checkpoints, lm_data, mt_data, tmp_path):
    command, changes, fragments = CASES[case]
    options = {"DATA": lm_data if command == "lm" else mt_data, "--path": checkpoints[command],
               "--out": tmp_path / "out", **changes(tmp_path, checkpoints)}
    data = options.pop("DATA")
    loaded = tmp_path / "checkpoint-loaded"
    argv = [sys.executable, "-c", EVAL_WITH_LOAD_MARKER, str(loaded), command, str(data),
            "--cpu", "--no-progress-bar", *(str(x) for item in options.items() for x in item)]
    if command == "lm":
        argv += ["--num-texts", "2", "--no-training-curves"]
    proc = subprocess.run(argv, capture_output=True, text=True, env=subprocess_env(), cwd=str(REPO), timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-3000:]
    message = lines[0]
    assert message.startswith("fairseq-agg-eval: ")
    for fragment in fragments:
        assert fragment in message, message
    assert not loaded.exists(), message  # refused before the model was loaded,
    assert "[eval]" not in proc.stderr + proc.stdout  # and before any scoring (or anything after it)
    assert not (tmp_path / "out").exists()


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
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "kept.txt").write_text("not the command's\n")
    agg_eval.check_inputs(agg_eval.build_parser().parse_args(
        ["mt", str(mt_data), "--path", str(checkpoints["mt"]), "--out", str(existing)]))
    assert [p.name for p in existing.iterdir()] == ["kept.txt"]  # written to, and left as it was
