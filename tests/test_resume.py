"""Paper-scale runs are interrupted and resumed (issue 12): resume at an epoch boundary and in a
later epoch, with two data-parallel workers, from a torn ``checkpoint_last.pt``, with changed AGG
options; ``--bf16`` without TPU; refusals in one line.

Every resumed run is compared with an uninterrupted one: parameters bit-identical (dropout 0,
one thread) and the same AGG counter. The training set is the 100-line valid slice (21 updates
per epoch in one process, 11 with two workers), so the runs cross into epoch 2 within a few
seconds.
"""

import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from fairseq_agg.fairseq_fixes import saved_counter_state

from conftest import free_port, lm_train, run_all

AGG = ["--agg-alpha", "0.5", "--train-subset", "valid", "--disable-validation"]
EPOCH_UPDATES = 21
STOP_IN_EPOCH_2, END = 24, 26


def assert_same_state(a: dict, b: dict) -> None:
    assert a["optimizer_history"][-1]["num_updates"] == b["optimizer_history"][-1]["num_updates"]
    assert a["model"].keys() == b["model"].keys()
    different = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not different, f"parameters differ: {different}"
    ca, cb = saved_counter_state(a), saved_counter_state(b)
    assert ca.keys() == cb.keys()
    for key in ca:
        assert torch.equal(ca[key], cb[key]) if isinstance(ca[key], torch.Tensor) else ca[key] == cb[key], key


def losses(run, after: int = 0):
    return [(r["num_updates"], r["loss"], r["agg_rare"]) for r in run.records["train_inner"] if int(r["num_updates"]) > after]


def copy_save_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def epoch_runs(lm_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("epoch_resume")
    full = lm_train(lm_data, root / "full", *AGG, "--max-update", END, name="uninterrupted")
    first = lm_train(lm_data, root / "stopped", *AGG, "--max-epoch", 1, name="stopped at the end of epoch 1")
    bf16 = lm_train(lm_data, root / "bf16", *AGG, "--max-update", 3, "--bf16", name="bf16")
    run_all([full, first, bf16])
    second = lm_train(
        lm_data, root / "stopped", *AGG, "--max-update", STOP_IN_EPOCH_2, "--save-interval-updates", STOP_IN_EPOCH_2,
        name="resumed, stopped in epoch 2",
    )
    run_all([second])
    stopped = root / "stopped"
    empty = copy_save_dir(stopped, root / "empty_last")
    (empty / "checkpoint_last.pt").write_bytes(b"")
    truncated = copy_save_dir(stopped, root / "truncated_last")
    data = (truncated / "checkpoint_last.pt").read_bytes()
    (truncated / "checkpoint_last.pt").write_bytes(data[: len(data) // 2])
    alone = root / "truncated_alone"
    alone.mkdir()
    (alone / "checkpoint_last.pt").write_bytes(data[: len(data) // 2])
    changed = copy_save_dir(stopped, root / "changed")
    runs = {
        "full": full, "first": first, "second": second, "bf16": bf16,
        "third": lm_train(lm_data, stopped, *AGG, "--max-update", END, name="resumed in epoch 2"),
        "empty": lm_train(lm_data, empty, *AGG, "--max-update", END, name="resumed from an empty checkpoint_last.pt"),
        "truncated": lm_train(lm_data, truncated, *AGG, "--max-update", END, name="resumed from a truncated checkpoint_last.pt"),
        "alone": lm_train(lm_data, alone, *AGG, "--max-update", END, name="truncated, nothing to fall back to"),
        "changed": lm_train(
            lm_data, changed, "--agg-alpha", "0.4", "--agg-window", "5", "--agg-no-g2", "--train-subset", "valid",
            "--disable-validation", "--max-update", STOP_IN_EPOCH_2 + 1, name="resumed with other AGG options",
        ),
    }
    run_all([runs[k] for k in ("third", "empty", "truncated", "changed")])
    run_all([runs["alone"]], check=False)
    return runs


def test_resume_at_the_end_of_epoch_1_and_in_epoch_2_is_bit_identical(epoch_runs):
    full, first, second, third = (epoch_runs[k] for k in ("full", "first", "second", "third"))
    assert len(first.records["train_inner"]) == EPOCH_UPDATES
    assert re.search(rf"checkpoint_last.pt \(epoch 2 @ {EPOCH_UPDATES} updates\)", second.log)
    assert re.search(rf"checkpoint_last.pt \(epoch 2 @ {STOP_IN_EPOCH_2} updates\)", third.log)
    assert_same_state(full.checkpoint(), third.checkpoint())
    assert losses(first) + losses(second) + losses(third) == losses(full)
    counter = saved_counter_state(full.checkpoint())
    assert counter["window"] == EPOCH_UPDATES and counter["num_updates"] == END  # the window did slide


@pytest.mark.parametrize("torn", ["empty", "truncated"])
def test_torn_checkpoint_last_falls_back_to_the_newest_intact_checkpoint(epoch_runs, torn):
    run = epoch_runs[torn]
    state = "empty" if torn == "empty" else "truncated"
    assert re.search(rf"checkpoint_last.pt is {state} .*resuming from \S+checkpoint_2_{STOP_IN_EPOCH_2}.pt", run.log)
    assert_same_state(epoch_runs["full"].checkpoint(), run.checkpoint())
    assert losses(run) == losses(epoch_runs["full"], after=STOP_IN_EPOCH_2)


def test_torn_checkpoint_last_without_an_intact_one_is_one_line(epoch_runs):
    run = epoch_runs["alone"]
    assert run.returncode == 2
    assert "Traceback" not in run.log
    errors = [line for line in run.log.splitlines() if "error:" in line]
    assert len(errors) == 1 and "checkpoint_last.pt is truncated" in errors[0] and "--restore-file" in errors[0]


def test_resume_with_other_agg_options_says_so(epoch_runs):
    log = epoch_runs["changed"].log
    line = next(line for line in log.splitlines() if "AGG options differ" in line)
    assert "--agg-alpha 0.5 -> 0.4" in line and "--agg-no-g2 False -> True" in line
    assert f"--agg-window {EPOCH_UPDATES} -> 5" in line and f"from update {STOP_IN_EPOCH_2 + 1} on" in line
    assert saved_counter_state(epoch_runs["changed"].checkpoint())["window"] == 5
    assert "AGG options differ" not in epoch_runs["third"].log


def test_bf16_trains_without_the_tpu_path(epoch_runs):
    run = epoch_runs["bf16"]
    assert "xla" not in run.log.lower()
    records = run.records["train_inner"]
    assert len(records) == 3 and all(math.isfinite(float(r["loss"])) for r in records)
    weight = run.checkpoint()["model"]["decoder.embed_tokens.weight"]  # fairseq saves it as float32
    assert torch.equal(weight.to(torch.bfloat16).float(), weight)  # ... but it was trained in bfloat16


def test_bf16_does_not_imply_tpu_under_the_plugin():
    from argparse import Namespace

    from fairseq import options, utils

    utils.import_user_module(Namespace(user_dir=str(Path(__file__).resolve().parents[1] / "fairseq_agg")))
    base = ["data", "--task", "language_modeling", "--arch", "transformer_lm", "--cpu"]
    for flag in ("--bf16", "--memory-efficient-bf16"):
        args = options.parse_args_and_arch(options.get_training_parser(), base + [flag])
        assert args.bf16 and not args.tpu, flag
    args = options.parse_args_and_arch(options.get_training_parser(), base + ["--bf16", "--tpu"])
    assert args.tpu  # an explicit --tpu still means TPU


def test_data_parallel_resume_is_bit_identical(lm_data, tmp_path):
    """Two gloo workers stopped in epoch 2 and resumed without extra flags (fairseq broadcasts
    the checkpoint from rank 0, which torch >= 2.6 unpickles weights-only on rank 1)."""
    end, stop = 14, 12  # epoch 1 is 11 updates with two workers

    def workers(save_dir, max_update, name):
        port = free_port()
        return [
            lm_train(
                lm_data, save_dir, *AGG, "--max-update", max_update,
                "--distributed-world-size", 2, "--distributed-rank", rank, "--distributed-no-spawn",
                "--distributed-init-method", f"tcp://127.0.0.1:{port}",
                "--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp", name=f"{name} rank {rank}",
            )
            for rank in (0, 1)
        ]

    run_all([*workers(tmp_path / "full", end, "uninterrupted"), *workers(tmp_path / "resumed", stop, "stopped")], parallel=4)
    resumed = workers(tmp_path / "resumed", end, "resumed")
    run_all(resumed, parallel=2)
    assert re.search(rf"checkpoint_last.pt \(epoch 2 @ {stop} updates\)", resumed[0].log)
    assert_same_state(torch.load(tmp_path / "full" / "checkpoint_last.pt", map_location="cpu", weights_only=False),
                      resumed[0].checkpoint())
