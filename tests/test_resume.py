"""Paper-scale runs are interrupted and resumed (issues 12 and 19): resume at an epoch boundary and
in a later epoch, with two data-parallel workers, from a torn or damaged ``checkpoint_last.pt``
(falling back to the checkpoint with the most updates), with changed or dropped AGG options;
fine-tuning and the AGG counter; ``--bf16`` without TPU; refusals in one line that name a
command that works.

Every resumed run is compared with an uninterrupted one: parameters bit-identical (dropout 0,
one thread) and the same AGG counter. The training set is the 100-line valid slice (21 updates
per epoch in one process, 11 with two workers), so the runs cross into epoch 2 within a few
seconds.
"""

import math
import os
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch

from fairseq_agg.fairseq_fixes import saved_counter_state

from _checkpoint_damage import zero_inside_largest_tensor
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
        lm_data, root / "stopped", *AGG, "--max-update", STOP_IN_EPOCH_2, "--save-interval-updates", 2,
        name="resumed, stopped in epoch 2",  # checkpoint_2_22.pt and checkpoint_2_24.pt
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
    at_stop = copy_save_dir(stopped, root / "stopped_in_epoch_2")  # kept as it is: "third" goes on in stopped
    # An older checkpoint with a newer file time (a copy, a restore from backup): the fallback
    # must go by the updates each file records.
    touched = copy_save_dir(truncated, root / "older_touched_last")
    later = (touched / "checkpoint_last.pt").stat().st_mtime + 60
    os.utime(touched / f"checkpoint_2_{STOP_IN_EPOCH_2 - 2}.pt", (later, later))
    zeroed = copy_save_dir(stopped, root / "zeroed_last")
    zero_inside_largest_tensor(zeroed / "checkpoint_last.pt")
    runs = {
        "full": full, "first": first, "second": second, "bf16": bf16, "stopped_in_epoch_2": at_stop,
        "third": lm_train(lm_data, stopped, *AGG, "--max-update", END, name="resumed in epoch 2"),
        "empty": lm_train(lm_data, empty, *AGG, "--max-update", END, name="resumed from an empty checkpoint_last.pt"),
        "truncated": lm_train(lm_data, truncated, *AGG, "--max-update", END, name="resumed from a truncated checkpoint_last.pt"),
        "alone": lm_train(lm_data, alone, *AGG, "--max-update", END, name="truncated, nothing to fall back to"),
        "touched": lm_train(lm_data, touched, *AGG, "--max-update", END, name="truncated, an older checkpoint touched"),
        "zeroed": lm_train(lm_data, zeroed, *AGG, "--max-update", END, name="4 KiB zeroed in checkpoint_last.pt"),
        "changed": lm_train(
            lm_data, changed, "--agg-alpha", "0.4", "--agg-window", "5", "--agg-no-g2", "--train-subset", "valid",
            "--disable-validation", "--max-update", STOP_IN_EPOCH_2 + 1, name="resumed with other AGG options",
        ),
    }
    run_all([runs[k] for k in ("third", "empty", "truncated", "changed", "touched", "zeroed")])
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
def test_torn_checkpoint_last_falls_back_to_the_intact_checkpoint_with_the_most_updates(epoch_runs, torn):
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
    assert len(errors) == 1 and "checkpoint_last.pt is truncated" in errors[0], errors
    assert "no other checkpoint in" in errors[0] and "move checkpoint_last.pt out of that folder" in errors[0]


def test_fallback_goes_by_the_updates_a_checkpoint_records_not_by_file_time(epoch_runs):
    run = epoch_runs["touched"]
    assert re.search(rf"checkpoint_last.pt is truncated .*resuming from \S+checkpoint_2_{STOP_IN_EPOCH_2}.pt "
                     rf"\({STOP_IN_EPOCH_2} updates\)", run.log), run.log[-3000:]
    assert losses(run) == losses(epoch_runs["full"], after=STOP_IN_EPOCH_2)
    assert_same_state(epoch_runs["full"].checkpoint(), run.checkpoint())


def test_checkpoint_that_fails_its_checksum_is_not_resumed(epoch_runs, tmp_path):
    run = epoch_runs["zeroed"]
    # torch.load reads the damaged file without a word: only the checksum tells.
    damaged = tmp_path / "damaged.pt"
    zero_inside_largest_tensor(shutil.copyfile(epoch_runs["stopped_in_epoch_2"] / "checkpoint_2_24.pt", damaged))
    torch.load(damaged, map_location="cpu", weights_only=False)
    assert re.search(rf"checkpoint_last.pt fails its checksum .*resuming from \S+checkpoint_2_{STOP_IN_EPOCH_2}.pt",
                     run.log), run.log[-3000:]
    assert_same_state(epoch_runs["full"].checkpoint(), run.checkpoint())


def test_resume_with_other_agg_options_says_so(epoch_runs):
    log = epoch_runs["changed"].log
    line = next(line for line in log.splitlines() if "AGG options differ" in line)
    assert "--agg-alpha 0.5 -> 0.4" in line and "--agg-no-g2 False -> True" in line
    assert f"--agg-window {EPOCH_UPDATES} -> 5" in line and f"from update {STOP_IN_EPOCH_2 + 1} on" in line
    assert saved_counter_state(epoch_runs["changed"].checkpoint())["window"] == 5
    assert "AGG options differ" not in epoch_runs["third"].log


def error_lines(run) -> list:
    assert run.returncode == 2 and "Traceback" not in run.log, run.log[-3000:]
    errors = [line for line in run.log.splitlines() if ": error: " in line]
    assert len(errors) == 1, run.log[-3000:]
    return errors


def succeeded(run):
    assert run.returncode == 0, f"{run.name} exited with {run.returncode}:\n{run.log[-3000:]}"
    return run


def suggested_restore_file(run) -> str:
    """The --restore-file that the one-line refusal of ``run`` ends with ("" when there is none)."""
    match = re.search(r": error: .*--restore-file (\S+)$", run.log, re.MULTILINE)
    return shlex.split(match.group(1))[0] if match else ""


def files_of(folder: Path) -> dict:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def restart_runs(epoch_runs, lm_data, tmp_path_factory):
    """Refused resumes (a --restore-file that does not exist or is torn, a --max-update already
    reached), the commands their messages suggest, a resume that drops every AGG option, and
    fine-tuning from a checkpoint trained with --agg-window 5."""
    root = tmp_path_factory.mktemp("restarts")
    stopped, changed = epoch_runs["stopped_in_epoch_2"], epoch_runs["changed"].save_dir
    refused = copy_save_dir(stopped, root / "refused")
    torn = copy_save_dir(stopped, root / "torn_explicit")
    data = (torn / "checkpoint_2_24.pt").read_bytes()
    (torn / "checkpoint_2_24.pt").write_bytes(data[: len(data) // 2])
    dropped = copy_save_dir(changed, root / "dropped")
    source = changed / "checkpoint_last.pt"  # 25 updates, --agg-window 5
    runs = {
        "in_save_dir": lm_train(lm_data, refused, *AGG, "--max-update", END, "--restore-file", "checkpoint_2_24.pt",
                                name="--restore-file relative to --save-dir"),
        "nowhere": lm_train(lm_data, refused, *AGG, "--max-update", END, "--restore-file", "checkpoint9.pt",
                            name="--restore-file that does not exist"),
        "torn": lm_train(lm_data, torn, *AGG, "--max-update", END, "--restore-file", torn / "checkpoint_2_24.pt",
                         name="--restore-file that is torn"),
        "reached": lm_train(lm_data, refused, *AGG, "--max-update", 3, name="--max-update already reached"),
    }
    before = files_of(refused)
    run_all(list(runs.values()), check=False)
    runs["refused_files"] = (before, files_of(refused))
    for case, save_dir in (("in_save_dir", refused), ("torn", torn)):
        runs[f"follow_{case}"] = lm_train(
            lm_data, save_dir, *AGG, "--max-update", STOP_IN_EPOCH_2 + 1,
            "--restore-file", suggested_restore_file(runs[case]) or "none suggested", name=f"as suggested ({case})")
    runs["dropped"] = lm_train(lm_data, dropped, "--train-subset", "valid", "--disable-validation",
                               "--max-update", STOP_IN_EPOCH_2 + 2, name="resumed without AGG options")
    runs["finetune"] = lm_train(lm_data, root / "finetune", *AGG, "--max-update", 1, "--finetune-from-model", source,
                                name="--finetune-from-model")
    runs["finetune_keep"] = lm_train(lm_data, root / "finetune_keep", *AGG, "--max-update", 1, "--finetune-from-model",
                                     source, "--agg-keep-counter", name="--finetune-from-model --agg-keep-counter")
    runs["reset_optimizer"] = lm_train(lm_data, root / "reset_optimizer", *AGG, "--max-update", 1, "--reset-optimizer",
                                       "--restore-file", source, name="--reset-optimizer")
    run_all([runs[k] for k in ("follow_in_save_dir", "follow_torn", "dropped", "finetune", "finetune_keep",
                               "reset_optimizer")], check=False)
    return runs


def test_restore_file_that_does_not_exist_is_refused_with_nothing_written(restart_runs):
    before, after = restart_runs["refused_files"]
    assert before == after
    (error,) = error_lines(restart_runs["nowhere"])
    assert "--restore-file checkpoint9.pt does not exist" in error
    assert "holds checkpoint_2_22.pt, checkpoint_2_24.pt, checkpoint_last.pt" in error
    (error,) = error_lines(restart_runs["in_save_dir"])
    assert "not from --save-dir" in error


@pytest.mark.parametrize("case", ["in_save_dir", "torn"])
def test_the_restore_file_a_refusal_suggests_resumes(restart_runs, case):
    (error,) = error_lines(restart_runs[case])
    suggested = suggested_restore_file(restart_runs[case])
    assert Path(suggested).is_absolute()  # fairseq reads a relative one from the current folder
    if case == "torn":
        assert "checkpoint_2_24.pt is truncated" in error and suggested.endswith("checkpoint_last.pt")
    run = succeeded(restart_runs[f"follow_{case}"])
    assert f"Loaded checkpoint {suggested} (epoch 2 @ {STOP_IN_EPOCH_2} updates)" in run.log
    assert [int(r[0]) for r in losses(run)] == [STOP_IN_EPOCH_2 + 1]


def test_max_update_already_reached_is_refused_with_nothing_written(restart_runs):
    (error,) = error_lines(restart_runs["reached"])
    assert f"has trained {STOP_IN_EPOCH_2} updates, and --max-update is 3" in error and "--reset-optimizer" in error
    before, after = restart_runs["refused_files"]
    assert before == after


def test_resume_takes_every_agg_option_from_the_command_line(restart_runs):
    """The checkpoint had --agg-alpha 0.4 --agg-no-g2 --agg-window 5; the resume names none."""
    run = succeeded(restart_runs["dropped"])
    counter = saved_counter_state(run.checkpoint())
    assert counter["window"] == EPOCH_UPDATES and counter["num_updates"] == STOP_IN_EPOCH_2 + 2
    (line,) = [line for line in run.log.splitlines() if "AGG options differ" in line]
    assert "--agg-alpha 0.4 -> 0.03" in line and "--agg-no-g2 True -> False" in line
    assert f"--agg-window 5 -> {EPOCH_UPDATES} (one epoch, the default)" in line
    assert f"from update {STOP_IN_EPOCH_2 + 2} on" in line


@pytest.mark.parametrize("case", ["finetune", "reset_optimizer"])
def test_fine_tuning_starts_a_fresh_counter(restart_runs, epoch_runs, case):
    run = succeeded(restart_runs[case])
    counter = saved_counter_state(run.checkpoint())
    assert counter["num_updates"] == 1 and counter["window"] == EPOCH_UPDATES
    # The first update's gates come from an empty counter, as in a run from scratch.
    from_scratch = epoch_runs["full"].records["train_inner"][0]["agg_rare"]
    assert run.records["train_inner"][0]["agg_rare"] == from_scratch
    option = "--finetune-from-model" if case == "finetune" else "--reset-optimizer"
    assert f"{option}: a new training from the checkpoint, with a fresh AGG token counter from update 1 on" in run.log
    (line,) = [line for line in run.log.splitlines() if "AGG options differ" in line]
    assert f"--agg-window 5 -> {EPOCH_UPDATES} (one epoch, the default)" in line and "from update 1 on" in line


def test_agg_keep_counter_continues_the_checkpoints_counter(restart_runs, epoch_runs):
    run = succeeded(restart_runs["finetune_keep"])
    assert ("--agg-keep-counter: the new training (--finetune-from-model) continues the checkpoint's AGG token "
            f"counter ({STOP_IN_EPOCH_2 + 1} updates)") in run.log
    assert run.records["train_inner"][0]["agg_rare"] != epoch_runs["full"].records["train_inner"][0]["agg_rare"]
    counter = saved_counter_state(run.checkpoint())
    assert counter["num_updates"] == STOP_IN_EPOCH_2 + 1 + 1 and counter["window"] == EPOCH_UPDATES


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
