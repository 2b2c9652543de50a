"""End-to-end ``fairseq-train`` runs of the AGG plug-in on the shipped corpora (CPU, tiny models).

Pins the integration half of the contract (DESIGN.md section 2): the plug-in trains LM and MT,
logs plain (label-smoothed) cross-entropy, counts only training targets, carries the counter in
the checkpoint so that a resumed run is bit-identical to an uninterrupted one, loads back with
``--user-dir``, and every ablation / study mode trains.
"""

import math
import re
import shutil

import pytest
import torch

from fairseq_agg.checkpoints import seal_matches
from fairseq_agg.fairseq_fixes import saved_counter_state

from conftest import (
    USER_DIR,
    Run,
    lm_train,
    mt_train,
    run_all,
)

NSPECIAL = 4  # bos, pad, eos, unk
N = 3  # updates before the stop of the stop/resume test


def dictionary_size(data_dir, name="dict.txt") -> int:
    with open(data_dir / name, encoding="utf-8") as f:
        return NSPECIAL + sum(1 for _ in f)


def assert_counter_states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def model_params(ckpt: dict) -> dict:
    return dict(ckpt["model"])


def assert_params_identical(a: dict, b: dict) -> None:
    pa, pb = model_params(a), model_params(b)
    assert pa.keys() == pb.keys()
    different = [k for k in pa if not torch.equal(pa[k], pb[k])]
    assert not different, f"parameters differ: {different}"


def as_float(record: dict, key: str) -> float:
    value = float(record[key])
    assert math.isfinite(value), (key, record)
    return value


# -- language modelling ------------------------------------------------------------------------------
AGG_LM = ["--agg-alpha", "0.5", "--agg-window", "4"]  # a rare group that changes from update to update


@pytest.fixture(scope="module")
def lm_runs(lm_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_runs")
    full = lm_train(lm_data, root / "full", *AGG_LM, "--max-update", 2 * N, "--save-interval-updates", N, name="full")
    first = lm_train(lm_data, root / "resumed", *AGG_LM, "--max-update", N, "--save-interval-updates", N, name="first half")
    plain = lm_train(lm_data, root / "plain", "--max-update", 1, criterion="cross_entropy", name="cross_entropy")
    run_all([full, first, plain])
    resumed = lm_train(lm_data, root / "resumed", *AGG_LM, "--max-update", 2 * N, "--save-interval-updates", N, name="resumed")
    eval_lm = Run(
        "eval_lm",
        [
            lm_data, "--path", root / "full" / "checkpoint_last.pt", "--user-dir", USER_DIR,
            "--task", "language_modeling_agg",  # fairseq-eval-lm's default task would be plain language_modeling
            "--cpu", "--gen-subset", "test", "--tokens-per-sample", "32", "--context-window", "16",
            "--max-tokens", "256", "--num-workers", "0", "--no-progress-bar",
        ],
        name="fairseq-eval-lm",
        subprocess=True,  # the real console entry point, with --user-dir loading the plug-in
    )
    stock_eval_lm = Run(
        "eval_lm",
        [
            lm_data, "--path", root / "full" / "checkpoint_last.pt",
            "--cpu", "--gen-subset", "test", "--tokens-per-sample", "32", "--context-window", "16",
            "--max-tokens", "256", "--num-workers", "0", "--no-progress-bar",
        ],
        name="stock fairseq-eval-lm",
        subprocess=True,  # a fresh process that never imports the plug-in
    )
    run_all([resumed, eval_lm, stock_eval_lm])
    return {"full": full, "first": first, "plain": plain, "resumed": resumed, "eval_lm": eval_lm,
            "stock_eval_lm": stock_eval_lm}


def test_lm_trains_end_to_end(lm_runs, lm_data):
    records = lm_runs["full"].records
    inner = records["train_inner"]
    assert [int(r["num_updates"]) for r in inner] == list(range(1, 2 * N + 1))
    vocab = dictionary_size(lm_data)
    for r in inner:
        loss, nll = as_float(r, "loss"), as_float(r, "nll_loss")
        assert loss == nll  # no label smoothing
        assert 0 < loss < 2 * math.log2(vocab)
        assert as_float(r, "ppl") == pytest.approx(2 ** nll, rel=2e-3)  # ppl of the logged (not doubled) NLL
        assert 0 <= as_float(r, "agg_rare") <= vocab - NSPECIAL
    # Before the first completed update every average count is 0: all non-special tokens are rare.
    assert as_float(inner[0], "agg_rare") == vocab - NSPECIAL
    assert as_float(inner[1], "agg_rare") < vocab - NSPECIAL
    assert records["valid"], "no validation record"
    for r in records["valid"]:
        as_float(r, "valid_loss")
        assert "valid_agg_rare" in r
    assert "train_agg_rare" in records["train"][-1]


def test_lm_logged_loss_is_plain_cross_entropy(lm_runs):
    """Same seed, dropout 0: the first update's loss (before any parameter moved) of
    agg_cross_entropy is the one fairseq's cross_entropy logs, not twice it."""
    agg = lm_runs["full"].records["train_inner"][0]
    plain = lm_runs["plain"].records["train_inner"][0]
    assert agg["loss"] == plain["loss"]
    assert agg["ppl"] == plain["ppl"]  # cross_entropy logs no separate nll_loss: it equals loss
    assert agg["wpb"] == plain["wpb"]


def test_lm_counter_counts_training_targets_of_the_window(lm_runs):
    """The checkpointed counter holds the last K=4 updates, each slot exactly the non-padding
    target tokens of its update as fairseq logged them (wpb); validation at update N and the
    dry-run validation before training add nothing."""
    run = lm_runs["full"]
    counter = saved_counter_state(run.checkpoint())
    assert counter["num_updates"] == 2 * N
    assert counter["window"] == 4
    lengths = counter["slot_lengths"].tolist()
    assert len(lengths) == 4
    totals, offset = [], 0
    for length in lengths:
        totals.append(int(counter["slot_counts"][offset : offset + length].sum()))
        offset += length
    wpb = [int(float(r["wpb"])) for r in run.records["train_inner"]][-4:]
    assert totals == wpb
    assert not bool((counter["slot_ids"] == 1).any())  # padding (index 1) is never counted


def test_lm_stop_and_resume_is_bit_identical(lm_runs):
    full, first, resumed = lm_runs["full"], lm_runs["first"], lm_runs["resumed"]
    assert re.search(rf"Loaded checkpoint \S+checkpoint_last.pt \(epoch 1 @ {N} updates\)", resumed.log)
    a, b = full.checkpoint(), resumed.checkpoint()
    assert a["optimizer_history"][-1]["num_updates"] == b["optimizer_history"][-1]["num_updates"] == 2 * N
    assert_counter_states_equal(saved_counter_state(a), saved_counter_state(b))
    assert_params_identical(a, b)
    # The stop point agrees too, and the resumed run logs the same losses as the full one.
    mid = full.checkpoint(f"checkpoint_1_{N}.pt")
    stop = first.checkpoint(f"checkpoint_1_{N}.pt")  # its checkpoint_last.pt is the resumed run's now
    assert_counter_states_equal(saved_counter_state(mid), saved_counter_state(stop))
    assert_params_identical(mid, stop)
    tail = [(r["num_updates"], r["loss"], r["agg_rare"]) for r in full.records["train_inner"][N:]]
    assert [(r["num_updates"], r["loss"], r["agg_rare"]) for r in resumed.records["train_inner"]] == tail


def test_lm_checkpoint_loads_with_user_dir(lm_runs):
    from argparse import Namespace

    from fairseq import checkpoint_utils, utils

    utils.import_user_module(Namespace(user_dir=USER_DIR))
    path = lm_runs["full"].save_dir / "checkpoint_last.pt"
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(path)])
    assert type(task).__name__ == "LanguageModelingAggTask"
    saved = torch.load(path, map_location="cpu", weights_only=False)
    assert models[0].state_dict().keys() == saved["model"].keys()
    for name, param in models[0].state_dict().items():
        assert torch.equal(param, saved["model"][name]), name
    # Loading for evaluation leaves the task's counter alone: only a training resume restores it.
    assert task.agg_counter.num_updates == 0 and saved_counter_state(saved)["num_updates"] == 2 * N


def test_every_checkpoint_file_carries_a_checksum_that_matches(lm_runs):
    """fairseq's copies (checkpoint_last.pt, checkpoint_best.pt) included; stock fairseq-eval-lm
    reads them (test_stock_eval_lm_scores_an_agg_checkpoint_without_the_plugin)."""
    save_dir = lm_runs["full"].save_dir
    names = sorted(p.name for p in save_dir.iterdir())
    assert {"checkpoint_best.pt", "checkpoint_last.pt", f"checkpoint_1_{N}.pt"} <= set(names)
    assert all(name.startswith("checkpoint") and name.endswith(".pt") for name in names), names  # no temporary files
    for name in names:
        assert seal_matches(save_dir / name) is True, name


@pytest.mark.parametrize("source, criterion", [("plain", "agg_cross_entropy"), ("resumed", "cross_entropy")])
def test_resume_under_another_criterion_is_one_line_naming_reset_optimizer(lm_runs, lm_data, tmp_path, source, criterion):
    save_dir = shutil.copytree(lm_runs[source].save_dir, tmp_path / "copy")
    run = lm_train(lm_data, save_dir, "--max-update", 100, criterion=criterion, name=f"{source} as {criterion}")
    run.wait(check=False)
    assert run.returncode == 2 and "Traceback" not in run.log, run.log[-3000:]
    errors = [line for line in run.log.splitlines() if ": error: " in line]
    trained = "cross_entropy" if source == "plain" else "agg_cross_entropy"
    assert len(errors) == 1, run.log[-3000:]
    assert f"was trained with --criterion {trained} and this run has --criterion {criterion}" in errors[0]
    assert "pass --reset-optimizer" in errors[0]


def test_eval_lm_runs_on_agg_checkpoint(lm_runs):
    log = lm_runs["eval_lm"].log
    match = re.search(r"Loss \(base 2\): ([0-9.]+), Perplexity: ([0-9.]+)", log)
    assert match, log[-3000:]
    loss, ppl = float(match.group(1)), float(match.group(2))
    assert math.isfinite(loss) and ppl == pytest.approx(2 ** loss, rel=1e-3)


# -- translation ----------------------------------------------------------------------------------------
MT_AGG = ["--label-smoothing", "0.1", "--agg-alpha", "0.08"]


@pytest.fixture(scope="module")
def mt_runs(mt_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("mt_runs")
    agg = mt_train(
        mt_data, root / "agg", *MT_AGG, "--max-update", 2, "--save-interval-updates", 1,
        name="mt agg", subprocess=True,  # one training through python -m fairseq_cli.train itself
    )
    first = mt_train(mt_data, root / "resumed", *MT_AGG, "--max-update", 1, name="mt first half")
    plain = mt_train(
        mt_data, root / "plain", "--label-smoothing", "0.1", "--max-update", 1,
        criterion="label_smoothed_cross_entropy", name="mt label_smoothed_cross_entropy",
    )
    run_all([agg, first, plain])
    resumed = mt_train(mt_data, root / "resumed", *MT_AGG, "--max-update", 2, name="mt resumed")
    generate = Run(
        "generate",
        [
            mt_data, "--path", root / "agg" / "checkpoint_last.pt", "--user-dir", USER_DIR,
            "--task", "translation_agg", "--source-lang", "en", "--target-lang", "de",
            "--cpu", "--gen-subset", "test", "--max-tokens", "512", "--beam", "2", "--max-len-b", "5",
            "--num-workers", "0",
        ],
        name="fairseq-generate",
    )
    run_all([resumed, generate])
    return {"agg": agg, "first": first, "plain": plain, "resumed": resumed, "generate": generate}


def test_mt_trains_end_to_end(mt_runs, mt_data):
    run = mt_runs["agg"]
    records = run.records
    inner = records["train_inner"]
    assert [int(r["num_updates"]) for r in inner] == [1, 2]
    vocab = dictionary_size(mt_data, "dict.de.txt")
    for r in inner:
        loss, nll = as_float(r, "loss"), as_float(r, "nll_loss")
        assert 0 < nll < loss < 2 * math.log2(vocab)  # label smoothing raises the loss above the NLL
        assert 0 <= as_float(r, "agg_rare") <= vocab - NSPECIAL
    assert as_float(inner[0], "agg_rare") == vocab - NSPECIAL
    as_float(records["valid"][-1], "valid_loss")
    ckpt = run.checkpoint()
    assert saved_counter_state(ckpt)["num_updates"] == 2
    # --share-all-embeddings: one matrix for encoder input, decoder input and output.
    model = ckpt["model"]
    assert torch.equal(model["encoder.embed_tokens.weight"], model["decoder.embed_tokens.weight"])


def test_mt_logged_loss_is_label_smoothed_cross_entropy(mt_runs):
    agg = mt_runs["agg"].records["train_inner"][0]
    plain = mt_runs["plain"].records["train_inner"][0]
    for key in ("loss", "nll_loss", "ppl", "wpb", "bsz"):
        assert agg[key] == plain[key], key


def test_mt_stop_and_resume_is_bit_identical(mt_runs):
    """Translation checkpoints hold an argparse.Namespace: they must load under torch's
    weights_only default (resuming here, fairseq-generate below)."""
    resumed = mt_runs["resumed"]
    assert re.search(r"Loaded checkpoint \S+checkpoint_last.pt \(epoch 1 @ 1 updates\)", resumed.log)
    a, b = mt_runs["agg"].checkpoint(), resumed.checkpoint()
    assert b["optimizer_history"][-1]["num_updates"] == 2
    assert_counter_states_equal(saved_counter_state(a), saved_counter_state(b))
    assert_params_identical(a, b)


def test_generate_runs_on_agg_checkpoint(mt_runs):
    log = mt_runs["generate"].log
    assert re.search(r"Translated \d+ sentences", log), log[-3000:]
    assert "BLEU4" in log


def test_exported_translation_checkpoint_generates_the_same_without_the_plugin(mt_runs, mt_data, tmp_path):
    import subprocess
    import sys

    from conftest import subprocess_env

    exported = tmp_path / "plain.pt"
    subprocess.run([sys.executable, "-m", "fairseq_agg.export", str(mt_runs["agg"].save_dir / "checkpoint_last.pt"),
                    str(exported)], check=True, env=subprocess_env())
    args = mt_runs["generate"].args
    path_at = [str(a) for a in args].index("--path")
    plain_args = [str(a) for a in args]
    plain_args[path_at + 1] = str(exported)
    for flag in ("--user-dir", "--task"):  # stock fairseq: no plug-in, default translation task
        at = plain_args.index(flag)
        del plain_args[at:at + 2]
    # Stock fairseq 0.12 cannot unpickle its own translation checkpoints (an argparse.Namespace
    # in cfg) under torch's weights-only default; the plug-in allowlists it, stock needs this.
    env = {**subprocess_env(), "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    result = subprocess.run([sys.executable, "-m", "fairseq_cli.generate", *plain_args],
                            capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    def hypotheses(log):
        return sorted(line for line in log.splitlines() if line.startswith("H-"))

    assert hypotheses(result.stdout) and hypotheses(result.stdout) == hypotheses(mt_runs["generate"].log)


# -- ablations and study modes ------------------------------------------------------------------------
ABLATIONS = {
    "static_after": ["--agg-static-after", "2", "--max-update", "4"],
    "no_g1": ["--agg-no-g1", "--max-update", "2"],
    "no_g2": ["--agg-no-g2", "--max-update", "2"],
    "freeze": ["--agg-study", "freeze", "--max-update", "3", "--save-interval-updates", "1"],
    "detach_b": ["--agg-study", "detach_b", "--max-update", "2"],
    "detach_c": ["--agg-study", "detach_c", "--max-update", "2"],
    "detach_bc": ["--agg-study", "detach_bc", "--max-update", "2"],
}


@pytest.fixture(scope="module")
def ablation_runs(lm_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("ablations")
    runs = {
        mode: lm_train(lm_data, root / mode, "--agg-alpha", "0.5", *args, name=f"ablation {mode}")
        for mode, args in ABLATIONS.items()
    }
    run_all(list(runs.values()), check=False)
    return runs


@pytest.mark.parametrize("mode", list(ABLATIONS))
def test_ablation_trains(ablation_runs, mode, lm_data):
    run = ablation_runs[mode]
    assert run.returncode == 0, run.log[-6000:]
    inner = run.records["train_inner"]
    assert len(inner) == int(ABLATIONS[mode][ABLATIONS[mode].index("--max-update") + 1])
    for r in inner:
        as_float(r, "loss")
        as_float(r, "agg_rare")
    vocab = dictionary_size(lm_data)
    if mode.startswith(("freeze", "detach")):
        # The study's static group: the 20% least frequent non-special tokens, every update.
        assert {float(r["agg_rare"]) for r in inner} == {float(int(0.2 * (vocab - NSPECIAL)))}
    if mode == "static_after":
        counter = saved_counter_state(run.checkpoint())
        assert counter["num_updates"] == 4 and len(counter["slot_lengths"]) == 2
        # Gates of updates 3 and 4 both come from the counter frozen after update 2.
        assert inner[2]["agg_rare"] == inner[3]["agg_rare"]


def initial_model_state(run) -> dict:
    """The parameters ``fairseq-train`` starts ``run`` from: fairseq_cli.train seeds numpy and
    torch with --seed, sets up the task and builds the model, in that order."""
    import numpy as np
    from fairseq import options, tasks, utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    parser = options.get_training_parser()
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(parser, input_args=run.args))
    np.random.seed(cfg.common.seed)
    utils.set_torch_seed(cfg.common.seed)
    task = tasks.setup_task(cfg.task)
    return task.build_model(cfg.model).state_dict()


def test_study_freeze_keeps_rare_rows(ablation_runs, lm_data):
    from fairseq.data import Dictionary

    run = ablation_runs["freeze"]
    assert run.returncode == 0, run.log[-6000:]
    dictionary = Dictionary.load(str(lm_data / "dict.txt"))
    # The 20% least frequent tokens, specials and fairseq's padding words madeupword* excluded.
    tokens = [k for k in range(dictionary.nspecial, len(dictionary)) if not dictionary[k].startswith("madeupword")]
    rare = torch.zeros(len(dictionary), dtype=torch.bool)
    rare[sorted(tokens, key=lambda k: (dictionary.count[k], k))[: int(0.2 * len(tokens))]] = True
    key = "decoder.embed_tokens.weight"  # tied with decoder.output_projection.weight
    initial = initial_model_state(run)[key]
    after1 = run.checkpoint("checkpoint_1_1.pt")["model"]
    after3 = run.checkpoint("checkpoint_1_3.pt")["model"]
    assert torch.equal(after3[key], after3["decoder.output_projection.weight"])
    assert torch.equal(after1[key][rare], initial[rare])
    assert torch.equal(after3[key][rare], initial[rare])
    # The others trained (Adam with weight decay moves every one of them).
    assert not torch.equal(after3[key][~rare], initial[~rare])
    assert not torch.equal(after1[key][~rare], after3[key][~rare])


def test_stock_eval_lm_scores_an_agg_checkpoint_without_the_plugin(lm_runs):
    stock, with_plugin = lm_runs["stock_eval_lm"].log, lm_runs["eval_lm"].log
    assert "fairseq_agg" not in stock  # no --user-dir: fairseq's own language_modeling task
    plain = re.search(r"Perplexity: ([0-9.]+)", stock)
    agg = re.search(r"Perplexity: ([0-9.]+)", with_plugin)
    assert plain and agg and plain.group(1) == agg.group(1), stock[-3000:]


def test_exported_checkpoint_loads_in_stock_fairseq(lm_runs, lm_data, tmp_path):
    """fairseq_agg.export makes a checkpoint that fairseq-eval-lm scores without the plug-in,
    with the same perplexity as the plug-in's own task."""
    import subprocess
    import sys

    from conftest import subprocess_env

    exported = tmp_path / "plain.pt"
    subprocess.run([sys.executable, "-m", "fairseq_agg.export", str(lm_runs["full"].save_dir / "checkpoint_last.pt"),
                    str(exported)], check=True, env=subprocess_env())
    state = torch.load(exported, map_location="cpu", weights_only=False)
    assert saved_counter_state(state) is None and state["cfg"]["task"]["_name"] == "language_modeling"
    result = subprocess.run(
        [sys.executable, "-m", "fairseq_cli.eval_lm", str(lm_data), "--path", str(exported), "--cpu",
         "--gen-subset", "test", "--tokens-per-sample", "32", "--context-window", "16", "--max-tokens", "256",
         "--num-workers", "0", "--no-progress-bar"],
        capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    plain = re.search(r"Perplexity: ([0-9.]+)", result.stdout + result.stderr)
    with_plugin = re.search(r"Perplexity: ([0-9.]+)", lm_runs["eval_lm"].log)
    assert plain and with_plugin and plain.group(1) == with_plugin.group(1)


@pytest.mark.parametrize("criterion", ["agg_unlikelihood", "unlikelihood_cross_entropy"])
def test_unlikelihood_stop_and_resume_is_bit_identical(lm_data, tmp_path, criterion):
    extra = AGG_LM if criterion.startswith("agg_") else []
    full = lm_train(lm_data, tmp_path / "full", *extra, "--max-update", 4, criterion=criterion, name="full")
    first = lm_train(lm_data, tmp_path / "resumed", *extra, "--max-update", 2, criterion=criterion, name="first")
    run_all([full, first])
    resumed = lm_train(lm_data, tmp_path / "resumed", *extra, "--max-update", 4, criterion=criterion, name="resumed")
    run_all([resumed])
    a, b = full.checkpoint(), resumed.checkpoint()
    assert b["optimizer_history"][-1]["num_updates"] == 4
    assert_counter_states_equal(saved_counter_state(a), saved_counter_state(b))
    assert saved_counter_state(a)["num_updates"] == 4
    assert_params_identical(a, b)
    tail = [(r["num_updates"], r["loss"], r["ul_loss"]) for r in full.records["train_inner"][2:]]
    assert [(r["num_updates"], r["loss"], r["ul_loss"]) for r in resumed.records["train_inner"]] == tail


# -- I(W) at each validation (paper Figure 2 from the log) -------------------------------------------
@pytest.fixture(scope="module")
def isotropy_runs(lm_data, mt_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("valid_isotropy")
    every_two = ("--max-update", 4, "--validate-interval-updates", 2, "--save-interval-updates", 2)
    runs = [lm_train(lm_data, root / "mle", *every_two, criterion="cross_entropy", name="mle"),
            mt_train(mt_data, root / "mt", *every_two, "--label-smoothing", "0.1", name="mt agg"),
            lm_train(lm_data, root / "off", "--max-update", 2, "--no-valid-isotropy", name="off")]
    return {run.name: run for run in run_all(runs)}


@pytest.mark.parametrize("name", ["mle", "mt agg"])
def test_isotropy_of_the_output_embedding_is_logged_at_each_validation(isotropy_runs, name):
    from fairseq_agg.isotropy import isotropy

    run = isotropy_runs[name]
    logged = {}
    for record in run.records["valid"]:
        logged.setdefault(int(record["valid_num_updates"]), float(record["valid_isotropy"]))
    assert {2, 4} <= set(logged)
    weights = {}
    for update in (2, 4):
        (path,) = run.save_dir.glob(f"checkpoint_*_{update}.pt")
        state = torch.load(path, map_location="cpu", weights_only=False)["model"]
        weights[update] = state.get("decoder.output_projection.weight", state["decoder.embed_tokens.weight"])
        assert logged[update] == pytest.approx(isotropy(weights[update]), abs=6e-5)  # logged to 4 digits
    # Each validation saw the weights of its own update (two updates apart, I(W) may agree to 4 digits).
    assert not torch.equal(weights[2], weights[4])


def test_no_valid_isotropy_turns_it_off(isotropy_runs):
    run = isotropy_runs["off"]
    assert run.records["valid"] and not any("valid_isotropy" in r for r in run.records["valid"])
