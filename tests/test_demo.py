"""The demo end to end, in its --quick form: binarize the shipped WikiText-2 slice, train the
MLE and AGG twins on CPU, and check the paper's central claim in miniature."""

import json
import math
import shlex
from importlib.metadata import entry_points

import pytest

from fairseq_agg import demo
from fairseq_agg.workdir import stamp_owner


def test_results_json_written(quick_demo):
    workdir, results = quick_demo
    on_disk = json.loads((workdir / "results.json").read_text())
    assert on_disk["runs"].keys() == {"mle", "agg"}
    assert on_disk["runs"]["agg"]["I(W)"] == pytest.approx(results["runs"]["agg"]["I(W)"])
    for name in ("mle", "agg"):
        assert (workdir / name / "checkpoint_last.pt").is_file()
        assert (workdir / name / "train.log").is_file()


def test_both_models_trained_with_finite_perplexity(quick_demo):
    _, results = quick_demo
    for name in ("mle", "agg"):
        run = results["runs"][name]
        assert run["num_updates"] == results["settings"]["max_update"]
        for split in ("valid_ppl", "test_ppl"):
            assert math.isfinite(run[split]) and 1.0 < run[split] < run["vocab_size"]


def test_agg_has_a_rare_group(quick_demo):
    _, results = quick_demo
    agg = results["runs"]["agg"]
    assert 0 < agg["rare_group_size"] < agg["vocab_size"]
    assert results["runs"]["mle"].get("rare_group_size") is None


def test_agg_output_embedding_is_more_isotropic(quick_demo):
    _, results = quick_demo
    mle, agg = results["runs"]["mle"]["I(W)"], results["runs"]["agg"]["I(W)"]
    assert 0.0 < mle <= 1.0 and 0.0 < agg <= 1.0
    assert agg > mle, f"I(W): AGG {agg:.3f} should exceed MLE {mle:.3f}"


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="lacks wiki.train.tokens"):
        demo.main(["--data", str(tmp_path), "--workdir", str(tmp_path / "work")])


def test_the_hf_demo_names_missing_data_files_and_the_option(tmp_path):
    with pytest.raises(SystemExit) as refused:
        demo.main(["--framework", "hf", "--data", str(tmp_path), "--workdir", str(tmp_path / "work")])
    assert str(refused.value) == (f"fairseq_agg.hf_demo: --data: {tmp_path} lacks wiki.train.tokens, wiki.valid.tokens, "
                                  "wiki.test.tokens")
    assert not (tmp_path / "work").exists()


def test_seeds_give_each_seed_and_numpys_mean_and_sample_std(tmp_path):
    """--seeds trains every model once per seed (here a tiny model for a few updates)."""
    import numpy as np

    workdir = tmp_path / "seeds"
    results = demo.run_demo(["--seeds", "1", "2", "3", "--max-update", "3", "--embed-dim", "16", "--layers", "1",
                             "--threshold", "20", "--tokens-per-sample", "32", "--max-tokens", "256",
                             "--workdir", str(workdir), "--jobs", "2"])
    on_disk = json.loads((workdir / "results.json").read_text())
    assert on_disk["settings"]["seeds"] == [1, 2, 3] and "ddof=1" in on_disk["std"]
    for name in ("mle", "agg"):
        run = on_disk["runs"][name]
        assert run["n"] == 3 and sorted(run["seeds"]) == ["1", "2", "3"]
        for key in ("I(W)", "IsoScore", "I(W) rare", "test_ppl"):
            per_seed = [run["seeds"][s][key] for s in ("1", "2", "3")]
            assert run["mean"][key] == pytest.approx(np.mean(per_seed), rel=1e-12)
            assert run["std"][key] == pytest.approx(np.std(per_seed, ddof=1), rel=1e-9)
        for seed in (1, 2, 3):
            assert (workdir / f"{name}-seed{seed}" / "checkpoint_last.pt").is_file()
    # a re-run may replace what this one wrote: each folder carries the demo's stamp
    made = [workdir, workdir / "data-bin", *(workdir / f"{n}-seed{s}" for n in ("mle", "agg") for s in (1, 2, 3))]
    assert {stamp_owner(folder) for folder in made} == {"fairseq-agg-demo"}
    # the seeds differ (else the std says nothing)
    assert len({on_disk["runs"]["mle"]["seeds"][s]["I(W)"] for s in ("1", "2", "3")}) == 3
    table = demo.format_table(results["runs"])
    mean, std = results["runs"]["agg"]["mean"]["I(W)"], results["runs"]["agg"]["std"]["I(W)"]
    assert f"{mean:.3f} ± {std:.3f}" in table


# A demo that trains one tiny model for one update: what a refused run would otherwise have started.
TINY = ["--runs", "agg", "--max-update", "1", "--embed-dim", "16", "--layers", "1", "--threshold", "20",
        "--tokens-per-sample", "32", "--max-tokens", "256", "--jobs", "1"]
HF_TINY = ["--framework", "hf", "--max-steps", "1", "--train-lines", "40", "--eval-lines", "10", "--block-size", "16",
           "--batch-size", "2", "--embed-dim", "16", "--layers", "1", "--jobs", "2"]


def refusal_line(capsys, argv) -> str:
    """The one stderr line of a refused ``fairseq-agg-demo ARGV``, which must exit with status 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        demo.main(argv)
    assert refused.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_a_workdir_the_demo_did_not_write_is_refused_and_left_alone(tmp_path, capsys):
    workdir = tmp_path / "mine"
    (workdir / "agg").mkdir(parents=True)
    (workdir / "agg" / "checkpoint_best.pt").write_text("the user's model")
    line = refusal_line(capsys, ["--workdir", str(workdir), *TINY])
    assert line == (f"fairseq-agg-demo: error: {workdir} holds files that fairseq-agg-demo did not write "
                    "(no .fairseq-agg-owner stamp); pass another --workdir or remove it yourself")
    assert (workdir / "agg" / "checkpoint_best.pt").read_text() == "the user's model"
    assert sorted(p.relative_to(workdir).as_posix() for p in workdir.rglob("*")) == ["agg", "agg/checkpoint_best.pt"]


@pytest.mark.parametrize("folder", ["data-bin", "agg"])
def test_a_folder_the_demo_would_replace_in_its_own_workdir_must_be_its_own(tmp_path, capsys, folder):
    workdir = demo.OWNER.claim(tmp_path / "demo")  # as a finished or interrupted demo leaves it
    (workdir / folder).mkdir()
    (workdir / folder / "dict.txt").write_text("the user's")
    line = refusal_line(capsys, ["--workdir", str(workdir), *TINY])
    assert line.startswith(f"fairseq-agg-demo: error: {workdir / folder} holds files that fairseq-agg-demo did not")
    assert (workdir / folder / "dict.txt").read_text() == "the user's"
    assert sorted(p.name for p in workdir.iterdir()) == sorted([".fairseq-agg-owner", folder])


def test_the_hf_demo_refuses_a_workdir_it_did_not_write(tmp_path, capsys):
    (tmp_path / "mle.result.json").write_text("the user's")
    line = refusal_line(capsys, [*HF_TINY, "--workdir", str(tmp_path)])
    assert line == (f"python -m fairseq_agg.hf_demo: error: {tmp_path} holds files that fairseq_agg.hf_demo did not "
                    "write (no .fairseq-agg-owner stamp); pass another --workdir or remove it yourself")
    assert [p.name for p in tmp_path.iterdir()] == ["mle.result.json"]
    assert (tmp_path / "mle.result.json").read_text() == "the user's"


def test_the_printed_evaluation_command_runs_as_printed_on_cpu(tmp_path, capsys):
    """The demo ends with a fairseq-agg-eval command per model for the user to run next: quoted for
    a shell (the workdir here holds a space) and on the CPU the demo trained on. The run log's first
    line is the training command, quoted the same way."""
    data = tmp_path / "data"
    data.mkdir()
    for split, lines in (("train", 300), ("valid", 30), ("test", 30)):
        text = (demo.REPO_DATA / f"wiki.{split}.tokens").read_text(encoding="utf-8")
        (data / f"wiki.{split}.tokens").write_text("".join(text.splitlines(keepends=True)[:lines]), encoding="utf-8")
    workdir = tmp_path / "demo run"
    demo.run_demo(["--data", str(data), "--workdir", str(workdir), *TINY, "--threshold", "3"])
    prefix = "full evaluation (tables, figures): "
    printed = [line[len(prefix):] for line in capsys.readouterr().out.splitlines() if line.startswith(prefix)]
    assert len(printed) == 1, printed
    argv = shlex.split(printed[0])
    assert argv == ["fairseq-agg-eval", "lm", str(workdir / "data-bin"), "--path", str(workdir / "agg" / "checkpoint_last.pt"),
                    "--out", str(workdir / "eval" / "agg"), "--cpu"]
    (tool,) = entry_points(group="console_scripts", name=argv[0])
    assert tool.load()([*argv[1:], "--num-texts", "2", "--no-progress-bar"]) == 0  # fewer continuations: time
    assert json.loads((workdir / "eval" / "agg" / "results.json").read_text())["isotropy"]["total"] > 0
    logged = (workdir / "agg" / "train.log").read_text(encoding="utf-8").splitlines()[0]
    assert logged.startswith("$ ") and "(0.9, 0.98)" in shlex.split(logged[2:])
