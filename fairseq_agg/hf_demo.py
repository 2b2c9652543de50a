"""MLE vs AGG in miniature with Hugging Face ``transformers``: two tiny ``GPT2LMHeadModel``\\ s
built from a config (no download) on the shipped WikiText-2 slice, on CPU.

    python -m fairseq_agg.hf_demo                       # word-level, as the fairseq demo
    python -m fairseq_agg.hf_demo --tokenizer gpt2-bpe  # GPT-2 BPE (data/gpt2_bpe) via GPT2TokenizerFast
    python -m fairseq_agg.hf_demo --quick               # 150 steps per model

The same model and data are trained twice with the same seed: with the stock ``Trainer`` (MLE)
and with :class:`fairseq_agg.hf.AggTrainer` (AGG), then both are evaluated and the fairseq demo's
table is printed (perplexity; I(W) and IsoScore of the output embedding, overall and per frequency
group of the train split; the AGG rare group; time) and written to ``<workdir>/results.json``.
Every progress line starts with its run's name; with ``--jobs 2`` (the default) the two models
train side by side in their own processes, each also logging to ``<workdir>/<run>.log``. The
workdir must be new, empty or an earlier HF demo's (its ``.fairseq-agg-owner`` stamp says so);
any other is refused in one line before any work starts.

The settings mirror ``fairseq-agg-demo``: 2 layers, d=64, FFN 256, 4 heads, tied embeddings,
dropout 0.1, AdamW (0.9, 0.98), lr 1e-3 with 150 warm-up steps and an inverse square root
decay, weight decay 0.01, 8 blocks of 128 tokens (1024 tokens) per optimizer step, 600 steps,
seed 1, alpha 0.03, AGG window one epoch. Word-level: the words seen at least 5 times in the
train slice, ``<unk>`` for the others and ``</s>`` closing every line (fairseq's dictionary
without its unused ``<s>`` and ``<pad>``). GPT-2 BPE: the BPE ids that occur in the train slice,
renumbered densely (a 16k-row softmax rather than 50k rows, of which two thirds would never be a
target), with one id for BPE tokens that occur only in valid or test.
"""

import argparse
import json
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from fairseq_agg import demo, metrics
from fairseq_agg.errors import AggConfigError
from fairseq_agg.workdir import Owner

PACKAGE_DIR = Path(__file__).resolve().parent
GPT2_BPE = PACKAGE_DIR.parent / "data" / "gpt2_bpe"
SPLITS = ("train", "valid", "test")
DEFAULT_STEPS, QUICK_STEPS = 600, 150
UNK, EOS = "<unk>", "</s>"
OWNER = Owner("fairseq_agg.hf_demo", "--workdir")  # the HF demo writes only into a workdir it made
TOOL = "fairseq_agg.hf_demo"  # names the demo in its messages


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fairseq_agg.hf_demo",
        description="Train a tiny GPT-2 with the stock Trainer (MLE) and with AggTrainer (AGG) on CPU and "
        "compare perplexity and output-embedding isotropy I(W).",
    )
    p.add_argument("--data", type=Path, default=None, help="folder with wiki.{train,valid,test}.tokens (default: data/wikitext-2)")
    p.add_argument("--workdir", type=Path, default=Path("runs/hf_demo"),
                   help="a new or empty folder, or an earlier HF demo's (default: %(default)s)")
    p.add_argument("--tokenizer", choices=("word", "gpt2-bpe"), default="word",
                   help="word-level dictionary (as the fairseq demo) or the shipped GPT-2 BPE (default: %(default)s)")
    p.add_argument("--threshold", type=int, default=5, help="word-level: keep words seen this often in train (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=0.03, help="AGG rare threshold (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1, help="(default: %(default)s)")
    p.add_argument("--max-steps", "--max-update", dest="max_steps", type=int, default=None, help=f"optimizer steps per model (default: {DEFAULT_STEPS}, "
                   f"{QUICK_STEPS} with --quick)")
    p.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} steps per model")
    p.add_argument("--embed-dim", type=int, default=64, help="(default: %(default)s)")
    p.add_argument("--layers", type=int, default=2, help="(default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: %(default)s)")
    p.add_argument("--warmup-steps", "--warmup-updates", dest="warmup_steps", type=int, default=None, help="(default: 150, at most a quarter of the steps)")
    p.add_argument("--batch-size", type=int, default=8, help="blocks per optimizer step (default: %(default)s)")
    p.add_argument("--block-size", "--tokens-per-sample", dest="block_size", type=int, default=128,
                   help="tokens per block (default: %(default)s)")
    p.add_argument("--eval-lines", type=int, default=None, help="use only the first N lines of valid and test (tests)")
    p.add_argument("--train-lines", type=int, default=None, help="use only the first N lines of train (tests)")
    p.add_argument("--runs", nargs="+", choices=("mle", "agg"), default=["mle", "agg"], help="(default: mle agg)")
    p.add_argument("--jobs", type=int, default=2,
                   help="train this many models at once in their own processes, splitting the CPU threads between "
                   "them (default: %(default)s; 1 trains them one after the other in this process)")
    p.add_argument("--framework", choices=("hf",), default="hf", help=argparse.SUPPRESS)  # python -m fairseq_agg.demo --framework hf
    p.add_argument("--result-file", type=Path, default=None, help=argparse.SUPPRESS)  # a --jobs child's output
    return p


# -- data ---------------------------------------------------------------------------------------
def read_lines(path: Path, limit: Optional[int]) -> List[str]:
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    return lines if limit is None else lines[:limit]


def word_streams(texts: Dict[str, List[str]], threshold: int):
    """Each split as one id stream (``</s>`` after every line), fairseq-preprocess style."""
    counts = Counter(word for line in texts["train"] for word in line.split())
    words = [w for w, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if c >= threshold and w not in (UNK, EOS)]
    vocab = {UNK: 0, EOS: 1, **{w: i + 2 for i, w in enumerate(words)}}
    streams = {}
    for split, lines in texts.items():
        ids = []
        for line in lines:
            ids.extend(vocab.get(word, 0) for word in line.split())
            ids.append(1)
        streams[split] = torch.tensor(ids, dtype=torch.long)
    return streams, len(vocab), 2  # (streams, vocabulary size, never-rare specials: <unk>, </s>)


def gpt2_tokenizer(bpe_dir: Path = GPT2_BPE):
    """``GPT2TokenizerFast`` from the shipped ``encoder.json`` and ``vocab.bpe`` (no download)."""
    import fairseq_agg.hf  # noqa: F401  (environment fixes before transformers' tokenizers)
    from transformers import GPT2TokenizerFast

    vocab = json.loads((bpe_dir / "encoder.json").read_text(encoding="utf-8"))
    merges = [tuple(line.split()) for line in (bpe_dir / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:] if line.strip()]
    return GPT2TokenizerFast(vocab=vocab, merges=merges)


def bpe_streams(texts: Dict[str, List[str]]):
    """GPT-2 BPE ids renumbered densely over the ids of the train split (id 0: all others)."""
    tokenizer = gpt2_tokenizer()
    raw = {split: tokenizer("\n".join(lines) + "\n")["input_ids"] for split, lines in texts.items()}
    seen = sorted(set(raw["train"]))
    dense = {bpe: i + 1 for i, bpe in enumerate(seen)}
    streams = {split: torch.tensor([dense.get(t, 0) for t in ids], dtype=torch.long) for split, ids in raw.items()}
    return streams, len(seen) + 1, 1


class Blocks(torch.utils.data.Dataset):
    """Blocks of ``size + 1`` tokens overlapping by one, so every token after the first is a
    target exactly once (fairseq's ``--sample-break-mode none``)."""

    def __init__(self, stream: torch.Tensor, size: int, keep_last: bool = False):
        self.blocks = [stream[i : i + size + 1] for i in range(0, stream.numel() - 1, size)]
        if not keep_last and self.blocks and self.blocks[-1].numel() < size + 1:
            self.blocks.pop()

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


# -- training and evaluation -----------------------------------------------------------------
def tiny_gpt2(vocab_size: int, args):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(args.seed)
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=args.block_size + 1, n_embd=args.embed_dim, n_layer=args.layers, n_head=4,
        n_inner=4 * args.embed_dim, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
        bos_token_id=1, eos_token_id=1, tie_word_embeddings=True, use_cache=False,
    )
    model = GPT2LMHeadModel(config)
    # transformers picks a model's loss by its class name, and "GPT2LMHeadModel" matches none, so
    # it warns at the first loss and falls back to ForCausalLM, GPT-2's shifted cross-entropy:
    # named here, the same loss without the warning
    model.loss_type = "ForCausalLM"
    return model


def perplexity(model, stream: torch.Tensor, block_size: int) -> float:
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for block in Blocks(stream, block_size, keep_last=True).blocks:
            if block.numel() < 2:
                continue
            logits = model(input_ids=block.unsqueeze(0)).logits[0, :-1]
            total += float(F.cross_entropy(logits.float(), block[1:], reduction="sum"))
            count += block.numel() - 1
    return math.exp(total / count)


def frequency_groups(train: torch.Tensor, vocab_size: int, nspecial: int) -> Dict[str, torch.Tensor]:
    """The fairseq demo's frequency groups (:func:`fairseq_agg.demo.frequency_groups`) with the
    counts of the train stream: top 30% frequent, next 50% medium, last 20% rare."""
    counts = torch.bincount(train, minlength=vocab_size)
    return {name: torch.from_numpy(ids) for name, ids in metrics.frequency_groups(counts, nspecial).items()}


def progress_printer(tag: str):
    """A Trainer callback that prints each log entry on one line starting with ``tag`` (the run's
    name; empty in a ``--jobs`` child, whose lines the parent prefixes). Replaces transformers'
    PrinterCallback, whose bare dicts do not say which run they belong to."""
    from transformers import TrainerCallback

    class ProgressPrinter(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_local_process_zero and logs:
                values = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                   for k, v in logs.items() if k != "total_flos")
                print(f"{tag}step {state.global_step}/{state.max_steps}: {values}", flush=True)

    return ProgressPrinter()


def train_one(name: str, streams, vocab_size: int, nspecial: int, args, workdir: Path) -> Dict:
    import fairseq_agg.hf as agg_hf
    from transformers import PrinterCallback, Trainer, TrainingArguments

    tag = "" if args.result_file is not None else f"[{name}] "
    model = tiny_gpt2(vocab_size, args)
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, min(150, args.max_steps // 4))
    training_args = TrainingArguments(
        output_dir=str(workdir / name), per_device_train_batch_size=args.batch_size, max_steps=args.max_steps,
        learning_rate=args.lr, lr_scheduler_type="inverse_sqrt", warmup_steps=warmup, weight_decay=0.01,
        adam_beta1=0.9, adam_beta2=0.98, max_grad_norm=0.0, seed=args.seed, data_seed=args.seed, use_cpu=True,
        save_strategy="no", report_to="none", logging_steps=max(10, args.max_steps // 12), disable_tqdm=True,
        dataloader_num_workers=0,
    )
    train = Blocks(streams["train"], args.block_size)
    if name == "agg":
        trainer = agg_hf.AggTrainer(model=model, args=training_args, train_dataset=train,
                                    agg_alpha=args.alpha, agg_nspecial=nspecial)
    else:
        trainer = Trainer(model=model, args=training_args, train_dataset=train)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(progress_printer(tag))
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    weight = model.get_output_embeddings().weight.detach()
    result = {
        "valid_ppl": perplexity(model, streams["valid"], args.block_size),
        "test_ppl": perplexity(model, streams["test"], args.block_size),
        **demo.embedding_isotropy(weight, frequency_groups(streams["train"], vocab_size, nspecial)),
        "rare_group_size": trainer.agg.num_rare if name == "agg" else None,
        "agg_window": trainer.agg.window if name == "agg" else None,
        "vocab_size": int(weight.size(0)),
        "num_updates": int(trainer.state.global_step),
        "train_seconds": round(seconds, 1),
    }
    rare = "" if result["rare_group_size"] is None else f", AGG rare group {result['rare_group_size']}"
    print(f"{tag}done: valid ppl {result['valid_ppl']:.2f}, test ppl {result['test_ppl']:.2f}, "
          f"I(W) {result['I(W)']:.3f}, IsoScore {result['IsoScore']:.3f}{rare}, {result['train_seconds']:.0f} s",
          flush=True)
    return result


def train_in_processes(names: List[str], args, argv: Optional[List[str]]) -> Dict[str, Dict]:
    """Each model in its own process, ``--jobs`` at a time, the CPU threads split between them
    (on a small machine one intra-op thread per model is much faster than two models sharing);
    their output goes to ``<workdir>/<run>.log`` and, each line prefixed with the run's name, here."""
    argv = list(sys.argv[1:] if argv is None else argv)
    result_files = {name: args.workdir / f"{name}.result.json" for name in names}

    def start(name, threads):
        result_files[name].unlink(missing_ok=True)  # an earlier run's result must not pass for this one's
        cmd = [sys.executable, "-m", "fairseq_agg.hf_demo", *argv, "--runs", name, "--workdir", str(args.workdir),
               "--max-steps", str(args.max_steps), "--result-file", str(result_files[name])]
        return name, demo.LoggedProcess(cmd, args.workdir / f"{name}.log", lambda _line: True, name, threads, TOOL)

    demo.run_in_batches(names, args.jobs, start)
    missing = [name for name in names if not result_files[name].is_file()]
    if missing:
        raise SystemExit(f"{TOOL}: the {missing[0]} run wrote no {result_files[missing[0]]}; log: "
                         f"{args.workdir / (missing[0] + '.log')}")
    return {name: json.loads(result_files[name].read_text()) for name in names}


def run_hf_demo(argv: Optional[List[str]] = None) -> Dict:
    """The whole demo; returns what results.json holds."""
    args = build_parser().parse_args(argv)
    if args.max_steps is None:
        args.max_steps = QUICK_STEPS if args.quick else DEFAULT_STEPS
    if not 0.0 < args.alpha <= 1.0:
        raise SystemExit(f"{TOOL}: --alpha must lie in (0, 1]")
    if args.max_steps < 1:
        raise SystemExit(f"{TOOL}: --max-steps must be positive")
    data = demo.resolve_data(args.data, TOOL)
    args.workdir = args.workdir.resolve()
    OWNER.claim(args.workdir)  # before any work; a --jobs child finds it claimed by its parent
    if args.result_file is not None:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    start = time.time()
    if args.result_file is None:
        print(f"fairseq-agg HF demo: data {data}, {args.tokenizer} tokens, {args.max_steps} steps per model, "
              f"alpha {args.alpha}, seed {args.seed}, workdir {args.workdir}", flush=True)
    texts = {s: read_lines(data / f"wiki.{s}.tokens", args.train_lines if s == "train" else args.eval_lines) for s in SPLITS}
    if args.tokenizer == "word":
        streams, vocab_size, nspecial = word_streams(texts, args.threshold)
    else:
        streams, vocab_size, nspecial = bpe_streams(texts)
    names = list(dict.fromkeys(args.runs))
    if args.result_file is not None:  # a child of --jobs: one model, its result to a file
        result = train_one(names[0], streams, vocab_size, nspecial, args, args.workdir)
        args.result_file.write_text(json.dumps(result))
        return result
    if args.jobs > 1 and len(names) > 1:
        runs = train_in_processes(names, args, argv)
    else:
        runs = {name: train_one(name, streams, vocab_size, nspecial, args, args.workdir) for name in names}
    table = demo.format_table(runs)
    results = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "runs": runs,
        "total_seconds": round(time.time() - start, 1),
    }
    (args.workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(table)
    if "mle" in runs and "agg" in runs:
        print(f"\nI(W) of the output embedding: MLE {runs['mle']['I(W)']:.3f}, AGG {runs['agg']['I(W)']:.3f} "
              f"(paper, Table 3, WikiText-103 at full scale: MLE 0.377, AGG 0.813)")
    print(f"\nresults: {args.workdir / 'results.json'} (total {results['total_seconds']:.0f} s)")
    return results


def main(argv: Optional[List[str]] = None) -> int:
    try:
        run_hf_demo(argv)
    except AggConfigError as refusal:
        parser = build_parser()
        parser.exit(2, f"{parser.prog}: error: {refusal}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
