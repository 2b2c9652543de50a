"""AGG under torch's native parallelism, on CPU with gloo (``tests/helpers/parallel_worker.py``
under ``torchrun``): FSDP2 on 2 processes, tensor parallelism on 2, FSDP2 x tensor parallelism on a
2 x 2 mesh; the fused loss (``agg.loss``, ``vocab_parallel=True`` where the weight is sharded over
the vocabulary) and the gated output layer (the model's own loss, ``loss_parallel()`` on sharded
logits); float64 and float32; label smoothing (but for the gated layer on sharded logits, which
torch's ``loss_parallel()`` cannot smooth) and ignored labels; a resume from
``torch.distributed.checkpoint``.

Each parallel run is compared with the same model trained in one process on the same global batch:
the loss of every step, the final weights and every rank's token counter. float64 to 1e-10,
float32 to 1e-5 (of the weights' scale).
"""

import glob
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, free_port, subprocess_env

WORKER = REPO / "tests" / "helpers" / "parallel_worker.py"
TWO = ["fsdp:fused:float64", "fsdp:gated:float64", "tp:fused:float64", "tp:gated:float64",
       "fsdp:fused:float32", "fsdp:gated:float32", "tp:fused:float32", "tp:gated:float32",
       "tp:fused:float64:resume", "fsdp:gated:float64:resume"]
FOUR = ["fsdp_tp:fused:float64", "fsdp_tp:gated:float64", "fsdp_tp:fused:float32", "fsdp_tp:gated:float32",
        "fsdp_tp:fused:float64:resume"]
TOLERANCE = {"float64": 1e-10, "float32": 1e-5}


def _torchrun(nproc, scenarios, out: Path) -> dict:
    out.mkdir()
    env = {**subprocess_env(), "AGG_PARALLEL_OUT": str(out)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
         "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(WORKER), *scenarios],
        capture_output=True, text=True, env=env, cwd=str(REPO), timeout=900,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    results = {}
    for path in glob.glob(str(out / "rank*.json")):
        rank, scenario = Path(path).stem.split("-", 1)
        results.setdefault(scenario, {})[int(rank[4:])] = json.loads(Path(path).read_text())
    return results


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    return _torchrun(2, TWO, tmp_path_factory.mktemp("parallel") / "two")


@pytest.fixture(scope="module")
def four_processes(tmp_path_factory):
    return _torchrun(4, FOUR, tmp_path_factory.mktemp("parallel") / "four")


def _check(results, scenario, nproc):
    ranks = results[scenario.replace(":", "-")]
    assert sorted(ranks) == list(range(nproc))
    tol = TOLERANCE[scenario.split(":")[2]]
    for rank, r in ranks.items():
        assert r["same_parameters"], rank
        assert r["max_weight_diff"] <= tol * max(1.0, r["weight_scale"]), (rank, r["max_weight_diff"])
        assert len(r["losses"]) == len(r["ref_losses"]) == 6
        for step, (got, want) in enumerate(zip(r["losses"], r["ref_losses"]), 1):
            assert abs(got - want) <= tol * max(1.0, abs(want)), (rank, step, got, want)
        # Every rank holds the one-process counter: labels counted once per data-parallel shard
        # (by the first process of each vocabulary group), summed over the data-parallel shards.
        assert r["counter"] == r["ref_counter"], rank
        assert r["counter"]["num_updates"] == 6 and 0 < r["rare"] < 37 and r["rare"] == r["ref_rare"]
        if scenario.endswith(":resume"):
            assert r["restored_updates"] == 3  # the counter came back from the checkpoint


@pytest.mark.parametrize("scenario", TWO)
def test_two_processes_equal_one(two_processes, scenario):
    _check(two_processes, scenario, 2)


@pytest.mark.parametrize("scenario", FOUR)
def test_fsdp_by_tensor_parallel_on_a_2x2_mesh_equals_one_process(four_processes, scenario):
    _check(four_processes, scenario, 4)


def test_a_dtensor_weight_gets_one_line_naming_the_right_call(four_processes):
    messages = four_processes["refusals"][0]
    for case in ("tp_weight_without_vocab_parallel", "fsdp_weight_outside_forward"):
        message = messages[case]
        assert message and "\n" not in message, case
        assert "vocab_parallel=True" in message and "FSDP2" in message and "GatedOutputLayer" in message, message
    assert "plain tensor" in messages["plain_weight_with_vocab_parallel"]
    # FSDP2 x tensor parallel outside the unit's forward: sharded twice, which the loss cannot use.
    assert "_StridedShard" in messages["fsdp_tp_weight_outside_forward"]
    assert "inside its module's forward" in messages["fsdp_tp_weight_outside_forward"]
