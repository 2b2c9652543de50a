"""Checkpoint files the plug-in writes are sealed with a checksum (issue 19): what the seal is,
what it catches that torch.load does not, how a resume picks a checkpoint when the named one is
damaged, fairseq-agg-eval's check, the cost benchmark; and the AGG options a resume takes.
The end-to-end resumes are in test_resume.py."""

import logging
import os
import zipfile

import pytest
import torch

from fairseq_agg import checkpoints
from fairseq_agg.core import TokenCounter
from fairseq_agg.errors import AggConfigError

from _checkpoint_damage import strip_seal, zero_inside_largest_tensor
from _fairseq import build, train_args
from conftest import REPO


def fairseq_like(num_updates: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "model": {"decoder.embed_tokens.weight": torch.rand(300, 32, generator=generator)},
        "cfg": {"task": {"_name": "language_modeling_agg"}, "criterion": {"_name": "agg_cross_entropy"}},
        "optimizer_history": [{"criterion_name": "AggCrossEntropyCriterion", "num_updates": num_updates}],
        "last_optimizer_state": {"state": {}},
        "extra_state": {"train_iterator": {"epoch": 1}},
    }


def sealed_save(state: dict, path) -> str:
    """fairseq's own save function, as the plug-in patched it."""
    from fairseq import checkpoint_utils

    checkpoint_utils.torch_persistent_save(state, str(path))
    return str(path)


def test_the_seal_is_invisible_to_torch_load_and_zip_readers(tmp_path):
    state = fairseq_like(5)
    path = sealed_save(state, tmp_path / "checkpoint_last.pt")
    assert os.listdir(tmp_path) == ["checkpoint_last.pt"]  # no temporary file left
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None and archive.comment.startswith(checkpoints.SEAL_PREFIX)
    loaded = torch.load(path, map_location="cpu", weights_only=False)
    assert torch.equal(loaded["model"]["decoder.embed_tokens.weight"], state["model"]["decoder.embed_tokens.weight"])
    assert checkpoints.seal_matches(path) is True and checkpoints.damage(path) is None
    assert checkpoints.seal(path) is False  # sealed once


def test_zeroed_tensor_bytes_load_silently_but_fail_the_checksum(tmp_path):
    state = fairseq_like(5)
    path = sealed_save(state, tmp_path / "checkpoint1.pt")
    zero_inside_largest_tensor(path)
    loaded = torch.load(path, map_location="cpu", weights_only=False)  # no error from torch ...
    assert not torch.equal(loaded["model"]["decoder.embed_tokens.weight"], state["model"]["decoder.embed_tokens.weight"])
    assert checkpoints.damage(path).startswith("fails its checksum")  # ... the seal tells
    assert "fails its checksum" in checkpoints.checksum_mismatch(path)


def test_a_checkpoint_without_a_seal_is_checked_for_its_zip_directory_only(tmp_path):
    path = sealed_save(fairseq_like(5), tmp_path / "stock.pt")
    strip_seal(path)
    assert checkpoints.seal_matches(path) is None and checkpoints.damage(path) is None
    assert checkpoints.checkpoint_to_resume(path) == path
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    assert checkpoints.damage(path).startswith("is truncated")
    open(path, "wb").close()
    assert checkpoints.damage(path).startswith("is empty")


def test_a_failure_before_the_seal_leaves_the_previous_checkpoint_in_place(tmp_path, monkeypatch):
    from fairseq_agg import fairseq_fixes

    path = sealed_save(fairseq_like(5), tmp_path / "checkpoint_last.pt")
    before = open(path, "rb").read()

    def crash(path):
        raise OSError("disk full")

    monkeypatch.setattr(fairseq_fixes, "seal", crash)
    with pytest.raises(OSError, match="disk full"):
        sealed_save(fairseq_like(6), path)
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["checkpoint_last.pt"]


def test_damaged_checkpoint_last_falls_back_to_the_intact_one_with_the_most_updates(tmp_path, caplog):
    last = sealed_save(fairseq_like(14), tmp_path / "checkpoint_last.pt")
    sealed_save(fairseq_like(14), tmp_path / "checkpoint_2_14.pt")
    sealed_save(fairseq_like(20, seed=1), tmp_path / "checkpoint_best.pt")
    zero_inside_largest_tensor(tmp_path / "checkpoint_best.pt")  # most updates, but damaged
    sealed_save(fairseq_like(7), tmp_path / "checkpoint1.pt")
    newest = os.stat(last).st_mtime + 60
    os.utime(tmp_path / "checkpoint1.pt", (newest, newest))  # older training, newer file
    zero_inside_largest_tensor(last)
    with caplog.at_level(logging.WARNING):
        chosen = checkpoints.checkpoint_to_resume(last)
    assert chosen == str(tmp_path / "checkpoint_2_14.pt")
    assert "checkpoint_last.pt fails its checksum" in caplog.text and "(14 updates)" in caplog.text


def test_a_damaged_checkpoint_named_by_restore_file_is_refused_with_a_working_flag(tmp_path):
    sealed_save(fairseq_like(14), tmp_path / "checkpoint_last.pt")
    named = sealed_save(fairseq_like(7), tmp_path / "checkpoint1.pt")
    zero_inside_largest_tensor(named)
    with pytest.raises(AggConfigError) as refusal:
        checkpoints.checkpoint_to_resume(named)
    message = str(refusal.value)
    assert "checkpoint1.pt fails its checksum" in message
    assert message.endswith(f"resume from it with --restore-file {(tmp_path / 'checkpoint_last.pt').resolve()}")


def test_eval_refuses_a_checkpoint_that_fails_its_checksum_in_one_line(tmp_path):
    from fairseq_agg.evaluation.common import EvalError, peek_checkpoint

    path = tmp_path / "checkpoint_best.pt"
    sealed_save(fairseq_like(5), path)
    assert peek_checkpoint(path)["task"] == "language_modeling_agg"
    zero_inside_largest_tensor(path)
    with pytest.raises(EvalError) as refusal:
        peek_checkpoint(path)
    message = str(refusal.value.code)
    assert message.startswith("fairseq-agg-eval: checkpoint ") and "fails its checksum" in message
    assert "\n" not in message


def test_resume_takes_the_window_and_static_after_of_the_command_line(lm_data, caplog):
    """Neither --agg-window nor --agg-static-after on the resume's command line: the defaults
    apply (one epoch; never static), not the checkpoint's values, and each change is logged."""
    task, _, criterion = build(train_args(str(lm_data)))
    saved = TokenCounter(task.agg_counter.vocab_size, task.agg_counter.nspecial, window=3)
    saved.freeze_after = 50
    for token in (10, 11, 12, 13):
        saved.add(torch.tensor([token, 20]))
        saved.commit()
    state = {"counter": saved.state_dict(), "options": {**criterion.agg_options(), "agg_window": 3, "agg_static_after": 50}}
    with caplog.at_level(logging.WARNING):
        task.restore_agg_checkpoint_state(state, criterion)
        assert task.agg_counter.num_updates == 4 and task.agg_counter.freeze_after is None
        task.load_dataset("train")
        epoch = len(task.get_batch_iterator(task.dataset("train"), max_tokens=256))
    assert task.agg_counter.window == epoch != 3
    (line,) = [r.getMessage() for r in caplog.records if "AGG options differ" in r.getMessage()]
    assert "--agg-static-after 50 -> None" in line and f"--agg-window 3 -> {epoch} (one epoch, the default)" in line
    assert task.agg_counter.updates_in_window() == 3  # what the checkpoint's window held, all kept


def test_bench_checksum_prints_its_table(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_checksum", REPO / "scripts" / "bench_checksum.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--size-mb", "4", "--rounds", "1", "--dir", str(tmp_path)])
    printed = capsys.readouterr().out
    for step in ("save (fairseq)", "save (sealed)", "seal alone (hash + comment)", "verify", "torch.load"):
        assert f"| {step} |" in printed
    assert "save overhead:" in printed and os.listdir(tmp_path) == []  # its files are removed
