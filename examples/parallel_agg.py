"""AGG under FSDP2 x tensor parallelism: a small GPT trained word-level on the shipped WikiText-2
slice by 4 CPU processes (gloo) on a 2 x 2 mesh, FSDP2 over its "dp" dimension and tensor
parallelism over its "tp" dimension, with the plain API's fused loss.

    torchrun --nproc-per-node 4 examples/parallel_agg.py            # AGG, 300 steps (minutes)
    torchrun --nproc-per-node 4 examples/parallel_agg.py --mle      # the same run with plain cross-entropy
    torchrun --nproc-per-node 4 examples/parallel_agg.py --quick    # 6 steps on the first 200 lines (seconds)

Tensor parallel: every block (ColwiseParallel on q, k, v and the MLP's first linear, RowwiseParallel
on the attention output and the MLP's second linear) and the output layer (ColwiseParallel: each
tp process holds a slice of the vocabulary); the embeddings and norms are replicated over tp. FSDP2
shards every block as a unit and the rest in the root unit, which owns the output layer: AGG's loss
runs inside the root's forward, where FSDP2 has gathered the head over dp and its weight is the
vocabulary-sharded DTensor of the tp mesh (agg.loss(..., vocab_parallel=True)); the logits are
never built whole, nor is the head gathered over tp. The embedding and the head are untied (tying
an embedding to a tensor-parallel head is out of scope here). Evaluation and --mle use torch's
loss_parallel() on the vocabulary-sharded logits.

The lines that AGG adds to a loop are marked ``# AGG``. Measured: the default run took 8.5 minutes
(7.5 of them training, 550 CPU seconds in all) on 2 CPU cores shared with other work, 4 processes
of one thread each; valid perplexity 136.9, I(W) 0.935, rare group 1,560.
"""
import argparse, math, os, sys, time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, loss_parallel, parallelize_module

from fairseq_agg.errors import AggConfigError
from fairseq_agg.isotropy import isotropy
from fairseq_agg.training import AdaptiveGradientGating, check_options  # AGG
from nanogpt_agg import _given, _HelpFormatter, load  # the data and --help of the one-process example


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.head_dim = d // heads
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        B, T, _ = x.shape
        # -1 heads: under tensor parallelism q, k and v hold this process's heads/tp heads only.
        q, k, v = (f(x).view(B, T, -1, self.head_dim).transpose(1, 2) for f in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab, d, layers, heads, block):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)  # untied from self.tok
        for emb in (self.tok, self.pos):
            nn.init.normal_(emb.weight, std=0.02)

    def forward(self, idx, targets, agg=None):  # the mean loss over this process's targets
        x = self.tok(idx) + self.pos(torch.arange(idx.size(1)))
        for block in self.blocks:
            x = block(x)
        h = self.ln(x)
        if agg is not None:  # AGG: the loss from this process's vocabulary rows of the head
            return agg.loss(h, self.head.weight, targets, vocab_parallel=True)  # AGG
        logits = self.head(h)  # sharded over the vocabulary: cross-entropy under loss_parallel()
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())  # a replicated DTensor
        return loss.full_tensor().clone()  # a plain tensor as AGG's; a copy, as FSDP2 warns of a returned view


def parallelize(model, mesh):
    for block in model.blocks:
        parallelize_module(block, mesh["tp"], {
            "attn.q": ColwiseParallel(), "attn.k": ColwiseParallel(), "attn.v": ColwiseParallel(),
            "attn.out": RowwiseParallel(), "mlp.0": ColwiseParallel(), "mlp.2": RowwiseParallel()})
        fully_shard(block, mesh=mesh["dp"])
    # Logits stay sharded (a DTensor) for loss_parallel(); AGG's loss reads only the weight.
    parallelize_module(model.head, mesh["tp"], ColwiseParallel(use_local_output=False))
    # The head belongs to the root unit: AGG's loss runs inside the forward that gathers it.
    fully_shard(model, mesh=mesh["dp"])


QUICK = {"steps": 6, "lines": 200}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--batch", type=int, default=8, help="sequences per step, all data-parallel shards together")
    p.add_argument("--block", type=int, default=128, help="tokens per sequence")
    p.add_argument("--d", type=int, default=128, help="model width")
    p.add_argument("--layers", type=int, default=4, help="transformer blocks")
    p.add_argument("--heads", type=int, default=4, help="attention heads (divisible by --tp)")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size; the data-parallel size is the rest")
    p.add_argument("--alpha", type=float, default=0.03, help="AGG's alpha: rare below this many occurrences per step")
    p.add_argument("--lines", type=int, default=None, help="only the first N lines of each split (default: all)")
    p.add_argument("--mle", action="store_true", help="plain cross-entropy instead of AGG")
    p.add_argument("--quick", action="store_true",
                   help=f"a smoke run: --steps {QUICK['steps']} --lines {QUICK['lines']} unless given")
    args = p.parse_args(argv)
    if args.quick:
        args.steps = args.steps if _given("--steps", argv) else QUICK["steps"]
        args.lines = args.lines if args.lines is not None else QUICK["lines"]
    return args


def refusal(args, world, tokens):
    """What makes this run impossible, in one line (None: nothing); ``tokens``: the shorter split's."""
    if "RANK" not in os.environ:
        return "start it with torchrun: torchrun --nproc-per-node 4 examples/parallel_agg.py"
    if args.tp < 1 or world % args.tp:
        return f"--tp {args.tp} does not divide the {world} processes into a data-parallel x tensor-parallel mesh"
    if args.heads < 1 or args.heads % args.tp or args.d % args.heads:
        return f"--heads {args.heads} must divide --d {args.d} and be divisible by --tp {args.tp}"
    if args.batch < 1 or args.batch % (world // args.tp):
        return f"--batch {args.batch} must be a positive multiple of the data-parallel size {world // args.tp}"
    if min(args.steps, args.block, args.d, args.layers) < 1:
        return "--steps, --block, --d and --layers must be positive"
    if tokens < args.block * (world // args.tp) + 1:
        return (f"--lines {args.lines} leaves {tokens} tokens in a split, fewer than one --block {args.block} "
                f"(and the next token) per data-parallel shard")
    try:
        check_options(alpha=args.alpha)
    except AggConfigError as error:
        return f"--alpha: {error}"
    return None


def main(argv=None):
    args = parse_args(argv)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    train, vocab = load("train", lines=args.lines)
    valid, _ = load("valid", vocab, lines=args.lines)
    problem = refusal(args, world, min(len(train), len(valid)))
    if problem:
        if rank == 0:  # one line for the run, not one per process
            print(f"parallel_agg.py: {problem}", file=sys.stderr)
        sys.exit(2)
    say = print if rank == 0 else (lambda *a, **k: None)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (world // args.tp, args.tp), mesh_dim_names=("dp", "tp"))
    dp, dp_rank, dp_group = mesh["dp"].size(), mesh["dp"].get_local_rank(), mesh["dp"].get_group()
    torch.manual_seed(1)  # the same initial weights on every process, before they are sharded
    model = GPT(len(vocab), args.d, args.layers, args.heads, args.block)
    parallelize(model, mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=0.01)
    steps_per_epoch = max(1, len(train) // (args.batch * args.block))
    agg = AdaptiveGradientGating(len(vocab), alpha=args.alpha, window=steps_per_epoch, nspecial=2)  # AGG
    say(f"mesh dp {dp} x tp {args.tp}, vocabulary {len(vocab)}, {len(train)} training tokens", flush=True)
    batches = torch.Generator().manual_seed(1)  # the same global batches on every process
    start = time.time()
    for step in range(1, args.steps + 1):
        ix = torch.randint(len(train) - args.block - 1, (args.batch,), generator=batches)
        ix = ix.chunk(dp)[dp_rank]  # this data-parallel shard's sequences, the same on its tp processes
        x = torch.stack([train[i : i + args.block] for i in ix])
        y = torch.stack([train[i + 1 : i + args.block + 1] for i in ix])
        with loss_parallel():  # forward and backward: --mle's cross-entropy on sharded logits
            # The mean over this shard's targets: FSDP2 averages the gradients of the equal shards.
            loss = model(x, y, None if args.mle else agg)  # AGG: the forward gets agg
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if not args.mle:
            agg.step()  # AGG: one completed update, its counts summed over the processes
        if step % max(1, args.steps // 6) == 0:
            total = loss.detach().clone()
            dist.all_reduce(total, group=dp_group)  # the global batch's loss: the mean of the shards' means
            rare = "-" if args.mle else agg.num_rare  # AGG: the same on every process
            say(f"step {step:4d}  loss {total.item() / dp:.3f}  rare {rare}", flush=True)
    model.eval()
    with torch.no_grad(), loss_parallel():  # perplexity over whole blocks of the valid split, shared over dp
        n = (len(valid) - 1) // (args.block * dp) * args.block * dp
        x = valid[:n].view(-1, args.block).chunk(dp)[dp_rank]
        y = valid[1 : n + 1].view(-1, args.block).chunk(dp)[dp_rank]
        nll = sum(model(xb, yb) * yb.numel() for xb, yb in zip(x.split(16), y.split(16)))
        dist.all_reduce(nll, group=dp_group)
    head = model.head.weight.full_tensor()  # a collective: every process takes part, rank 0 uses it
    result = {"valid_ppl": math.exp(nll.item() / n), "I(W)": float(isotropy(head)) if rank == 0 else None,
              "rare": None if args.mle else agg.num_rare, "seconds": round(time.time() - start, 1)}
    if rank == 0:
        print(f"{'MLE' if args.mle else 'AGG'}: valid perplexity {result['valid_ppl']:.1f}, I(W) {result['I(W)']:.3f}, "
              f"rare group {result['rare']}, {result['seconds']} s")
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
