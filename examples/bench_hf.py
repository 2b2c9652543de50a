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
median to the stock Trainer's in the same round. Memory: the peak of the tensor memory one step
allocates and holds at once, from torch's profiler (``fairseq_agg.peak_memory``, as
``scripts/bench.py`` measures it: exact, never negative), in one more run per method after the
timed rounds (the last of its steps). Data: the shipped WikiText-2 slice through the
shipped GPT-2 BPE, so the rare tokens are those of real text.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from fairseq_agg.peak_memory import PeakMemory

REPO = Path(__file__).resolve().parents[1]
METHODS = ("stock", "agg", "agg_chunked")


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
        """Each step's time, and with ``measure_memory`` its peak bytes (the profiler slows the
        step, so the two are taken in separate runs)."""

        def __init__(self):
            self.times, self.peaks = [], []
            self.measure_memory = False

        def on_step_begin(self, *a, **k):
            if self.measure_memory:
                self.meter = PeakMemory("cpu").start()
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.start)
            if self.measure_memory:
                self.peaks.append(self.meter.stop())

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


def step_peak_bytes(trainer, timer):
    """Peak bytes of the last step of one more run of ``trainer`` (its optimizer state made)."""
    timer.measure_memory, timer.peaks = True, []
    try:
        trainer.train()
    finally:
        timer.measure_memory = False
    return timer.peaks[-1]


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
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="bench_hf_"))
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
    results = {"settings": {k: v for k, v in vars(args).items() if k != "json"},
               "torch": torch.__version__, "cpu_count": os.cpu_count(), "methods": {}}
    for m in args.methods:
        entry = {"median_step_ms": 1e3 * statistics.median(steps[m])}
        if "stock" in args.methods:
            ratios = sorted(a / s for a, s in zip(medians[m], medians["stock"]))
            q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
            entry.update(time_ratio=statistics.median(ratios), time_ratio_quartiles=[q[0], q[2]])
        if not args.no_memory:
            entry["peak_mib"] = step_peak_bytes(*trainers[m]) / 2**20
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
