"""AGG in a nanoGPT-style loop: a small GPT built here, trained word-level on the shipped
WikiText-2 slice on CPU with the plain API.

    python examples/nanogpt_agg.py            # AGG, 300 steps (1 to 2 minutes on one core)
    python examples/nanogpt_agg.py --mle      # the same run with plain cross-entropy
    python examples/nanogpt_agg.py --quick    # 30 steps on the first 2,000 lines (seconds)

The lines that AGG adds to a loop are marked ``# AGG``.
"""
import argparse, math, time
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from fairseq_agg.isotropy import isotropy
from fairseq_agg.training import AdaptiveGradientGating  # AGG

DATA = Path(__file__).resolve().parents[1] / "data" / "wikitext-2"


def load(split, vocab=None, threshold=5, lines=None):
    text = (DATA / f"wiki.{split}.tokens").read_text(encoding="utf-8").splitlines()[:lines]
    words = [w for line in text for w in line.split() + ["</s>"]]
    if vocab is None:  # <unk>, </s>, then the words seen at least `threshold` times, most frequent first
        counts = Counter(words)
        vocab = {"<unk>": 0, "</s>": 1}
        for w, c in counts.most_common():
            if c >= threshold and w not in vocab:
                vocab[w] = len(vocab)
    return torch.tensor([vocab.get(w, 0) for w in words]), vocab


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, dropout=0.1, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(0.1))

    def forward(self, x):
        mask = torch.triu(torch.ones(x.size(1), x.size(1), dtype=torch.bool), 1)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab, d=64, layers=2, heads=4, block=128):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied input/output embedding
        for emb in (self.tok, self.pos):
            nn.init.normal_(emb.weight, std=0.02)

    def features(self, idx):  # the hidden states the output head projects
        x = self.tok(idx) + self.pos(torch.arange(idx.size(1)))
        return self.ln(self.blocks(x))


QUICK = {"steps": 30, "lines": 2000}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every option's default (flags and unset options say theirs in words)."""

    def _get_help_string(self, action):
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def _given(flag, argv):
    import sys
    return any(a == flag or a.startswith(flag + "=") for a in (sys.argv[1:] if argv is None else argv))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--block", type=int, default=128, help="tokens per sequence")
    p.add_argument("--alpha", type=float, default=0.03, help="AGG's alpha: rare below this many occurrences per step")
    p.add_argument("--lines", type=int, default=None, help="only the first N lines of each split (default: all)")
    p.add_argument("--mle", action="store_true", help="plain cross-entropy instead of AGG")
    p.add_argument("--quick", action="store_true",
                   help=f"a smoke run: --steps {QUICK['steps']} --lines {QUICK['lines']} unless given")
    p.add_argument("--threads", type=int, default=1, help="a model this small is fastest on one thread")
    args = p.parse_args(argv)
    if args.quick:
        args.steps = args.steps if _given("--steps", argv) else QUICK["steps"]
        args.lines = args.lines if args.lines is not None else QUICK["lines"]
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(1)
    train, vocab = load("train", lines=args.lines)
    valid, _ = load("valid", vocab, lines=args.lines)
    model = GPT(len(vocab), block=args.block)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=0.01)
    steps_per_epoch = max(1, len(train) // (args.batch * args.block))
    agg = AdaptiveGradientGating(len(vocab), alpha=args.alpha, window=steps_per_epoch, nspecial=2)  # AGG
    start = time.time()
    for step in range(1, args.steps + 1):
        ix = torch.randint(len(train) - args.block - 1, (args.batch,))
        x = torch.stack([train[i : i + args.block] for i in ix])
        y = torch.stack([train[i + 1 : i + args.block + 1] for i in ix])
        h = model.features(x)
        if args.mle:
            loss = F.cross_entropy(model.head(h).view(-1, len(vocab)), y.view(-1))
        else:
            loss = agg.loss(h, model.head.weight, y)  # AGG: replaces head + cross-entropy
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if not args.mle:
            agg.step()  # AGG: one completed update
        if step % max(1, args.steps // 6) == 0:
            print(f"step {step:4d}  loss {loss.item():.3f}  rare {agg.num_rare if not args.mle else '-'}", flush=True)
    model.eval()
    with torch.no_grad():  # perplexity over whole blocks of the valid split, 16 blocks at a time
        n = (len(valid) - 1) // args.block * args.block
        x, y = valid[:n].view(-1, args.block), valid[1 : n + 1].view(-1, args.block)
        nll = sum(F.cross_entropy(model.head(model.features(xb)).view(-1, len(vocab)), yb.reshape(-1), reduction="sum")
                  for xb, yb in zip(x.split(16), y.split(16))) / y.numel()
    result = {"valid_ppl": math.exp(nll.item()), "I(W)": float(isotropy(model.head.weight)),
              "rare": None if args.mle else agg.num_rare, "seconds": round(time.time() - start, 1)}
    print(f"{'MLE' if args.mle else 'AGG'}: valid perplexity {result['valid_ppl']:.1f}, I(W) {result['I(W)']:.3f}, "
          f"rare group {result['rare']}, {result['seconds']} s")
    return result


if __name__ == "__main__":
    main()
