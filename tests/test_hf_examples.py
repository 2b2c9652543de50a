"""Smoke runs (seconds) of ``examples/nanogpt_agg.py``, ``examples/hf_agg.py`` and
``fairseq_agg.hf_demo`` with tiny settings."""

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.usefixtures("one_thread")
def test_nanogpt_example(capsys):
    result = _load("nanogpt_agg").main(["--steps", "6", "--lines", "60", "--block", "32", "--batch", "4"])
    assert result["rare"] is not None and result["valid_ppl"] > 1 and 0 < result["I(W)"] <= 1
    assert "AGG: valid perplexity" in capsys.readouterr().out


def test_nanogpt_help_shows_the_whole_description_and_every_default(capsys):
    with pytest.raises(SystemExit):
        _load("nanogpt_agg").main(["--help"])
    out = capsys.readouterr().out
    assert "The lines that AGG adds to a loop are marked" in out  # the description is not cut short
    assert "(default: 300)" in out and "(default: 0.03)" in out and "--quick" in out


def test_nanogpt_quick_mode_is_a_short_run_unless_told_otherwise():
    parse = _load("nanogpt_agg").parse_args
    quick, full = parse(["--quick"]), parse([])
    assert (quick.steps, quick.lines) == (30, 2000) and (full.steps, full.lines) == (300, None)
    told = parse(["--quick", "--steps", "3", "--lines=50"])
    assert (told.steps, told.lines) == (3, 50)


@pytest.mark.usefixtures("one_thread")
def test_hf_example(tmp_path):
    trainer = _load("hf_agg").main(["--output_dir", str(tmp_path), "--max_steps", "2", "--lines", "30",
                                    "--block-size", "32", "--per_device_train_batch_size", "2", "--logging_steps", "1"])
    assert trainer.agg.num_updates == 2 and trainer.agg.vocab_size == 50257
    assert any("agg_rare" in entry for entry in trainer.state.log_history)


TINY = ["--max-steps", "3", "--train-lines", "80", "--eval-lines", "20", "--block-size", "32", "--batch-size", "2",
        "--embed-dim", "16", "--layers", "1"]


def test_hf_demo_word_level_in_two_processes(tmp_path, capfd):
    """Two runs side by side: the fairseq demo's table, every line of a run named by its run, and
    no transformers warning about the model's loss_type."""
    from fairseq_agg import demo
    from fairseq_agg.hf_demo import run_hf_demo

    results = run_hf_demo([*TINY, "--jobs", "2", "--workdir", str(tmp_path)])
    assert set(results["runs"]) == {"mle", "agg"}
    for name, run in results["runs"].items():
        assert run["num_updates"] == 3 and run["valid_ppl"] > 1, name
        for key in ("I(W)", "I(W) frequent", "I(W) medium", "I(W) rare", "IsoScore", "IsoScore rare"):
            assert 0 < run[key] <= 1, (name, key)
    assert results["runs"]["mle"]["rare_group_size"] is None and results["runs"]["agg"]["rare_group_size"] > 0
    assert json.loads((tmp_path / "results.json").read_text())["runs"] == results["runs"]
    out, err = capfd.readouterr()
    header_and_progress, table = out.split("\n\n")[:2]
    assert table == demo.format_table(results["runs"])  # the rows of demo.TABLE_ROWS
    progress = header_and_progress.splitlines()[1:]
    for line in progress:
        assert line.startswith(("[mle] ", "[agg] ")), line
    progress = "\n".join(progress)
    for name in ("mle", "agg"):
        assert f"[{name}] step 3/3: train_runtime" in progress and f"[{name}] done: valid ppl" in progress
    assert "loss_type" not in out + err


@pytest.mark.usefixtures("one_thread")
def test_hf_demo_gpt2_bpe(tmp_path, capsys):
    from fairseq_agg import demo
    from fairseq_agg.hf_demo import run_hf_demo

    results = run_hf_demo([*TINY, "--tokenizer", "gpt2-bpe", "--jobs", "1", "--workdir", str(tmp_path)])
    # one run after the other in this process: each progress line still names its run
    progress = capsys.readouterr().out.split("\n\n")[0].splitlines()[1:]
    assert progress and all(line.startswith(("[mle] ", "[agg] ")) for line in progress), progress
    mle, agg = results["runs"]["mle"], results["runs"]["agg"]
    assert mle["vocab_size"] == agg["vocab_size"] < 50257  # BPE ids of the train lines, renumbered
    assert mle["num_updates"] == agg["num_updates"] == 3 and agg["rare_group_size"] > 0
    # python -m fairseq_agg.demo --framework hf runs the same demo
    assert demo.main(["--framework", "hf", *TINY, "--jobs", "1", "--workdir", str(tmp_path / "via-demo"), "--runs", "agg"]) == 0
    assert json.loads((tmp_path / "via-demo" / "results.json").read_text())["runs"]["agg"]["num_updates"] == 3
