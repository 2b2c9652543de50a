"""Bad input gets a clear error that names the problem (issue 2, criterion 6)."""

import re

import pytest
import torch

from fairseq_agg.core import TokenCounter, compute_gates
from fairseq_agg.errors import AggConfigError
from fairseq_agg.fairseq_fixes import saved_counter_state

from _fairseq import USER_DIR, binarize_lm, build, fairseq_train, train_args


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("errors")
    return {"a": binarize_lm(tmp, "a", 400), "b": binarize_lm(tmp, "b", 300)}


@pytest.mark.parametrize("alpha", ["0", "-0.1", "1.5"])
def test_alpha_outside_unit_interval(lm_data, alpha):
    with pytest.raises(ValueError, match=r"--agg-alpha must lie in \(0, 1\]"):
        build(train_args(lm_data["a"], "--agg-alpha", alpha))


def test_alpha_one_is_allowed(lm_data):
    _, _, criterion = build(train_args(lm_data["a"], "--agg-alpha", "1"))
    assert criterion.cfg.agg_alpha == 1.0


@pytest.mark.parametrize("window", ["-3", "0"])
def test_non_positive_window(lm_data, window):
    with pytest.raises(ValueError, match="--agg-window must be a positive number of updates"):
        build(train_args(lm_data["a"], "--agg-window", window))


def test_non_positive_static_after(lm_data):
    with pytest.raises(ValueError, match="--agg-static-after must be a positive"):
        build(train_args(lm_data["a"], "--agg-static-after", "0"))


@pytest.mark.parametrize("fraction", ["0", "1.5"])
def test_study_rare_fraction_outside_the_open_unit_interval(lm_data, fraction):
    # A refusal at criterion construction: fairseq-train prints it as one line (REFUSALS below).
    with pytest.raises(AggConfigError, match=r"--agg-study-rare-fraction must lie in \(0, 1\)"):
        build(train_args(lm_data["a"], "--agg-study", "freeze", "--agg-study-rare-fraction", fraction))


def test_unknown_ablation_mode_on_the_command_line(lm_data):
    result = fairseq_train(train_args(lm_data["a"], "--agg-study", "detach_a"))
    assert result.returncode != 0
    assert "--agg-study" in result.stderr and "invalid choice: 'detach_a'" in result.stderr


def test_unknown_ablation_mode_in_a_config(lm_data):
    from fairseq_agg.criterions.agg_cross_entropy import AggCrossEntropyConfig, AggCrossEntropyCriterion

    task, _, _ = build(train_args(lm_data["a"]))
    cfg = AggCrossEntropyConfig(agg_study="detach_a", sentence_avg=False)
    with pytest.raises(ValueError, match="unknown --agg-study mode 'detach_a'"):
        AggCrossEntropyCriterion(task, cfg)


def test_criterion_on_a_task_that_cannot_feed_it(lm_data):
    with pytest.raises(ValueError, match="use --task language_modeling_agg .* --task translation_agg"):
        build(train_args(lm_data["a"], task="language_modeling"))


REFUSALS = {
    "wrong task": ({"task": "language_modeling"}, [], "needs a task that feeds its token counter: use --task language_modeling_agg"),
    "alpha": ({}, ["--agg-alpha", "1.5"], "--agg-alpha must lie in (0, 1], got 1.5"),
    "amp": ({}, ["--amp"], "do not support --amp"),
    "fp16 on CPU": ({}, ["--fp16"], "--fp16 needs a CUDA GPU and --cpu was given"),
    "coupled adam": ({}, ["--optimizer", "coupled_adam", "--coupled-adam-embeddings", "nonsense"], "--coupled-adam-embeddings"),
    "fully sharded": ({}, ["--ddp-backend", "fully_sharded"],
                      "--criterion agg_cross_entropy cannot train under --ddp-backend fully_sharded"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_start_up_refusals_from_fairseq_train_are_one_line(lm_data, case):
    kwargs, extra, message = REFUSALS[case]
    result = fairseq_train(train_args(lm_data["a"], *extra, **kwargs))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and ": error: " in lines[0] and message in lines[0], result.stderr[-3000:]


def test_amp_is_refused(lm_data):
    # --amp needs CUDA in fairseq's own checks as well; the task refuses it first.
    with pytest.raises(ValueError, match="do not support --amp"):
        build(train_args(lm_data["a"], "--amp"))


def _model_criterion_and_first_batch(args):
    """The model and criterion fairseq builds from ``args``, in training mode, and the first train batch."""
    task, model, criterion = build(args)
    task.load_dataset("train")
    itr = task.get_batch_iterator(task.dataset("train"), max_tokens=256).next_epoch_itr(shuffle=False)
    criterion.train()
    return model, criterion, next(iter(itr))


def test_adaptive_softmax_is_refused(lm_data):
    args = [a for a in train_args(lm_data["a"], "--adaptive-softmax-cutoff", "100,200")
            if a != "--share-decoder-input-output-embed"]
    model, criterion, batch = _model_criterion_and_first_batch(args)
    with pytest.raises(ValueError, match="do not support --adaptive-softmax-cutoff"):
        criterion(model, batch)


def test_a_decoder_without_an_output_projection_is_refused_before_its_forward(lm_data):
    """lstm_lm's decoder takes no features_only: the refusal must come before the forward."""
    args = [lm_data["a"], "--user-dir", USER_DIR, "--task", "language_modeling_agg", "--arch", "lstm_lm",
            "--decoder-layers", "1", "--decoder-embed-dim", "16", "--decoder-hidden-size", "16",
            "--decoder-out-embed-dim", "16", "--criterion", "agg_cross_entropy", "--optimizer", "adam", "--lr", "1e-3",
            "--tokens-per-sample", "16", "--max-tokens", "256", "--cpu", "--no-save", "--disable-validation"]
    model, criterion, batch = _model_criterion_and_first_batch(args)
    with pytest.raises(ValueError, match="need decoder.output_projection to be a bias-free nn.Linear"):
        criterion(model, batch)


def test_checkpoint_counter_of_another_vocabulary(lm_data, tmp_path):
    result = fairseq_train(train_args(lm_data["a"], save_dir=tmp_path / "a"))
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = tmp_path / "a" / "checkpoint_last.pt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    counter_state = saved_counter_state(state)
    assert counter_state["num_updates"] == 1

    # The counter alone refuses it, naming both sizes ...
    task_b, _, _ = build(train_args(lm_data["b"]))
    with pytest.raises(ValueError, match=r"vocabulary of \d+ symbols but this task's target dictionary has \d+"):
        task_b.agg_counter.load_state_dict(counter_state)
    # ... and so does resuming training from it on a dataset with another dictionary, in one line.
    result = fairseq_train(
        train_args(lm_data["b"], "--restore-file", str(checkpoint), "--max-update", "2",
                    save_dir=tmp_path / "b")
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert re.fullmatch(r".*error: cannot resume from \S+checkpoint_last.pt: size mismatch for "
                        r"decoder.embed_tokens.weight: .* or the dictionary differ .*\n", result.stderr), result.stderr


def test_core_rejects_bad_values():
    with pytest.raises(ValueError, match="alpha"):
        compute_gates(torch.zeros(10, dtype=torch.float64), 0.0, 4)
    with pytest.raises(ValueError, match="positive number of updates"):
        TokenCounter(10, 4, window=-1)
    counter = TokenCounter(10, 4, window=3)
    with pytest.raises(ValueError, match="out of range"):
        counter.add(torch.tensor([3, 10]))
