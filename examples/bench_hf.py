"""Step time and peak memory of ``AggTrainer`` against the stock ``Trainer`` (the model's own
loss) on the same tiny GPT-2, on CPU.

    python examples/bench_hf.py                      # GPT-2 vocabulary (50,257), 8 x 128 tokens per step
    python examples/bench_hf.py --vocab 8192 --rounds 5

A step is one whole optimizer step of the Trainer (forward, backward, AdamW, and for AGG the
counter's commit), timed between the ``on_step_begin`` and ``on_step_end`` callbacks. Methods:
``stock`` (``transformers.Trainer``), ``agg`` (``AggTrainer``, one logits tensor inside the
loss) and ``agg_chunked`` (``AggTrainer(agg_chunk_size=...)``, never all logits at once).
Time: the methods run in paired rounds (rotating order, ``--steps`` steps each); per method
the median step time, and the median (and quartiles) over rounds of the ratio of a round's
median to the stock Trainer's in the same round. Memory: peak resident memory during one step
above the resident memory at its start, measured in a child process per method with
``MALLOC_MMAP_THRESHOLD_`` set so that large blocks go back to the OS when freed (as
``scripts/bench.py`` measures CPU memory). Data: the shipped WikiText-2 slice through the
shipped GPT-2 BPE, so the rare tokens are those of real text.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
METHODS = ("stock", "agg", "agg_chunked")


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def build(method, args, out_dir):
    import fairseq_agg.hf as agg_hf  # before transformers' models
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

    from fairseq_agg.hf_demo import Blocks, gpt2_tokenizer

    tokenizer = gpt2_tokenizer()
    lines = (REPO / "data" / "wikitext-2" / "wiki.train.tokens").read_text(encoding="utf-8").splitlines()[: args.lines]
    ids = torch.tensor(tokenizer("\n".join(lines))["input_ids"])
    if args.vocab < 50257:  # a smaller vocabulary: the ids by frequency, the rest mapped to the last id
        order = torch.bincount(ids, minlength=50257).argsort(descending=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel())
        ids = rank[ids].clamp(max=args.vocab - 1)
    train = Blocks(ids, args.seq_len)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.peaks = [], []

        def on_step_begin(self, *a, **k):
            if args.memory:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets the peak resident set (VmHWM) to the current one
                self.base = _status_kb("VmRSS")
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.start)
            if args.memory:
                self.peaks.append((_status_kb("VmHWM") - self.base) * 1024)

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=args.vocab, n_positions=args.seq_len + 1, n_embd=args.dim, n_layer=args.layers,
                        n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                        use_cache=False)
    model = GPT2LMHeadModel(config)
    training_args = TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=args.batch, max_steps=args.steps, learning_rate=1e-3,
        use_cpu=True, save_strategy="no", report_to="none", disable_tqdm=True, logging_strategy="no", seed=1,
        dataloader_num_workers=0,
    )
    timer = StepTimer()
    if method == "stock":
        trainer = Trainer(model=model, args=training_args, train_dataset=train, callbacks=[timer])
    else:
        chunk = args.chunk if method == "agg_chunked" else 0
        trainer = agg_hf.AggTrainer(model=model, args=training_args, train_dataset=train, callbacks=[timer],
                                    agg_alpha=args.alpha, agg_chunk_size=chunk)
    return trainer, timer


def memory_child(args, method):
    """Peak bytes of one step above its start, in a fresh process (after warm-up steps)."""
    argv = [sys.executable, __file__, "--child-memory", method, *args.passthrough]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run(argv, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_bytes"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--alpha", type=float, default=0.03)
    p.add_argument("--chunk", type=int, default=256, help="positions per chunk of agg_chunked (default: %(default)s)")
    p.add_argument("--lines", type=int, default=600, help="WikiText-2 train lines to tokenize (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=4, help="timed steps per method and round (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default: %(default)s)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--child-memory", choices=METHODS, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    args.passthrough = [a for k in ("vocab", "dim", "layers", "seq_len", "batch", "alpha", "chunk", "lines", "threads")
                        for a in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]
    torch.set_num_threads(args.threads)
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="bench_hf_"))
    if args.child_memory:
        args.memory, args.steps = True, 3
        trainer, timer = build(args.child_memory, args, work)
        trainer.train()
        print(json.dumps({"peak_bytes": timer.peaks[-1]}))
        return None
    args.memory = False
    trainers = {m: build(m, args, work / m) for m in args.methods}
    for trainer, _ in trainers.values():  # warm-up (and a filled AGG counter)
        trainer.train()
    medians = {m: [] for m in args.methods}
    steps = {m: [] for m in args.methods}
    for r in range(args.rounds):
        order = args.methods[r % len(args.methods):] + args.methods[: r % len(args.methods)]
        for m in order:
            trainer, timer = trainers[m]
            timer.times = []
            trainer.train()
            steps[m] += timer.times
            medians[m].append(statistics.median(timer.times))
    results = {"settings": {k: v for k, v in vars(args).items() if k not in ("passthrough", "json", "child_memory")},
               "torch": torch.__version__, "cpu_count": os.cpu_count(), "methods": {}}
    for m in args.methods:
        entry = {"median_step_ms": 1e3 * statistics.median(steps[m])}
        if "stock" in args.methods:
            ratios = sorted(a / s for a, s in zip(medians[m], medians["stock"]))
            q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
            entry.update(time_ratio=statistics.median(ratios), time_ratio_quartiles=[q[0], q[2]])
        if not args.no_memory:
            entry["peak_mib"] = memory_child(args, m) / 2**20
        results["methods"][m] = entry
    if "agg" in trainers:
        results["agg_rare_tokens"] = trainers["agg"][0].agg.num_rare
    print(f"tiny GPT-2: vocab {args.vocab}, d={args.dim}, {args.layers} layers, {args.batch} x {args.seq_len} tokens "
          f"per step, {args.threads} thread(s), {args.rounds} rounds x {args.steps} steps; AGG rare tokens: "
          f"{results.get('agg_rare_tokens')}")
    print("| method | step ms (median) | time vs stock (median [quartiles] of paired rounds) | peak MiB per step | memory vs stock |")
    print("|---|---|---|---|---|")
    stock_mem = results["methods"].get("stock", {}).get("peak_mib")
    for m, e in results["methods"].items():
        ratio = f"{e['time_ratio']:.2f} [{e['time_ratio_quartiles'][0]:.2f}, {e['time_ratio_quartiles'][1]:.2f}]" if "time_ratio" in e else "-"
        mem = f"{e['peak_mib']:.1f}" if "peak_mib" in e else "-"
        mem_ratio = f"{e['peak_mib'] / stock_mem:.2f}" if stock_mem and "peak_mib" in e else "-"
        print(f"| {m} | {e['median_step_ms']:.1f} | {ratio} | {mem} | {mem_ratio} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
