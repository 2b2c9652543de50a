"""scripts/bench.py runs end to end on a tiny shape and writes its table and JSON (the times
themselves are for the README, measured on an idle machine, never asserted here), and its peak
memory is the peak of the tensors live during a step."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, subprocess_env

METHODS = ("fairseq_ce", "naive_3logit", "agg", "agg_chunked", "torch_lce", "torch_lce_chunked")
VOCAB, TOKENS = 600, 128


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", REPO / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_prints_a_table_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), "--vocab", str(VOCAB), "--tokens", str(TOKENS),
         "--seq-len", "64", "--dim", "32", "--layers", "1", "--heads", "2", "--window", "3", "--chunk", "32",
         "--warmup", "0", "--steps", "1", "--json", str(out)],
        capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| vocab | tokens |" in proc.stdout
    result = json.loads(out.read_text())
    (row,) = result["results"]
    assert row["vocab"] == VOCAB and row["tokens"] == TOKENS
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
