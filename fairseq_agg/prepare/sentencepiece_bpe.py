"""Train a sentencepiece model on a text file and encode text files into pieces.

::

    python -m fairseq_agg.prepare.sentencepiece_bpe --train-input wiki.train.tokens \\
        --model-prefix spm --vocab-size 32000 \\
        --inputs wiki.train.tokens wiki.valid.tokens --outputs train.bpe valid.bpe

Without ``--train-input`` an existing ``--model-prefix``.model is used. Each output line holds
the pieces of the stripped input line, separated by spaces; empty lines stay empty, so the
lines of the output match those of the input (fairseq-preprocess then ends each with an eos).
Characters outside the model's character set fall back to byte pieces (``<0xNN>``), so
encoding loses nothing.
"""

import argparse
import contextlib
import os
import sys
import time
from typing import Optional, Sequence

if __package__:
    from fairseq_agg.prepare.textfiles import batches, count_lines, default_workers, progress
else:  # run as a file, as the prepare scripts do: importing fairseq_agg would import fairseq (seconds)
    from textfiles import batches, count_lines, default_workers, progress


def train(
    train_input: str,
    model_prefix: str,
    vocab_size: int,
    model_type: str = "bpe",
    sample_lines: int = 300_000,
    threads: int = 1,
) -> str:
    """Train the model; returns the path of the ``.model`` file."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        input=train_input,
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=0.9999,
        byte_fallback=True,
        # fairseq's dictionary brings its own bos/pad/eos; sentencepiece keeps only <unk>.
        bos_id=-1,
        eos_id=-1,
        pad_id=-1,
        # WikiText lines are whole paragraphs; sentencepiece skips lines above this length.
        max_sentence_length=1 << 16,
        input_sentence_size=sample_lines,
        shuffle_input_sentence=True,
        num_threads=threads,
        minloglevel=1,
    )
    return model_prefix + ".model"


def encode_files(model: str, inputs: Sequence[str], outputs: Sequence[str], threads: int = 1) -> int:
    """Encode each input into the output of the same position; returns the lines written."""
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=model)
    written = 0
    for source, target in zip(inputs, outputs):
        with contextlib.ExitStack() as stack:
            fin = stack.enter_context(open(source, encoding="utf-8"))
            fout = stack.enter_context(open(target, "w", encoding="utf-8"))
            bar = stack.enter_context(progress(count_lines(source), f"sentencepiece {source}"))
            for lines in batches(fin, 10_000):
                pieces = processor.encode([line.strip() for line in lines], out_type=str, num_threads=threads)
                fout.writelines(" ".join(p) + "\n" for p in pieces)
                written += len(lines)
                bar.update(len(lines))
    return written


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-prefix", required=True, help="writes/reads PREFIX.model and PREFIX.vocab")
    parser.add_argument("--train-input", help="train a new model on this file first")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--model-type", default="bpe", choices=["bpe", "unigram", "char", "word"])
    parser.add_argument("--sample-lines", type=int, default=300_000,
                        help="train on at most this many randomly chosen lines (0: all)")
    parser.add_argument("--inputs", nargs="*", default=[])
    parser.add_argument("--outputs", nargs="*", default=[])
    parser.add_argument("--workers", type=int, default=default_workers())
    args = parser.parse_args(argv)
    if len(args.inputs) != len(args.outputs):
        parser.error("give as many --outputs as --inputs")
    model = args.model_prefix + ".model"
    if args.train_input:
        start = time.time()
        print(f"sentencepiece: training a {args.model_type} model of {args.vocab_size} pieces "
              f"on {args.train_input}", file=sys.stderr)
        train(args.train_input, args.model_prefix, args.vocab_size, args.model_type,
              args.sample_lines, args.workers)
        print(f"sentencepiece: trained {model} in {time.time() - start:.0f} s", file=sys.stderr)
    elif not os.path.exists(model):
        parser.error(f"{model} does not exist (train one with --train-input)")
    encode_files(model, args.inputs, args.outputs, args.workers)


if __name__ == "__main__":
    main()
