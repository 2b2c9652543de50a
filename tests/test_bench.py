"""scripts/bench.py runs end to end on a tiny shape and writes its table and JSON (the numbers
themselves are for the README, measured on an idle machine, never asserted here)."""

import json
import subprocess
import sys

from conftest import REPO, subprocess_env

METHODS = ("fairseq_ce", "naive_3logit", "agg", "agg_chunked", "torch_lce", "torch_lce_chunked")


def test_bench_prints_a_table_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), "--vocab", "600", "--tokens", "128", "--seq-len", "64",
         "--dim", "32", "--layers", "1", "--heads", "2", "--window", "3", "--chunk", "32", "--warmup", "0",
         "--steps", "1", "--json", str(out)],
        capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| vocab | tokens |" in proc.stdout
    result = json.loads(out.read_text())
    (row,) = result["results"]
    assert row["vocab"] == 600 and row["tokens"] == 128
    assert set(row["methods"]) == set(METHODS)
    for method in METHODS:
        assert row["methods"][method]["time_s"] > 0 and row["methods"][method]["peak_bytes"] >= 0
