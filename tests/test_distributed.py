"""Two data-parallel CPU workers (gloo, one process per rank, DESIGN.md section 7) against one
process with ``--update-freq 2`` on the same global batches.

Contract (DESIGN.md section 2, items 1, 2 and 9): all workers' targets are summed into one
counter slot per update, every worker computes the same gates, and those gates do not depend on
how the global batch is split; with dropout 0 the parameters stay bit-identical too. Per-update
state is observed through a test-only task (``tests/helpers/agg_traced_task.py``,
``--task language_modeling_agg_traced``) that appends digests after every optimizer step; the
runs import it before ``fairseq_cli.train.cli_main()`` (forked from the fork server, or through
``python -c`` with ``AGG_E2E_SUBPROCESS=1``) and still load the plug-in with ``--user-dir``.
"""

import json

import pytest
import torch

from fairseq_agg.fairseq_fixes import saved_counter_state

from conftest import free_port, lm_train, run_all

UPDATES = 12

AGG = [
    "--agg-alpha", "0.5",  # tokens seen once in two updates are rare with g1 = 0.5: non-trivial gates
    # The 100-line valid split as training set: 21 batches, so the workers' epoch ends unevenly
    # (one of them gets a dummy batch) and the run enters epoch 2, where the default window
    # (one epoch of updates) starts dropping slots.
    "--train-subset", "valid", "--valid-subset", "test",
    "--max-update", UPDATES,
]


def read_trace(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module", params=["agg_cross_entropy", "agg_unlikelihood"])
def runs(request, lm_data, tmp_path_factory):
    criterion = request.param
    root = tmp_path_factory.mktemp("distributed")
    port = free_port()
    workers = []
    for rank in (0, 1):
        workers.append(lm_train(
            lm_data, root / "ddp", *AGG,
            "--distributed-world-size", 2, "--distributed-rank", rank, "--distributed-no-spawn",
            "--distributed-init-method", f"tcp://127.0.0.1:{port}",
            "--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp",
            task="language_modeling_agg_traced", traced=True, criterion=criterion,
            env={"AGG_TRACE_DIR": str(root)}, name=f"worker {rank}",
        ))
    # fairseq's default --ddp-backend (pytorch_ddp), once: it must train exactly as legacy_ddp.
    pytorch_ddp = []
    if criterion == "agg_cross_entropy":
        port = free_port()
        pytorch_ddp = [
            lm_train(
                lm_data, root / "pytorch_ddp", *AGG,
                "--distributed-world-size", 2, "--distributed-rank", rank, "--distributed-no-spawn",
                "--distributed-init-method", f"tcp://127.0.0.1:{port}", "--distributed-backend", "gloo",
                criterion=criterion, name=f"pytorch_ddp worker {rank}",
            )
            for rank in (0, 1)
        ]
    (root / "single").mkdir()
    single = lm_train(
        lm_data, root / "single" / "ckpt", *AGG, "--update-freq", 2,
        task="language_modeling_agg_traced", traced=True, criterion=criterion,
        env={"AGG_TRACE_DIR": str(root / "single")}, name="update-freq 2",
    )
    # The workers of a run must run together: they are started before the single process.
    run_all([*workers, *pytorch_ddp, single], parallel=2 + len(pytorch_ddp), check=False)
    for run in (*workers, single):
        run.wait()  # raises for a failed run; the pytorch_ddp workers are checked by their test
    return {
        "workers": workers,
        "pytorch_ddp": pytorch_ddp,
        "single": single,
        "traces": [read_trace(root / "trace.rank0.jsonl"), read_trace(root / "trace.rank1.jsonl")],
        "single_trace": read_trace(root / "single" / "trace.rank0.jsonl"),
    }


def epoch_updates(run) -> int:
    return sum(1 for r in run.records["train_inner"] if r["epoch"] == 1)


def test_workers_agree_with_each_other_after_every_update(runs):
    rank0, rank1 = runs["traces"]
    assert [r["update"] for r in rank0] == list(range(1, UPDATES + 1))
    # Rank 1 pads the uneven end of epoch 1 with a dummy batch, which must not count.
    assert sum(r["ignored"] for r in rank0) == 0 and sum(r["ignored"] for r in rank1) == 1
    for r0, r1 in zip(rank0, rank1):
        r1 = {**r1, "ignored": r0["ignored"]}
        assert r0 == r1, r0["update"]
    window = epoch_updates(runs["workers"][0])
    assert 1 < window < UPDATES
    for r in rank0:
        assert r["counter_updates"] == r["update"]
        assert r["slots"] == min(r["update"], window)
        assert len(r["gates"]) == 1


def test_workers_agree_with_update_freq_2_after_every_update(runs):
    single = runs["single_trace"]
    assert [r["update"] for r in single] == list(range(1, UPDATES + 1))
    for w, s in zip(runs["traces"][0], single):
        # All micro-batches of an update see the same gates: those of the completed updates.
        assert 1 <= len(s["gates"]) <= 2 and len(set(s["gates"])) == 1
        assert w["gates"][0] == s["gates"][0], w["update"]
        for key in ("counter_updates", "slots", "window_total", "window_sum", "num_rare", "params"):
            assert w[key] == s[key], (key, w["update"])
    # One slot per update holds the whole global batch, not one worker's share: the window
    # (K = the updates of one epoch) sums the target tokens of the last K updates.
    window = epoch_updates(runs["single"])
    assert window == epoch_updates(runs["workers"][0])
    assert saved_counter_state(runs["single"].checkpoint())["window"] == window
    wpb = [int(float(r["wpb"])) for r in runs["single"].records["train_inner"]]
    assert [r["window_total"] for r in single] == [sum(wpb[max(0, u - window) : u]) for u in range(1, UPDATES + 1)]
    # The gates changed along the run and were not trivial.
    rare = [r["num_rare"] for r in single]
    assert len(set(rare)) > 1 and len(set(r["gates"][0] for r in single)) == UPDATES


def test_logged_losses_agree(runs):
    worker0 = runs["workers"][0].records["train_inner"]
    single = runs["single"].records["train_inner"]
    assert len(worker0) == len(single) == UPDATES, runs["workers"][0].log[-5000:]
    for w, s in zip(worker0, single):
        for key in ("loss", "nll_loss", "agg_rare", "wpb", "bsz"):
            assert w[key] == s[key], (key, w["num_updates"])


def test_final_checkpoints_bit_identical(runs):
    ddp = runs["workers"][0].checkpoint()
    single = runs["single"].checkpoint()
    a, b = ddp["model"], single["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    counter_a, counter_b = saved_counter_state(ddp), saved_counter_state(single)
    for field, value in counter_a.items():
        other = counter_b[field]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, field


@pytest.mark.parametrize("runs", ["agg_cross_entropy"], indirect=True)
def test_default_ddp_backend_trains_on_cpu_exactly_as_legacy_ddp(runs):
    legacy, default = runs["workers"][0], runs["pytorch_ddp"][0]
    assert default.returncode == 0, default.log[-3000:]
    assert "'ddp_backend': 'pytorch_ddp'" in default.log
    assert [r["loss"] for r in default.records["train_inner"]] == [r["loss"] for r in legacy.records["train_inner"]]
    a, b = legacy.checkpoint()["model"], default.checkpoint()["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
