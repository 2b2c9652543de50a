"""``AggTrainer`` under data parallelism (issue 14, criterion 4): two CPU processes (gloo,
launched with torchrun) equal one process with gradient accumulation 2: the same counter and,
up to float64 rounding of the gradient all-reduce, the same parameters.

The model has an untied head, which the forward pass reaches only through AGG's loss: DDP must
still find and reduce its gradient. Run as a script (by torchrun) this file is the worker.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
STEPS = 6


def _train(out_dir: Path, world: int):
    from fairseq_agg.hf import AggTrainer  # before transformers' models (see fairseq_agg.hf._compat)
    from test_hf import ALPHA, WINDOW, dataset, tiny_gpt2, training_args

    args = training_args(out_dir, per_device_train_batch_size=2, gradient_accumulation_steps=2 // world, max_steps=STEPS)
    trainer = AggTrainer(model=tiny_gpt2(tied=False), args=args, train_dataset=dataset(), agg_alpha=ALPHA, agg_window=WINDOW)
    trainer.train()
    return trainer


def _worker(out_dir: str) -> None:
    torch.set_num_threads(1)
    trainer = _train(Path(out_dir), world=2)
    assert trainer.args.world_size == 2, trainer.args.world_size
    if trainer.args.process_index == 0:
        torch.save(
            {"params": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
             "agg": trainer.agg.state_dict(), "log": trainer.state.log_history},
            Path(out_dir) / "rank0.pt",
        )
    # Both processes leave the group together: a process that exits with gloo's threads still
    # running may abort in their destructors ("terminate called without an active exception").
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.usefixtures("one_thread")
def test_two_processes_equal_one_with_accumulation(tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE)])}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
        "--master_addr=127.0.0.1", f"--master_port={port}", str(Path(__file__)), str(tmp_path / "ddp"),
    ]
    result = subprocess.run(command, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout[-3000:] + result.stderr[-6000:])
    got = torch.load(tmp_path / "ddp" / "rank0.pt", weights_only=False)

    reference = _train(tmp_path / "single", world=1)
    counter = reference.agg.state_dict()["_extra_state"]
    other = got["agg"]["_extra_state"]
    assert set(counter) == set(other)
    for key, value in counter.items():
        assert torch.equal(value, other[key]) if torch.is_tensor(value) else value == other[key], key
    assert counter["num_updates"] == STEPS
    for name, p in reference.model.state_dict().items():
        torch.testing.assert_close(got["params"][name], p, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")
    assert [e.get("agg_rare") for e in got["log"] if "agg_rare" in e] == [
        e["agg_rare"] for e in reference.state.log_history if "agg_rare" in e
    ]


if __name__ == "__main__":
    _worker(sys.argv[1])
