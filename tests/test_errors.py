"""Bad input gets a clear error that names the problem (issue 2, criterion 6)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fairseq_agg.core import TokenCounter, compute_gates

REPO = Path(__file__).resolve().parents[1]
USER_DIR = str(REPO / "fairseq_agg")
CORPUS = REPO / "data" / "wikitext-2"


def _head(src: Path, dst: Path, n: int) -> str:
    with open(src, encoding="utf-8") as f:
        lines = [next(f) for _ in range(n)]
    dst.write_text("".join(lines), encoding="utf-8")
    return str(dst)


def _binarize(tmp: Path, name: str, nwords: int) -> str:
    train = _head(CORPUS / "wiki.train.tokens", tmp / f"{name}.train", 150)
    valid = _head(CORPUS / "wiki.valid.tokens", tmp / f"{name}.valid", 30)
    dest = tmp / name
    subprocess.run(
        ["fairseq-preprocess", "--only-source", "--trainpref", train, "--validpref", valid,
         "--destdir", str(dest), "--nwordssrc", str(nwords), "--workers", "1"],
        check=True, capture_output=True,
    )
    return str(dest)


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("errors")
    return {"a": _binarize(tmp, "a", 400), "b": _binarize(tmp, "b", 300)}


def _train_args(data, *extra, task="language_modeling_agg", save_dir=None):
    args = [
        data, "--user-dir", USER_DIR, "--task", task, "--arch", "transformer_lm",
        "--decoder-layers", "1", "--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "32",
        "--decoder-attention-heads", "2", "--share-decoder-input-output-embed",
        "--criterion", "agg_cross_entropy", "--optimizer", "adam", "--lr", "1e-3",
        "--tokens-per-sample", "16", "--max-tokens", "256", "--cpu", "--no-progress-bar",
        "--max-update", "1", "--no-epoch-checkpoints", "--disable-validation",
    ]
    if save_dir is not None:
        args += ["--save-dir", str(save_dir)]
    else:
        args += ["--no-save"]
    return args + list(extra)


def _build(args):
    """The objects fairseq-train would build, in process."""
    from fairseq import options, tasks, utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    parser = options.get_training_parser()
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(parser, args))
    utils.import_user_module(cfg.common)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    return task, model, task.build_criterion(cfg.criterion)


def _fairseq_train(args):
    return subprocess.run(
        [sys.executable, "-m", "fairseq_cli.train", *args],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


@pytest.mark.parametrize("alpha", ["0", "-0.1", "1.5"])
def test_alpha_outside_unit_interval(lm_data, alpha):
    with pytest.raises(ValueError, match=r"--agg-alpha must lie in \(0, 1\]"):
        _build(_train_args(lm_data["a"], "--agg-alpha", alpha))


def test_alpha_one_is_allowed(lm_data):
    _, _, criterion = _build(_train_args(lm_data["a"], "--agg-alpha", "1"))
    assert criterion.cfg.agg_alpha == 1.0


@pytest.mark.parametrize("window", ["-3", "0"])
def test_non_positive_window(lm_data, window):
    with pytest.raises(ValueError, match="--agg-window must be a positive number of updates"):
        _build(_train_args(lm_data["a"], "--agg-window", window))


def test_non_positive_static_after(lm_data):
    with pytest.raises(ValueError, match="--agg-static-after must be a positive"):
        _build(_train_args(lm_data["a"], "--agg-static-after", "0"))


def test_unknown_ablation_mode_on_the_command_line(lm_data):
    result = _fairseq_train(_train_args(lm_data["a"], "--agg-study", "detach_a"))
    assert result.returncode != 0
    assert "--agg-study" in result.stderr and "invalid choice: 'detach_a'" in result.stderr


def test_unknown_ablation_mode_in_a_config(lm_data):
    from fairseq_agg.criterions.agg_cross_entropy import AggCrossEntropyConfig, AggCrossEntropyCriterion

    task, _, _ = _build(_train_args(lm_data["a"]))
    cfg = AggCrossEntropyConfig(agg_study="detach_a", sentence_avg=False)
    with pytest.raises(ValueError, match="unknown --agg-study mode 'detach_a'"):
        AggCrossEntropyCriterion(task, cfg)


def test_criterion_on_a_task_that_cannot_feed_it(lm_data):
    with pytest.raises(ValueError, match="use --task language_modeling_agg .* --task translation_agg"):
        _build(_train_args(lm_data["a"], task="language_modeling"))


def test_criterion_on_a_task_that_cannot_feed_it_from_fairseq_train(lm_data):
    result = _fairseq_train(_train_args(lm_data["a"], task="language_modeling"))
    assert result.returncode != 0
    assert "needs a task that feeds its token counter" in result.stderr


def test_amp_is_refused(lm_data):
    # --amp needs CUDA in fairseq's own checks as well; the task refuses it first.
    with pytest.raises(ValueError, match="do not support --amp"):
        _build(_train_args(lm_data["a"], "--amp"))


def test_adaptive_softmax_is_refused(lm_data):
    args = [a for a in _train_args(lm_data["a"], "--adaptive-softmax-cutoff", "100,200")
            if a != "--share-decoder-input-output-embed"]
    task, model, criterion = _build(args)
    task.load_dataset("train")
    itr = task.get_batch_iterator(task.dataset("train"), max_tokens=256).next_epoch_itr(shuffle=False)
    criterion.train()
    with pytest.raises(ValueError, match="do not support --adaptive-softmax-cutoff"):
        criterion(model, next(iter(itr)))


def test_checkpoint_counter_of_another_vocabulary(lm_data, tmp_path):
    result = _fairseq_train(_train_args(lm_data["a"], save_dir=tmp_path / "a"))
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = tmp_path / "a" / "checkpoint_last.pt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    counter_state = state["model"]["agg_counter._extra_state"]
    assert counter_state["num_updates"] == 1

    # The counter alone refuses it, naming both sizes ...
    task_b, model_b, _ = _build(_train_args(lm_data["b"]))
    with pytest.raises(ValueError, match=r"vocabulary of \d+ symbols but this task's target dictionary has \d+"):
        model_b.agg_counter.set_extra_state(counter_state)
    # ... and so does resuming training from it on a dataset with another dictionary.
    result = _fairseq_train(
        _train_args(lm_data["b"], "--restore-file", str(checkpoint), "--max-update", "2",
                    save_dir=tmp_path / "b")
    )
    assert result.returncode != 0
    assert "AGG token counter covers a vocabulary of" in result.stderr


def test_core_rejects_bad_values():
    with pytest.raises(ValueError, match="alpha"):
        compute_gates(torch.zeros(10, dtype=torch.float64), 0.0, 4)
    with pytest.raises(ValueError, match="positive number of updates"):
        TokenCounter(10, 4, window=-1)
    counter = TokenCounter(10, 4, window=3)
    with pytest.raises(ValueError, match="out of range"):
        counter.add(torch.tensor([3, 10]))
