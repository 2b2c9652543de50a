"""GPT-2 byte-level BPE over text files, with a pool of worker processes.

The encoder of fairseq's RoBERTa and GPT-2 language-model recipes
(``examples/roberta/multiprocessing_bpe_encoder.py``, which fairseq's pip package does not ship),
with the same options and output, built on fairseq's own ``gpt2_bpe_utils``::

    python -m fairseq_agg.prepare.gpt2_bpe --encoder-json encoder.json --vocab-bpe vocab.bpe \\
        --inputs wiki.train.tokens --outputs wiki.train.bpe --keep-empty --workers 16

Each output line holds the GPT-2 ids of the stripped input line, separated by spaces. Several
``--inputs`` are read in parallel (line i of each together, as for a parallel corpus); without
``--keep-empty``, a line that is empty in any input is dropped from all outputs. With
``--independent-inputs`` each input is encoded into its output on its own instead (files of
different lengths, such as the train, valid and test splits, in one process).
"""

import argparse
import contextlib
import sys
from multiprocessing import Pool
from typing import List, Optional, Sequence, Tuple

from fairseq.data.encoders.gpt2_bpe_utils import get_encoder

if __package__:
    from fairseq_agg.prepare.textfiles import batches, count_lines, default_workers, ordered_map, progress
else:  # run as a file, as the prepare scripts do: importing fairseq_agg would import fairseq (seconds)
    from textfiles import batches, count_lines, default_workers, ordered_map, progress

_encoder = None
_keep_empty = True


def _start_worker(encoder_json: str, vocab_bpe: str, keep_empty: bool) -> None:
    global _encoder, _keep_empty
    _encoder = get_encoder(encoder_json, vocab_bpe)
    _keep_empty = keep_empty


def _encode_rows(rows: List[Tuple[str, ...]]) -> List[Optional[Tuple[str, ...]]]:
    encoded = []
    for row in rows:
        stripped = [line.strip() for line in row]
        if not _keep_empty and not all(stripped):
            encoded.append(None)
        else:
            encoded.append(tuple(" ".join(map(str, _encoder.encode(line))) for line in stripped))
    return encoded


def encode_files(
    encoder_json: str,
    vocab_bpe: str,
    inputs: Sequence[str],
    outputs: Sequence[str],
    keep_empty: bool = False,
    workers: int = 1,
) -> Tuple[int, int]:
    """Encode ``inputs`` line by line into ``outputs``; returns (lines written, lines dropped)."""
    if len(inputs) != len(outputs):
        raise ValueError(f"{len(inputs)} inputs but {len(outputs)} outputs")
    written = dropped = 0
    initargs = (encoder_json, vocab_bpe, keep_empty)
    with contextlib.ExitStack() as stack:
        sources = [stack.enter_context(open(p, encoding="utf-8")) for p in inputs]
        sinks = [stack.enter_context(open(p, "w", encoding="utf-8")) for p in outputs]
        pool = None
        if workers > 1:
            pool = stack.enter_context(Pool(workers, initializer=_start_worker, initargs=initargs))
        else:
            _start_worker(*initargs)
        results = ordered_map(pool, _encode_rows, batches(zip(*sources)), ahead=4 * workers)
        bar = stack.enter_context(progress(count_lines(inputs[0]), f"GPT-2 BPE {inputs[0]}"))
        for encoded_rows in results:
            for encoded in encoded_rows:
                if encoded is None:
                    dropped += 1
                    continue
                for sink, line in zip(sinks, encoded):
                    sink.write(line + "\n")
                written += 1
            bar.update(len(encoded_rows))
    return written, dropped


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder-json", required=True, help="GPT-2 encoder.json")
    parser.add_argument("--vocab-bpe", required=True, help="GPT-2 vocab.bpe (the merges)")
    parser.add_argument("--inputs", nargs="+", required=True, help="text files")
    parser.add_argument("--outputs", nargs="+", required=True, help="one output per input")
    parser.add_argument("--keep-empty", action="store_true", help="keep empty lines (as empty lines)")
    parser.add_argument("--independent-inputs", action="store_true",
                        help="encode each input on its own instead of reading them in parallel")
    parser.add_argument("--workers", type=int, default=default_workers())
    args = parser.parse_args(argv)
    if len(args.inputs) != len(args.outputs):
        parser.error("give as many --outputs as --inputs")
    pairs = list(zip(args.inputs, args.outputs))
    jobs = [([i], [o]) for i, o in pairs] if args.independent_inputs else [(args.inputs, args.outputs)]
    for inputs, outputs in jobs:
        written, dropped = encode_files(
            args.encoder_json, args.vocab_bpe, inputs, outputs, args.keep_empty, args.workers
        )
        print(f"GPT-2 BPE {' '.join(inputs)}: {written} lines written, {dropped} empty lines dropped",
              file=sys.stderr)


if __name__ == "__main__":
    main()
