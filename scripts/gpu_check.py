#!/usr/bin/env python3
"""What a paper-scale run needs from one GPU, checked in minutes (``scripts/gpu-check.sh``).

1. The gated output layer on the device against the float64 oracle of eq. 23
   (``tests/test_device_gradients.py``: float32 to 1e-6, float16 1e-2, bfloat16 5e-2).
2. ``fairseq-train`` runs of ``agg_cross_entropy`` and ``agg_unlikelihood`` in fp16 and bf16 on
   the shipped WikiText-2: finite losses, and the AGG token counter equal to a float32 run's
   (same batches, so the same counts; an fp16 overflow, which skips a batch, is reported).
3. Each of those runs stopped half-way and resumed: the counter equal to the uninterrupted
   run's and the final loss within 1% of it (bit-identical on CPU; CUDA's embedding backward
   adds with atomics, so GPU runs differ in the last bits).
4. No host-device synchronisation in AGG's per-micro-batch path (gated loss forward and
   backward, counting the targets): run under ``torch.cuda.set_sync_debug_mode("error")``.
5. The output-layer benchmark (``scripts/bench.py``) at V=44,256, d=1024, 8,192 tokens in bf16:
   AGG, AGG chunked, fairseq's cross_entropy and torch's chunked ``F.linear_cross_entropy``,
   tokens/s and peak memory.

Without CUDA (or with ``--device cpu``) the same steps run in a reduced form on the CPU: fewer
updates, a tiny model, a small benchmark shape; fp16 must then be refused in one line, and the
synchronisation check is reported as skipped. CI runs that form. Prints a pass/fail table and
writes ``OUT/gpu-check.json``; exits 1 if any check fails. OUT must be new, empty or an earlier
check's (it carries the ``.fairseq-agg-owner`` stamp); any other is refused in one line (exit 2).
"""

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from fairseq_agg.errors import AggConfigError  # noqa: E402
from fairseq_agg.fairseq_fixes import saved_counter_state  # noqa: E402
from fairseq_agg.workdir import Owner  # noqa: E402

CRITERIA = ("agg_cross_entropy", "agg_unlikelihood")
PRECISIONS = ("fp16", "bf16")
RECORD = re.compile(r"\| train_inner \| (\{.*\})\s*$")
OWNER = Owner("gpu-check", "--out")  # --out, and the runs replaced in it, must be the check's own


class Report:
    def __init__(self):
        self.rows = []

    def add(self, check: str, status: str, detail: str, seconds: float = 0.0, **data):
        self.rows.append({"check": check, "status": status, "detail": detail, "seconds": round(seconds, 1), **data})
        print(f"[gpu-check] {status:<4} {check}: {detail}", flush=True)

    @property
    def failed(self):
        return [r for r in self.rows if r["status"] == "FAIL"]

    def table(self) -> str:
        lines = ["| check | status | detail | s |", "|---|---|---|---|"]
        lines += [f"| {r['check']} | {r['status']} | {r['detail']} | {r['seconds']} |" for r in self.rows]
        return "\n".join(lines)


def environment():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


# -- 1. gradients --------------------------------------------------------------------------------
def check_gradients(report, device):
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / "tests" / "test_device_gradients.py")],
        capture_output=True, text=True, env={**environment(), "AGG_TEST_DEVICE": device}, cwd=REPO,
    )
    summary = (proc.stdout.strip().splitlines() or ["no output"])[-1]
    report.add(f"gradients on {device} vs float64 eq. 23", "pass" if proc.returncode == 0 else "FAIL", summary,
               time.time() - start)


# -- 2-3. fairseq-train runs ----------------------------------------------------------------------
def binarize(out: Path, lines: int) -> Path:
    raw, dest = out / "raw", out / "data-bin"
    if (dest / "dict.txt").exists():
        return dest
    raw.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid"):
        with open(REPO / "data" / "wikitext-2" / f"wiki.{split}.tokens", encoding="utf-8") as f:
            text = f.readlines()[: lines if split == "train" else lines // 5]
        (raw / f"{split}.txt").write_text("".join(text), encoding="utf-8")
    subprocess.run(
        [sys.executable, "-m", "fairseq_cli.preprocess", "--only-source", "--trainpref", str(raw / "train.txt"),
         "--validpref", str(raw / "valid.txt"), "--destdir", str(dest), "--thresholdsrc", "3", "--workers", "1"],
        check=True, capture_output=True, env=environment(),
    )
    return dest


def train(data: Path, save_dir: Path, criterion: str, precision: str, max_update: int, cuda: bool, model):
    argv = [
        sys.executable, "-m", "fairseq_cli.train", str(data), "--user-dir", str(REPO / "fairseq_agg"),
        "--task", "language_modeling_agg", "--criterion", criterion, "--agg-alpha", "0.03", *model,
        "--share-decoder-input-output-embed", "--dropout", "0", "--attention-dropout", "0",
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", "5e-4", "--lr-scheduler", "inverse_sqrt",
        "--warmup-updates", "10", "--seed", "1", "--max-update", str(max_update), "--save-dir", str(save_dir),
        "--save-interval-updates", str(max_update), "--no-epoch-checkpoints", "--disable-validation",
        "--log-format", "json", "--log-interval", "1", "--no-progress-bar", "--num-workers", "0",
    ]
    if precision != "fp32":
        argv.append(f"--{precision}")
    if not cuda:
        argv.append("--cpu")
    env = {**environment(), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    records = [json.loads(m.group(1)) for line in proc.stdout.splitlines() if (m := RECORD.search(line))]
    return {"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr, "records": records,
            "save_dir": save_dir}


def load(save_dir: Path):
    return torch.load(save_dir / "checkpoint_last.pt", map_location="cpu", weights_only=False)


def same_counter(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
    )


def check_training(report, out: Path, cuda: bool, updates: int, parallel: int):
    lines = 36718 if cuda else 600  # the whole shipped train split on a GPU, a slice on CPU
    data = binarize(out, lines)
    model = (["--arch", "transformer_lm", "--decoder-layers", "2", "--decoder-embed-dim", "256",
              "--decoder-ffn-embed-dim", "1024", "--decoder-attention-heads", "4",
              "--tokens-per-sample", "256", "--max-tokens", "4096"] if cuda else
             ["--arch", "transformer_lm", "--decoder-layers", "1", "--decoder-embed-dim", "32",
              "--decoder-ffn-embed-dim", "64", "--decoder-attention-heads", "2",
              "--tokens-per-sample", "32", "--max-tokens", "256"])
    half = updates // 2
    precisions = PRECISIONS if cuda else ("bf16",)
    jobs = {("reference", "fp32", "full"): ("agg_cross_entropy", "fp32", updates)}
    for criterion in CRITERIA:
        for precision in precisions:
            jobs[(criterion, precision, "full")] = (criterion, precision, updates)
            jobs[(criterion, precision, "first")] = (criterion, precision, half)
    start = time.time()
    runs_dir = OWNER.replace(out / "runs")

    def run(key):
        criterion, precision, max_update = jobs[key]
        return key, train(data, runs_dir / "-".join(key), criterion, precision, max_update, cuda, model)

    with ThreadPoolExecutor(parallel) as pool:
        results = dict(pool.map(run, jobs))
        resumed_keys = [(c, p, "first") for c in CRITERIA for p in precisions]

        def resume(key):
            criterion, precision, _ = jobs[key]
            return key, train(data, runs_dir / "-".join(key), criterion, precision, updates, cuda, model)

        resumed = dict(pool.map(resume, resumed_keys))
    seconds = (time.time() - start) / max(1, len(jobs) + len(resumed))

    reference = results[("reference", "fp32", "full")]
    if reference["rc"] != 0:
        report.add("fp32 reference run", "FAIL", _last_line(reference), seconds)
        return
    reference_counter = saved_counter_state(load(reference["save_dir"]))
    report.add("fp32 reference run", "pass", f"{updates} updates, final loss {reference['records'][-1]['loss']}", seconds)
    if not cuda:
        check_fp16_refused_on_cpu(report, data, runs_dir, model)
    for criterion in CRITERIA:
        for precision in precisions:
            full = results[(criterion, precision, "full")]
            name = f"{criterion} {precision}, {updates} updates"
            if full["rc"] != 0:
                report.add(name, "FAIL", _last_line(full), seconds)
                continue
            losses = [float(r["loss"]) for r in full["records"]]
            overflows = full["stdout"].count("gradient overflow")
            counter = saved_counter_state(load(full["save_dir"]))
            finite = len(losses) == updates and all(math.isfinite(x) for x in losses)
            counts_equal = same_counter(counter, reference_counter)
            status = "pass" if finite and counts_equal else "FAIL"
            detail = (f"losses finite: {finite} (last {losses[-1] if losses else 'none'}), counter equal to fp32's: "
                      f"{counts_equal}" + (f", {overflows} fp16 overflow(s) skipped batches" if overflows else ""))
            report.add(name, status, detail, seconds, losses=losses)
            check_resume(report, criterion, precision, full, resumed[(criterion, precision, "first")], half, cuda, seconds)


def check_resume(report, criterion, precision, full, resumed, half, cuda, seconds):
    name = f"{criterion} {precision}, stopped at {half} and resumed"
    if resumed["rc"] != 0:
        report.add(name, "FAIL", _last_line(resumed), seconds)
        return
    a, b = load(full["save_dir"]), load(resumed["save_dir"])
    counters = same_counter(saved_counter_state(a), saved_counter_state(b))
    if cuda:
        last_full, last_resumed = float(full["records"][-1]["loss"]), float(resumed["records"][-1]["loss"])
        close = abs(last_full - last_resumed) <= 0.01 * abs(last_full)
        detail = f"counter equal: {counters}, final loss {last_resumed} vs uninterrupted {last_full}"
    else:
        close = all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
        detail = f"counter equal: {counters}, parameters bit-identical: {close}"
    report.add(name, "pass" if counters and close else "FAIL", detail, seconds)


def check_fp16_refused_on_cpu(report, data, runs_dir, model):
    start = time.time()
    run = train(data, runs_dir / "fp16-on-cpu", "agg_cross_entropy", "fp16", 1, False, model)
    lines = [line for line in run["stderr"].splitlines() if line.strip()]
    ok = run["rc"] == 2 and len(lines) == 1 and "--fp16 needs a CUDA GPU" in lines[0]
    report.add("fp16 on CPU refused in one line", "pass" if ok else "FAIL", lines[-1] if lines else "no message",
               time.time() - start)


def _last_line(run) -> str:
    lines = [line for line in (run["stderr"] + run["stdout"]).splitlines() if line.strip()]
    return f"exit {run['rc']}: {lines[-1][:200] if lines else ''}"


# -- 4. host-device synchronisation ----------------------------------------------------------------
def check_no_sync(report, cuda: bool):
    name = "no host-device sync per micro-batch"
    if not cuda:
        report.add(name, "skip", "needs CUDA (torch.cuda.set_sync_debug_mode)")
        return
    from fairseq_agg import core

    start = time.time()
    device = torch.device("cuda")
    vocab, dim, rows, pad = 44256, 1024, 4096, 1
    counter = core.TokenCounter(vocab, 4, window=10).to(device)
    targets = torch.randint(4, vocab, (rows,), device=device)
    for _ in range(3):
        counter.add(targets, pad)
        counter.commit()
    gates = core.compute_gates(counter.average(), 0.03, 4).to(device)  # once per update, not per micro-batch
    h = torch.randn(rows, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(vocab, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    try:
        for chunk_rows in (0, 1024):
            core.gated_loss(h, w, targets, gates, ignore_index=pad, chunk_rows=chunk_rows)[0].backward()  # warm-up
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                loss, _, _ = core.gated_loss(h, w, targets, gates, ignore_index=pad, chunk_rows=chunk_rows)
                loss.backward()
                counter.add(targets, pad)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        report.add(name, "pass", "gated loss forward+backward (single and chunked) and counting ran under "
                   "set_sync_debug_mode('error')", time.time() - start)
    except RuntimeError as error:
        report.add(name, "FAIL", str(error).splitlines()[0][:200], time.time() - start)


# -- 5. benchmark ------------------------------------------------------------------------------------
def check_bench(report, out: Path, cuda: bool):
    start = time.time()
    methods = ["fairseq_ce", "agg", "agg_chunked", "torch_lce_chunked"]
    shape = (["--device", "cuda", "--vocab", "44256", "--tokens", "8192", "--dim", "1024", "--layers", "1",
              "--heads", "16", "--seq-len", "512", "--steps", "10", "--warmup", "2"] if cuda else
             ["--vocab", "2000", "--tokens", "256", "--dim", "64", "--layers", "1", "--heads", "2", "--seq-len", "64",
              "--steps", "2", "--warmup", "1", "--window", "3", "--chunk", "64"])
    path = out / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), *shape, "--dtype", "bf16", "--methods", *methods,
         "--json", str(path)],
        capture_output=True, text=True, env=environment(),
    )
    if proc.returncode != 0:
        report.add("output-layer benchmark", "FAIL", _last_line({"rc": proc.returncode, "stderr": proc.stderr, "stdout": ""}),
                   time.time() - start)
        return
    (row,) = json.loads(path.read_text())["results"]
    cells = []
    for m in methods:
        r = row["methods"][m]
        cells.append(f"{m} {row['tokens'] / r['time_s']:,.0f} tok/s {r['peak_bytes'] / 2**20:,.0f} MiB")
    report.add(f"output-layer bench bf16 V={row['vocab']} d={json.loads(path.read_text())['dim']}", "pass",
               "; ".join(cells), time.time() - start, bench=row)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "gpu-check",
                        help="a new or empty folder, or an earlier check's (default: %(default)s)")
    parser.add_argument("--updates", type=int, default=None, help="updates per training run (default: 100 on GPU, 6 on CPU)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: this machine has no CUDA GPU visible to torch")
    updates = args.updates or (100 if cuda else 6)
    if updates < 2:
        parser.error("--updates must be at least 2 (the resume check stops half-way)")
    args.out = args.out.resolve()  # "--out ." is refused by its name
    try:  # before any check starts
        OWNER.refuse_unless_ours(args.out, args.out / "runs")
    except AggConfigError as refusal:
        parser.exit(2, f"{parser.prog}: error: {refusal}\n")
    OWNER.claim(args.out)
    device_name = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores), reduced form"
    print(f"[gpu-check] {device_name}; torch {torch.__version__}; results in {args.out}", flush=True)
    report = Report()
    start = time.time()
    check_gradients(report, "cuda" if cuda else "cpu")
    check_no_sync(report, cuda)
    check_training(report, args.out, cuda, updates, parallel=3 if cuda else 2)
    check_bench(report, args.out, cuda)
    print()
    print(f"gpu-check on {device_name}: {len(report.failed)} of {len(report.rows)} checks failed "
          f"({time.time() - start:.0f} s)")
    print(report.table())
    (args.out / "gpu-check.json").write_text(json.dumps(
        {"device": device_name, "torch": torch.__version__, "cuda": cuda, "updates": updates,
         "seconds": round(time.time() - start, 1), "checks": report.rows}, indent=2))
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
