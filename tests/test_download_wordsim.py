"""scripts/download-wordsim.sh: a failed or wrong download leaves nothing the evaluation would
read. (The real mirror is not reachable from CI; these runs use file:// URLs.)"""

import os
import shutil
import subprocess

from conftest import DATA, REPO

SCRIPT = REPO / "scripts" / "download-wordsim.sh"


def _run(dest, base_url):
    env = dict(os.environ, WORDSIM_BASE_URL=base_url)
    return subprocess.run(["bash", str(SCRIPT), str(dest)], capture_output=True, text=True, env=env, timeout=60)


def test_unreachable_mirror_is_a_clear_error_and_leaves_nothing(tmp_path):
    dest = tmp_path / "wordsim"
    proc = _run(dest, f"file://{tmp_path}/no-such-mirror")
    assert proc.returncode != 0
    assert "download failed" in proc.stderr and "EN-MEN-TR-3k.txt" in proc.stderr
    assert list(dest.iterdir()) == []


def test_truncated_file_is_refused(tmp_path):
    mirror = tmp_path / "mirror"
    shutil.copytree(DATA / "wordsim" / "excerpts", mirror)  # 120 of MEN's 3,000 pairs
    dest = tmp_path / "wordsim"
    proc = _run(dest, f"file://{mirror}")
    assert proc.returncode != 0
    assert "has 120 pairs, the canonical file has 3000" in proc.stderr
    assert list(dest.iterdir()) == []


def test_complete_files_are_kept_and_skipped(tmp_path):
    dest = tmp_path / "wordsim"
    dest.mkdir()
    for name in ("EN-MEN-TR-3k.txt", "EN-WS-353-ALL.txt", "EN-RG-65.txt", "EN-RW-STANFORD.txt"):
        (dest / name).write_text("already downloaded\n")
    proc = _run(dest, f"file://{tmp_path}/no-such-mirror")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("already there") == 4


def test_a_complete_mirror_is_downloaded_and_read_by_the_loader(tmp_path):
    from fairseq_agg.metrics import load_word_similarity

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    canonical = {"EN-MEN-TR-3k.txt": 3000, "EN-WS-353-ALL.txt": 353, "EN-RG-65.txt": 65, "EN-RW-STANFORD.txt": 2034}
    for name, pairs in canonical.items():
        end = "\r\n" if name.startswith("EN-WS") else "\n"  # WS353 comes with CRLF line ends
        (mirror / name).write_text("".join(f"w{i}\tv{i}\t{i % 10}.5{end}" for i in range(pairs)))
    dest = tmp_path / "wordsim"
    proc = _run(dest, f"file://{mirror}")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in dest.iterdir()) == sorted(canonical)  # no temporary folder left
    for name, pairs in canonical.items():
        loaded = load_word_similarity(dest / name)
        assert len(loaded) == pairs and loaded[0][:2] == ("w0", "v0")
