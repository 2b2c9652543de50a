"""``examples/parallel_agg.py``: its ``--quick`` run under torchrun on a 2 x 2 mesh (FSDP2 x tensor
parallelism, 4 gloo processes on CPU), its ``--help`` and its one-line refusals. That the parallel
AGG loss equals one process's is ``tests/test_parallel.py``'s job."""

import importlib.util
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO, free_port, subprocess_env

EXAMPLE = REPO / "examples" / "parallel_agg.py"


@pytest.fixture
def example(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE.parent))  # it imports the data loader of nanogpt_agg.py
    spec = importlib.util.spec_from_file_location("example_parallel_agg", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_on_a_2x2_mesh_prints_loss_and_rare_group_then_the_result(tmp_path):
    # The workers run without fairseq, as the plain API may: four imports of it would cost more
    # than the run itself on two cores.
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['fairseq'] = None\n")
    env = subprocess_env()
    env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{env['PYTHONPATH']}"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-addr", "127.0.0.1",
         "--master-port", str(free_port()), str(EXAMPLE), "--quick"],
        capture_output=True, text=True, env=env, cwd=str(REPO), timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    out = proc.stdout
    vocab = int(re.search(r"^mesh dp 2 x tp 2, vocabulary (\d+),", out, re.M).group(1))
    steps = [(int(s), float(loss), int(rare))
             for s, loss, rare in re.findall(r"^step +(\d+)  loss ([\d.]+)  rare (\d+)$", out, re.M)]
    assert [s for s, _, _ in steps] == list(range(1, 7)), out  # every line once: rank 0 prints
    losses, rare = [loss for _, loss, _ in steps], [r for _, _, r in steps]
    assert abs(losses[0] - math.log(vocab)) < 0.5 and losses[-1] < losses[0] - 1, losses  # it learns
    assert all(0 < r < vocab for r in rare) and rare[-1] < rare[0], rare  # the rare group shrinks as counts come in
    final = re.findall(r"^AGG: valid perplexity ([\d.]+), I\(W\) ([\d.]+), rare group (\d+), [\d.]+ s$", out, re.M)
    assert len(final) == 1, out
    ppl, isotropy, final_rare = float(final[0][0]), float(final[0][1]), int(final[0][2])
    assert 1 < ppl < vocab and 0 < isotropy <= 1 and final_rare == rare[-1]
    assert out.rstrip().splitlines()[-1].startswith("AGG: valid perplexity")


def test_help_shows_the_whole_description_and_every_default(example, capsys):
    with pytest.raises(SystemExit):
        example.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # as the terminal's width wraps it
    assert "torchrun --nproc-per-node 4 examples/parallel_agg.py" in out and "2 CPU cores" in out
    for default in ("(default: 300)", "(default: 8)", "(default: 128)", "(default: 4)", "(default: 2)",
                    "(default: 0.03)"):
        assert default in out, default
    assert "--quick" in out and "--mle" in out


@pytest.mark.parametrize("argv, world, names", [
    (["--quick"], None, "start it with torchrun"),
    (["--quick", "--tp", "3"], 4, "--tp 3"),
    (["--quick", "--heads", "3"], 4, "--heads 3"),
    (["--quick", "--batch", "7"], 4, "--batch 7"),
    (["--quick", "--alpha", "2"], 4, "alpha"),
    (["--lines", "1"], 4, "--lines 1"),
])
def test_bad_input_gets_one_line_before_any_process_group(example, monkeypatch, capsys, argv, world, names):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    if world is not None:
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(SystemExit) as exit:
        example.main(argv)
    assert exit.value.code == 2 and not torch.distributed.is_initialized()
    err = capsys.readouterr().err
    assert err.startswith("parallel_agg.py: ") and err.count("\n") == 1 and names in err, err
