"""scripts/bench.py runs end to end on a tiny shape and writes its table and JSON (the times
themselves are for docs/performance.md, measured on an idle machine, never asserted here), its gated
output layer step is nn.Linear + F.cross_entropy's forward with AGG's gradients, its
vocabulary-parallel measurement runs, and its peak memory (shared with examples/bench_hf.py) is
the peak of the tensors live during a step."""

import importlib.util
import json
import subprocess
import sys
import tempfile

import pytest
import torch

from conftest import REPO, free_port, subprocess_env

METHODS = ("fairseq_ce", "naive_3logit", "agg", "agg_chunked", "torch_lce", "torch_lce_chunked", "linear_ce", "gated")
VOCAB, TOKENS = 600, 128
TINY = ["--vocab", str(VOCAB), "--tokens", str(TOKENS), "--seq-len", "64", "--dim", "32", "--layers", "1",
        "--heads", "2", "--window", "3"]


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load("bench", REPO / "scripts" / "bench.py")


def test_bench_prints_a_table_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), *TINY, "--chunk", "32",
         "--warmup", "0", "--steps", "1", "--json", str(out)],
        capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| vocab | tokens |" in proc.stdout and "| gated ms | gated MiB |" in proc.stdout
    result = json.loads(out.read_text())
    (row,) = result["results"]
    assert row["vocab"] == VOCAB and row["tokens"] == TOKENS
    assert row["rare_token_fraction"] == row["rare_tokens"] / VOCAB
    # the gated output layer is given against its own anchor, nn.Linear + F.cross_entropy
    assert "linear_ce" in row["methods"]["gated"]["paired_ratio_vs"]
    assert set(row["methods"]) == set(METHODS)
    for method in METHODS:
        assert row["methods"][method]["time_s"] > 0 and row["methods"][method]["peak_bytes"] > 0
    # fairseq's cross_entropy holds the float32 logits of every token at once
    assert row["methods"]["fairseq_ce"]["peak_bytes"] >= TOKENS * VOCAB * 4


def test_peak_memory_is_the_peak_of_live_tensors(bench):
    cpu = torch.device("cpu")
    kept = []
    assert bench.peak_live_bytes(lambda: kept.append(torch.ones(1000)), cpu) == 4000  # one float32 tensor, kept

    def temporary_then_smaller():
        temporary = torch.ones(1000, dtype=torch.float64)  # 8000 bytes, freed before the next allocation
        del temporary
        kept.append(torch.ones(200))

    assert bench.peak_live_bytes(temporary_then_smaller, cpu) == 8000

    # memory live before the step and freed during it is not the step's: the peak counts what the
    # step allocated, so it is never negative
    before = [torch.ones(100_000)]
    assert bench.peak_live_bytes(lambda: (before.clear(), kept.append(torch.ones(10))), cpu) == 40


def test_gated_step_is_linear_ce_forward_with_agg_gradients(bench):
    """Sanity, not timing: the gated method computes nn.Linear + F.cross_entropy's loss, the
    features' gradient of plain cross-entropy and AGG's W gradient (that of the agg method)."""
    args = bench.parse_args([*TINY, "--methods", "linear_ce", "gated", "agg"])
    run = bench.build_steps(args, VOCAB, TOKENS, torch.device("cpu"), torch.float64)
    assert 0 < run.gates.num_rare < VOCAB
    results = {}
    for name, step in run.steps.items():
        run.model.zero_grad(set_to_none=True)
        loss = step()
        loss.backward()
        results[name] = (loss.item(), {n: p.grad.clone() for n, p in run.model.named_parameters()})
    w = "decoder.embed_tokens.weight"  # tied with the output projection
    gated_loss, gated = results["gated"]
    linear_loss, linear = results["linear_ce"]
    agg_loss, agg = results["agg"]
    assert gated_loss == pytest.approx(linear_loss, rel=1e-12) and agg_loss == pytest.approx(linear_loss, rel=1e-12)
    assert set(gated) == set(linear) and w in gated
    for name in gated:
        want = agg[name] if name == w else linear[name]
        assert torch.allclose(gated[name], want, rtol=1e-9, atol=1e-12), name
    assert (gated[w] - linear[w]).abs().max() > 1e-6  # the gates matter here


def test_vocab_parallel_worker_in_one_process(bench, tmp_path, monkeypatch):
    """The torchrun worker of --vocab-parallel (here a group of one process, which spares the
    seconds of starting processes): the weight sharded by ColwiseParallel, vocab_parallel=True,
    its peak written for every shape."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    args = bench.parse_args(["--vocab", "64", "--tokens", "32", "48", "--dim", "8", "--window", "3",
                             "--vocab-parallel-worker", str(tmp_path)])
    bench.vocab_parallel_worker(args, torch.float32)
    rows = json.loads((tmp_path / "rank0.json").read_text())
    assert [(r["vocab"], r["tokens"], r["local_rows"]) for r in rows] == [(64, 32, 64), (64, 48, 64)]
    # W's gradient alone (64 x 8 float32) is allocated in the step
    assert all(r["peak_bytes"] >= 64 * 8 * 4 for r in rows)


@pytest.mark.parametrize("argv, message", [
    (["--vocab-parallel", "1"], "--vocab-parallel needs 2 or more processes, got 1"),
    (["--vocab-parallel", "2", "--device", "cuda"], "--vocab-parallel runs on CPU processes (gloo)"),
    (["--vocab-parallel", "4", "--vocab", "3"], "--vocab 3 has fewer rows than --vocab-parallel 4 processes"),
])
def test_vocab_parallel_refuses_bad_input_in_one_line(bench, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(argv)
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0]


def test_bench_hf_memory_is_each_steps_tensor_peak(tmp_path, monkeypatch):
    """examples/bench_hf.py measures memory as bench.py does: a step's peak holds at least the
    logits of its predicted positions (resident-set growth gave 0.0 MiB, or less, at this size)."""
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # leave the test process's setting alone
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # its Trainers' output folders
    bench_hf = _load("bench_hf", REPO / "examples" / "bench_hf.py")
    vocab, batch, seq_len = 512, 2, 32
    results = bench_hf.main(["--vocab", str(vocab), "--dim", "16", "--layers", "1", "--seq-len", str(seq_len),
                             "--batch", str(batch), "--lines", "50", "--rounds", "1", "--steps", "1",
                             "--methods", "stock", "agg", "--json", str(tmp_path / "hf.json")])
    for method in ("stock", "agg"):
        assert results["methods"][method]["peak_mib"] * 2**20 >= batch * (seq_len - 1) * vocab * 4, method
