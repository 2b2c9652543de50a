"""fairseq_agg.workdir: a tool clears or replaces only folders it made (they carry its stamp);
any other folder is refused in one line, before anything in it changes."""

import shutil

import pytest

from fairseq_agg.errors import AggConfigError
from fairseq_agg.workdir import STAMP_NAME, Owner, stamp_owner

DEMO = Owner("fairseq-agg-demo", "--workdir")


def tree(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def test_a_missing_or_empty_folder_becomes_the_tools_with_its_stamp_first(tmp_path):
    made = DEMO.claim(tmp_path / "new" / "workdir")
    assert tree(made) == [STAMP_NAME] and stamp_owner(made) == "fairseq-agg-demo"
    (tmp_path / "empty").mkdir()
    assert tree(DEMO.replace(tmp_path / "empty")) == [STAMP_NAME]


def test_a_folder_with_files_and_no_stamp_is_refused_and_left_as_it_was(tmp_path):
    (tmp_path / "runs" / "mle").mkdir(parents=True)
    (tmp_path / "runs" / "mle" / "checkpoint_best.pt").write_text("the user's")
    before = tree(tmp_path)
    for attempt in (DEMO.refuse_unless_ours, DEMO.claim, DEMO.replace):
        with pytest.raises(AggConfigError) as refused:
            attempt(tmp_path / "runs")
        assert str(refused.value) == (f"{tmp_path / 'runs'} holds files that fairseq-agg-demo did not write "
                                      f"(no {STAMP_NAME} stamp); pass another --workdir or remove it yourself")
    assert tree(tmp_path) == before and (tmp_path / "runs" / "mle" / "checkpoint_best.pt").read_text() == "the user's"


def test_another_tools_folder_and_a_file_are_refused(tmp_path):
    study = Owner("fairseq_agg.study", "--workdir").claim(tmp_path / "study")
    (study / "mle-seed1").mkdir()
    with pytest.raises(AggConfigError, match=r"study was written by fairseq_agg.study, not by fairseq-agg-demo; "
                                             r"pass another --workdir or remove it yourself$"):
        DEMO.replace(study)
    assert (study / "mle-seed1").is_dir()
    (tmp_path / "results").write_text("a file")
    with pytest.raises(AggConfigError, match=r"results is not a folder; pass another --workdir"):
        DEMO.claim(tmp_path / "results")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / STAMP_NAME).write_text("not json")
    with pytest.raises(AggConfigError, match="holds files that fairseq-agg-demo did not write"):
        DEMO.replace(tmp_path / "broken")


def test_replace_empties_only_the_tools_own_folder(tmp_path):
    run = DEMO.claim(tmp_path / "agg")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "checkpoint_last.pt").write_text("old")
    (run / "train.log").write_text("old")
    (tmp_path / "elsewhere").mkdir()
    (run / "link").symlink_to(tmp_path / "elsewhere")
    assert DEMO.replace(run) == run
    assert tree(run) == [STAMP_NAME] and (tmp_path / "elsewhere").is_dir()  # a link goes, not its target


def test_an_interrupted_replace_leaves_a_folder_still_the_tools(tmp_path, monkeypatch):
    run = DEMO.claim(tmp_path / "agg")
    for name in ("a", "b"):
        (run / name).mkdir()
    calls = []

    def interrupted(path, *args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(path)
        real_rmtree(path, *args, **kwargs)

    real_rmtree = shutil.rmtree
    monkeypatch.setattr(shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        DEMO.replace(run)
    monkeypatch.undo()
    assert len(tree(run)) == 2 and stamp_owner(run) == "fairseq-agg-demo"
    assert tree(DEMO.replace(run)) == [STAMP_NAME]
