#!/usr/bin/env python3
"""Step time and peak memory of the output layer + loss: fairseq's ``cross_entropy``, the
paper's naive three-logit AGG, fairseq-agg's AGG (one logits tensor, and chunked), torch's
``F.linear_cross_entropy`` (reference path, and chunked with ``LinearCrossEntropyOptions``), and
AGG's gated output layer (``gated``: ``GatedOutputLayer``, then ``F.cross_entropy`` on its
logits, as a model that computes its own loss runs it) beside its anchor ``linear_ce``
(``nn.Linear``, then the same ``F.cross_entropy``).

Each measurement is one training step (forward and backward) of the same model on the same
batch: a ``transformer_lm`` decoder whose size you choose, a vocabulary of V tokens and
Zipf-distributed targets (so that the rare group and the rare-target rows are realistic), the
AGG gates coming from a token counter fed with such batches.

    python scripts/bench.py                              # CPU, a quick grid
    python scripts/bench.py --device cuda --dtype fp16 --vocab 44256 --tokens 8192 --dim 1024 --layers 24
    python scripts/bench.py --vocab 32000 --tokens 4096 --dim 512 --layers 1 --methods linear_ce gated
    python scripts/bench.py --vocab 50000 --tokens 8192 --dim 1024 --vocab-parallel 2

``--vocab-parallel N`` measures instead the peak memory of ``agg.loss`` (forward and backward)
in this process with the whole weight, then in each of N CPU processes that it starts with
``torchrun`` (gloo) with the weight sharded over the vocabulary by ``ColwiseParallel`` and
``vocab_parallel=True``, and prints both and their ratio.

The gates are those of a steady state: the counter has seen ``--window`` (20) updates of
``--tokens`` Zipf-distributed targets, so that at alpha 0.03 the rare group is the tail of the
vocabulary (22-61% of it at V = 32k-50k and 4096-8192 tokens; the table gives each run's share).

Prints a table and writes JSON (--json). Times are medians over --steps steps after
--warmup steps; ratios are against each anchor in the run (fairseq's cross_entropy, torch's
chunked path, linear_ce): for the methods timed round by round with it, the median over
rounds of each round's ratio, with its
quartiles (cheaper to make steady on a busy machine than a ratio of medians). Peak memory is
the peak of the tensor memory one step holds beyond what was allocated before it:
``torch.cuda.max_memory_allocated`` on GPU; on CPU, the peak of the running sum of the step's
allocations and their frees as torch's profiler records them (``profile_memory``: every tensor
allocation, kernel temporaries included), so it is exact and never negative, whatever the
allocator keeps or returns to the OS. The two differ only by memory allocated before the step
and freed during it, which the CPU figure does not subtract (torch warns of it once): here the
AGG steps' counter replacing its vocabulary-sized counts, kilobytes (the gradients are set to
None before every step).
"""

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fairseq_agg import core  # noqa: E402
from fairseq_agg.peak_memory import peak_live_bytes  # noqa: E402

METHODS = ["fairseq_ce", "naive_3logit", "agg", "agg_chunked", "torch_lce", "torch_lce_chunked", "linear_ce", "gated"]
# time and memory ratios are given against these (linear_ce: the gated output layer's own anchor)
ANCHORS = ["fairseq_ce", "torch_lce_chunked", "linear_ce"]
NSPECIAL = 4  # fairseq's bos, pad, eos, unk: never rare


def build_model(vocab, dim, layers, heads, device, dtype):
    from argparse import Namespace

    from fairseq.data import Dictionary
    from fairseq.models.transformer_lm import TransformerLanguageModel, base_lm_architecture

    dictionary = Dictionary()
    for i in range(vocab - len(dictionary)):
        dictionary.add_symbol(f"w{i}")
    args = Namespace(
        decoder_layers=layers, decoder_embed_dim=dim, decoder_ffn_embed_dim=4 * dim,
        decoder_attention_heads=heads, share_decoder_input_output_embed=True, dropout=0.0,
        tokens_per_sample=2048, max_target_positions=2048,
    )
    base_lm_architecture(args)
    task = Namespace(source_dictionary=dictionary, target_dictionary=dictionary)
    model = TransformerLanguageModel.build_model(args, task).to(device=device, dtype=dtype)
    return model, dictionary


def zipf_tokens(shape, vocab, nspecial, generator):
    ranks = torch.arange(1, vocab - nspecial + 1, dtype=torch.float64)
    probs = 1.0 / ranks
    draws = torch.multinomial(probs / probs.sum(), int(torch.tensor(shape).prod()), replacement=True, generator=generator)
    return (draws + nspecial).view(shape)


def fairseq_ce_loss(model, sample, criterion):
    loss, _, _ = criterion(model, sample)
    return loss


def naive_three_logit_loss(model, sample, gates, pad):
    """The paper's eqs. 9-10, as the original research code computed it."""
    features, _ = model(sample["net_input"]["src_tokens"], features_only=True)
    h = features.reshape(-1, features.size(-1))
    w = model.decoder.output_projection.weight
    y = sample["target"].reshape(-1)
    rare_row = gates.rare[y]
    g1 = torch.where(gates.rare, gates.g1, torch.ones_like(gates.g1)).to(h.dtype).expand(y.numel(), -1).clone()
    g2 = gates.g2.to(h.dtype).expand(y.numel(), -1).clone()
    g1.scatter_(1, y.unsqueeze(1), 1.0)
    g2.scatter_(1, y.unsqueeze(1), 1.0)
    z0 = h @ w.detach().t()
    z1 = g1 * (h.detach() @ w.t()) + (1 - g1) * (h.detach() @ w.detach().t())
    z2 = g2 * (h.detach() @ w.t()) + (1 - g2) * (h.detach() @ w.detach().t())

    def nll(z):
        return F.nll_loss(F.log_softmax(z.float(), -1), y, ignore_index=pad, reduction="none")

    return nll(z0).sum() + (nll(z1) * (~rare_row)).sum() + (nll(z2) * rare_row).sum()


def agg_loss(model, sample, gates, pad, chunk_rows, bookkeeping):
    bookkeeping()
    features, _ = model(sample["net_input"]["src_tokens"], features_only=True)
    loss, _, _ = core.gated_loss(
        features.reshape(-1, features.size(-1)), model.decoder.output_projection.weight,
        sample["target"], gates, ignore_index=pad, chunk_rows=chunk_rows,
    )
    return loss


def torch_linear_cross_entropy_loss(model, sample, pad, chunked):
    """torch's own fused output layer + cross-entropy: the reference path (``options=None``:
    one logits tensor) or the chunked one that never holds the logits."""
    features, _ = model(sample["net_input"]["src_tokens"], features_only=True)
    options = torch.nn.LinearCrossEntropyOptions() if chunked else None
    return F.linear_cross_entropy(
        features.reshape(-1, features.size(-1)), model.decoder.output_projection.weight,
        sample["target"].reshape(-1), reduction="sum", ignore_index=pad, options=options,
    )


def linear_cross_entropy_loss(model, sample, pad):
    """The model's ``nn.Linear`` output layer, then ``F.cross_entropy`` on its logits: the anchor
    of the gated output layer."""
    features, _ = model(sample["net_input"]["src_tokens"], features_only=True)
    logits = model.decoder.output_projection(features)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), sample["target"].view(-1), ignore_index=pad,
                           reduction="sum")


def gated_layer_loss(model, sample, layer, agg, pad, bookkeeping):
    """``GatedOutputLayer`` in place of the ``nn.Linear`` (the same weight), then the same
    ``F.cross_entropy`` on its logits: what a model that computes its own loss runs under AGG."""
    bookkeeping()
    features, _ = model(sample["net_input"]["src_tokens"], features_only=True)
    target = sample["target"]
    with agg.targets(target.masked_fill(target == pad, agg.ignore_index)):
        logits = layer(features)
    # Counted as in training, then forgotten: the gates stay the steady state measured.
    agg.discard_pending()
    return F.cross_entropy(logits.view(-1, logits.size(-1)), target.view(-1), ignore_index=pad, reduction="sum")


def timed_step(step, model, device):
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def peak_memory(step, model, device):
    """Bytes allocated at the peak of one step (forward and backward) beyond what was allocated before it."""
    model.zero_grad(set_to_none=True)
    return peak_live_bytes(lambda: step().backward(), device)


def measure_all(steps, model, device, warmup, repeats, naive_repeats):
    """Median step time per method: the methods interleaved round by round (in a rotating
    order) so that drift of the machine's speed hits them alike, except the naive three-logit
    form, timed in rounds of its own afterwards (it allocates and frees gigabytes, and the page
    faults that follow slow whichever step comes next); then peak memory, one method at a time."""
    for name, step in steps.items():
        for _ in range(warmup):
            timed_step(step, model, device)
    times = {name: [] for name in steps}
    names = [name for name in steps if name != "naive_3logit"]
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timed_step(steps[name], model, device))
    if "naive_3logit" in steps:
        for _ in range(naive_repeats if repeats else 0):
            times["naive_3logit"].append(timed_step(steps["naive_3logit"], model, device))
    results = {name: ({"time_s": statistics.median(t)} if t else {}) for name, t in times.items()}
    for anchor in ANCHORS:
        if anchor not in steps or not repeats:
            continue
        # Steps of one round ran seconds apart, so their ratio cancels the machine's drift
        # over the run; the median over rounds and its quartiles show how steady that is.
        for name in names:
            ratios = [t / a for t, a in zip(times[name], times[anchor])]
            results[name].setdefault("paired_ratio_vs", {})[anchor] = {
                "median": statistics.median(ratios), "quartiles": _quartiles(ratios)}
            if anchor == "fairseq_ce":
                results[name]["paired_ratio"] = statistics.median(ratios)
                results[name]["paired_ratio_quartiles"] = _quartiles(ratios)
    for name, step in steps.items():
        results[name]["peak_bytes"] = peak_memory(step, model, device)
    return results


def _quartiles(values):
    if len(values) < 2:
        return [values[0], values[0]]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return [q1, q3]


def steady_counter(vocab, nspecial, tokens, window, generator):
    """A token counter that has seen ``window`` updates of ``tokens`` Zipf-distributed targets:
    the gates of a run well past its first epoch (the module's docstring gives the rare share)."""
    counter = core.TokenCounter(vocab, nspecial, window=window)
    for _ in range(window):
        counter.add(zipf_tokens((tokens,), vocab, nspecial, generator))
        counter.commit()
    return counter


def build_steps(args, vocab, tokens, device, dtype):
    """The model, its batch, the steady-state gates and one step function per method of
    ``args.methods`` (each returns the loss of one forward; the caller runs its backward)."""
    from argparse import Namespace

    from fairseq.criterions.cross_entropy import CrossEntropyCriterion

    from fairseq_agg.training import AdaptiveGradientGating

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model, dictionary = build_model(vocab, args.dim, args.layers, args.heads, device, dtype)
    model.train()
    pad, nspecial = dictionary.pad(), dictionary.nspecial
    seq_len = min(args.seq_len, tokens)
    bsz = tokens // seq_len
    tokens_in = zipf_tokens((bsz, seq_len), vocab, nspecial, generator).to(device)
    sample = {
        "net_input": {"src_tokens": tokens_in, "src_lengths": torch.full((bsz,), seq_len, device=device)},
        "target": torch.roll(tokens_in, -1, dims=1),
        "ntokens": tokens,
    }
    counter = steady_counter(vocab, nspecial, tokens, args.window, generator)
    gates = core.compute_gates(counter.average(), args.alpha, nspecial).to(device)
    # The per-update bookkeeping of AGG (count the targets, close the update, recompute the
    # gates) is timed with the AGG steps; it runs on a copy of the counter whose drift (the same
    # batch counted again and again) must not change the gates the losses use.
    bookkeeping_counter = copy.deepcopy(counter).to(device)

    def bookkeeping():
        bookkeeping_counter.add(sample["target"], pad)
        bookkeeping_counter.commit()
        core.compute_gates(bookkeeping_counter.average(), args.alpha, nspecial)
    # The gated output layer's AGG holds the same counter, so the same gates.
    agg = AdaptiveGradientGating(vocab, alpha=args.alpha, window=args.window, nspecial=nspecial)
    agg.load_state_dict(counter.state_dict())
    gated_layer = agg.gated_output_layer(model.decoder.output_projection)
    criterion = CrossEntropyCriterion(Namespace(target_dictionary=dictionary), sentence_avg=False)
    steps = {
        "fairseq_ce": lambda: fairseq_ce_loss(model, sample, criterion),
        "naive_3logit": lambda: naive_three_logit_loss(model, sample, gates, pad),
        "agg": lambda: agg_loss(model, sample, gates, pad, 0, bookkeeping),
        "agg_chunked": lambda: agg_loss(model, sample, gates, pad, None if args.chunk == "auto" else int(args.chunk),
                                        bookkeeping),
        "torch_lce": lambda: torch_linear_cross_entropy_loss(model, sample, pad, chunked=False),
        "torch_lce_chunked": lambda: torch_linear_cross_entropy_loss(model, sample, pad, chunked=True),
        "linear_ce": lambda: linear_cross_entropy_loss(model, sample, pad),
        "gated": lambda: gated_layer_loss(model, sample, gated_layer, agg, pad, bookkeeping),
    }
    return Namespace(model=model, sample=sample, gates=gates, steps={name: steps[name] for name in args.methods})


def run_config(args, vocab, tokens, device, dtype):
    bench = build_steps(args, vocab, tokens, device, dtype)
    rare_rows = float(bench.gates.rare[bench.sample["target"]].float().mean())
    results = measure_all(bench.steps, bench.model, device, args.warmup, args.steps, args.naive_steps)
    for name, r in results.items():
        print(f"  {name:<17} {r.get('time_s', float('nan')) * 1e3:9.1f} ms  {r['peak_bytes'] / 2**20:9.1f} MiB",
              file=sys.stderr, flush=True)
    chunk_rows = core.auto_chunk_rows(tokens, vocab, args.dim) if args.chunk == "auto" else int(args.chunk)
    return {"vocab": vocab, "tokens": tokens, "rare_tokens": bench.gates.num_rare,
            "rare_token_fraction": bench.gates.num_rare / vocab, "rare_target_fraction": rare_rows,
            "agg_chunk_rows": chunk_rows, "methods": results}


# -- the vocabulary-parallel loss ----------------------------------------------------------------
def vocab_parallel_inputs(args, vocab, tokens, dtype):
    """An output layer, its features, Zipf labels and an AGG whose counter is in the steady state
    of the main benchmark: the same in every process (seeded), as tensor parallelism needs."""
    from fairseq_agg.training import AdaptiveGradientGating

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(args.dim, vocab, bias=False, dtype=dtype)
    hidden = torch.randn(tokens, args.dim, generator=generator).to(dtype).requires_grad_()
    labels = zipf_tokens((tokens,), vocab, NSPECIAL, generator)
    agg = AdaptiveGradientGating(vocab, alpha=args.alpha, window=args.window, nspecial=NSPECIAL,
                                 chunk_size=None if args.chunk == "auto" else int(args.chunk))
    agg.load_state_dict(steady_counter(vocab, NSPECIAL, tokens, args.window, generator).state_dict())
    return head, hidden, labels, agg


def agg_loss_peak(head, hidden, labels, agg, vocab_parallel):
    """Peak bytes of one forward and backward of ``agg.loss`` (after one that is not measured)."""
    def step():
        agg.loss(hidden, head.weight, labels, reduction="sum", vocab_parallel=vocab_parallel).backward()
        agg.discard_pending()  # counted as in training, then forgotten: the gates stay as measured

    step()
    head.weight.grad = hidden.grad = None
    return peak_live_bytes(step, torch.device("cpu"))


def vocab_parallel_worker(args, dtype):
    """One process of ``--vocab-parallel`` (under torchrun): the output layer sharded over the
    vocabulary by ``ColwiseParallel``; its peak for every shape, written to ``DIR/rank<R>.json``."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    results = []
    for vocab in args.vocab:
        for tokens in args.tokens:
            head, hidden, labels, agg = vocab_parallel_inputs(args, vocab, tokens, dtype)
            parallelize_module(head, mesh, ColwiseParallel())
            results.append({"vocab": vocab, "tokens": tokens, "local_rows": head.weight.to_local().size(0),
                            "peak_bytes": agg_loss_peak(head, hidden, labels, agg, vocab_parallel=True)})
    with open(os.path.join(args.vocab_parallel_worker, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


def vocab_parallel(args, dtype):
    """``--vocab-parallel N``: the peak memory of ``agg.loss`` in one process with the whole
    weight, then per process of ``torchrun --nproc-per-node N`` (gloo) with ``vocab_parallel=True``."""
    rows = []
    for vocab in args.vocab:
        for tokens in args.tokens:
            head, hidden, labels, agg = vocab_parallel_inputs(args, vocab, tokens, dtype)
            rows.append({"vocab": vocab, "tokens": tokens, "dim": args.dim, "rare_tokens": agg.num_rare,
                         "one_process_peak_bytes": agg_loss_peak(head, hidden, labels, agg, vocab_parallel=False)})
    shapes = ["--vocab", *map(str, args.vocab), "--tokens", *map(str, args.tokens), "--dim", str(args.dim),
              "--alpha", str(args.alpha), "--window", str(args.window), "--chunk", str(args.chunk),
              "--dtype", args.dtype]
    # torchrun gives each process one thread unless told otherwise: the cores shared out
    threads = os.environ.get("OMP_NUM_THREADS", str(max(1, torch.get_num_threads() // args.vocab_parallel)))
    with tempfile.TemporaryDirectory(prefix="bench-vocab-parallel-") as out:
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
             str(args.vocab_parallel), os.path.abspath(__file__), "--vocab-parallel-worker", out, *shapes],
            env={**os.environ, "OMP_NUM_THREADS": threads}, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"bench.py: the {args.vocab_parallel} torchrun processes failed (exit {proc.returncode}); "
                     f"their output ends:\n{(proc.stdout + proc.stderr)[-3000:]}")
        ranks = []
        for rank in range(args.vocab_parallel):
            with open(os.path.join(out, f"rank{rank}.json")) as f:
                ranks.append(json.load(f))
    for row, per_rank in zip(rows, zip(*ranks)):
        row["per_process_peak_bytes"] = [r["peak_bytes"] for r in per_rank]
        row["local_rows"] = [r["local_rows"] for r in per_rank]
        row["ratio"] = max(row["per_process_peak_bytes"]) / row["one_process_peak_bytes"]
    print(f"agg.loss forward and backward, peak MiB: one process with the whole weight, and each of "
          f"{args.vocab_parallel} processes with its 1/{args.vocab_parallel} (ColwiseParallel, "
          f"vocab_parallel=True, gloo); {args.dtype}, d={args.dim}, chunk rows {args.chunk}")
    print("| vocab | tokens | rare tokens | one process MiB | per process MiB (each rank) | per process / one |")
    print("|---|---|---|---:|---:|---:|")
    for row in rows:
        each = ", ".join(f"{b / 2**20:.1f}" for b in row["per_process_peak_bytes"])
        print(f"| {row['vocab']} | {row['tokens']} | {row['rare_tokens']} ({row['rare_tokens'] / row['vocab']:.0%}) | "
              f"{row['one_process_peak_bytes'] / 2**20:.1f} | {each} | {row['ratio']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"vocab_parallel": args.vocab_parallel, "dtype": args.dtype, "dim": args.dim, "results": rows},
                      f, indent=2)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--vocab", type=int, nargs="+", default=[8192, 32768, 50000])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096], help="tokens per micro-batch")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=0.03,
                        help="AGG alpha for the counter fed with --tokens per update (sets how many tokens are rare)")
    parser.add_argument("--window", type=int, default=20, help="updates fed to the counter before measuring")
    parser.add_argument("--chunk", default="auto",
                        help="rows per chunk of agg_chunked; auto (default): as the criteria pick it by shape")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--naive-steps", type=int, default=3,
                        help="timed steps of the naive three-logit form, in rounds of its own (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method, interleaved")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--vocab-parallel", type=int, default=None, metavar="N",
                        help="instead: the peak memory of agg.loss with the output layer sharded over the vocabulary "
                             "on N CPU processes (torchrun, gloo; launched here) against one process")
    parser.add_argument("--vocab-parallel-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.vocab_parallel is not None:
        if args.vocab_parallel < 2:
            parser.error(f"--vocab-parallel needs 2 or more processes, got {args.vocab_parallel}")
        if args.device != "cpu":
            parser.error("--vocab-parallel runs on CPU processes (gloo): leave --device out")
        if min(args.vocab) < args.vocab_parallel:
            parser.error(f"--vocab {min(args.vocab)} has fewer rows than --vocab-parallel {args.vocab_parallel} processes")
    return args


def main(argv=None):
    args = parse_args(argv)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    if args.vocab_parallel_worker:
        return vocab_parallel_worker(args, dtype)
    if args.vocab_parallel:
        return vocab_parallel(args, dtype)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {name}, dtype: {args.dtype}, model: {args.layers} layers d={args.dim}", file=sys.stderr)
    rows = []
    for vocab in args.vocab:
        for tokens in args.tokens:
            print(f"vocab {vocab}, {tokens} tokens:", file=sys.stderr, flush=True)
            rows.append(run_config(args, vocab, tokens, device, dtype))
    anchors = [a for a in ANCHORS if a in args.methods]
    print(f"time: median ms per step (paired ratio against {' / '.join(anchors)}, median and quartiles over "
          f"rounds); memory: peak MiB (ratio against {' / '.join(anchors)})")
    header = "| vocab | tokens | rare tokens | rare-target rows | " + " | ".join(
        f"{m} ms | {m} MiB" for m in args.methods) + " |"
    print(header)
    print("|" + "---|" * (4 + 2 * len(args.methods)))
    for row in rows:
        cells = []
        for m in args.methods:
            r = row["methods"][m]
            if "time_s" not in r:
                continue
            t_ratios, m_ratios = [], []
            for anchor in anchors:
                base = row["methods"][anchor]
                paired = r.get("paired_ratio_vs", {}).get(anchor)
                if m == anchor:
                    t_ratios.append("1")
                elif paired:
                    q1, q3 = paired["quartiles"]
                    t_ratios.append(f"{paired['median']:.3f}x [{q1:.3f}-{q3:.3f}]")
                else:
                    t_ratios.append(f"{r['time_s'] / base['time_s']:.2f}x")
                m_ratios.append(f"{r['peak_bytes'] / base['peak_bytes']:.2f}x" if base["peak_bytes"] > 0 else "-")
            t_note = f" ({' / '.join(t_ratios)})" if anchors else ""
            m_note = f" ({' / '.join(m_ratios)})" if anchors else ""
            cells += [f"{r['time_s'] * 1e3:.1f}{t_note}", f"{r['peak_bytes'] / 2**20:.1f}{m_note}"]
        print(f"| {row['vocab']} | {row['tokens']} | {row['rare_tokens']} ({row['rare_token_fraction']:.0%}) | "
              f"{row['rare_target_fraction']:.1%} | "
              + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "dtype": args.dtype, "dim": args.dim, "layers": args.layers,
                       "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
