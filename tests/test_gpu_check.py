"""``scripts/gpu-check.sh`` in its CPU form (what CI can run), so that the GPU check cannot rot:
every step runs, fp16 is refused in one line, bf16 runs and their resumes pass, and only the
CUDA-only synchronisation check is skipped."""

import json
import subprocess

from fairseq_agg.workdir import stamp_owner

from conftest import REPO, subprocess_env


def test_gpu_check_passes_in_its_cpu_form(tmp_path):
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu-check.sh"), "--device", "cpu", "--out", str(tmp_path), "--updates", "4"],
        capture_output=True, text=True, env=subprocess_env(), timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    assert "| check | status | detail | s |" in proc.stdout
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    status = {row["check"]: row["status"] for row in report["checks"]}
    assert status.pop("no host-device sync per micro-batch") == "skip"
    assert set(status.values()) == {"pass"}, status
    names = " / ".join(status)
    for expected in ("gradients on cpu", "fp32 reference run", "fp16 on CPU refused in one line",
                     "agg_cross_entropy bf16, 4 updates", "agg_unlikelihood bf16, stopped at 2 and resumed",
                     "output-layer bench bf16"):
        assert expected in names, names
    assert stamp_owner(tmp_path) == stamp_owner(tmp_path / "runs") == "gpu-check"  # a re-run may replace them


def test_an_out_folder_the_check_did_not_write_is_refused_in_one_line_and_left_alone(tmp_path):
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "checkpoint_best.pt").write_text("the user's model")
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu-check.sh"), "--device", "cpu", "--out", str(tmp_path), "--updates", "2"],
        capture_output=True, text=True, env=subprocess_env(), timeout=900,
    )
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"gpu_check.py: error: {tmp_path} holds files that gpu-check did not write (no .fairseq-agg-owner stamp); "
        "pass another --out or remove it yourself"], proc.stdout[-2000:] + proc.stderr[-2000:]
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "runs", "runs/demo", "runs/demo/checkpoint_best.pt"]
    assert (tmp_path / "runs" / "demo" / "checkpoint_best.pt").read_text() == "the user's model"
