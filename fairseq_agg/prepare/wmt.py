"""The text steps of fairseq's WMT14 En-De recipe (``examples/translation/prepare-wmt14en2de.sh``),
with sacremoses and Python in place of the Moses perl scripts.

``tokenize`` runs the recipe's two pipelines, each a list of jobs handled by one pool of
worker processes::

    python -m fairseq_agg.prepare.wmt tokenize --workers 16 \\
        --text en train.tok.en europarl-v7.de-en.en commoncrawl.de-en.en ... \\
        --sgm de test.tok.de newstest2014-deen-ref.de.sgm

* ``--text LANG OUTPUT INPUT...`` (training data): the inputs, concatenated, go through
  ``normalize-punctuation.perl LANG`` (sacremoses, perl parity), ``remove-non-printing-char.perl``
  (every Unicode "other" character becomes a space) and ``tokenizer.perl -a -l LANG`` (aggressive
  hyphen splitting, ``&apos;``-style escaping).
* ``--sgm LANG OUTPUT INPUT.sgm`` (the test set): the text of each ``<seg>``, with ``’`` replaced
  by ``'``, through ``tokenizer.perl -a -l LANG`` only; the recipe does not normalise the test set.

``clean`` is Moses' ``clean-corpus-n.perl -ratio R CORPUS L1 L2 OUT MIN MAX``: whitespace is
collapsed and ``|`` removed, and a pair is dropped when either side is empty, has fewer than MIN
or more than MAX words, or is more than R times as long as the other side::

    python -m fairseq_agg.prepare.wmt clean --ratio 1.5 --min 1 --max 250 --langs en de \\
        --corpus bpe.train train --corpus bpe.valid valid
"""

import argparse
import contextlib
import itertools
import re
import sys
from multiprocessing import Pool
from typing import Iterable, List, Optional, Sequence, Tuple

if __package__:
    from fairseq_agg.prepare.textfiles import batches, count_lines, default_workers, ordered_map, progress
else:  # run as a file, as the prepare scripts do: importing fairseq_agg would import fairseq (seconds)
    from textfiles import batches, count_lines, default_workers, ordered_map, progress

TEXT, SGM = "text", "sgm"

_pipelines = {}


def _pipeline(lang: str, mode: str):
    """The per-line function of a pipeline, built once per worker process."""
    key = (lang, mode)
    if key not in _pipelines:
        import regex
        from sacremoses import MosesPunctNormalizer, MosesTokenizer

        tokenizer = MosesTokenizer(lang=lang)

        def tokenize(line: str) -> str:
            return tokenizer.tokenize(line, aggressive_dash_splits=True, return_str=True, escape=True)

        if mode == TEXT:
            normalizer = MosesPunctNormalizer(lang=lang, perl_parity=True)
            non_printing = regex.compile(r"\p{C}")

            def run(line: str) -> str:
                return tokenize(non_printing.sub(" ", normalizer.normalize(line)))
        else:
            def run(line: str) -> str:
                return tokenize(line.replace("\u2019", "'"))

        _pipelines[key] = run
    return _pipelines[key]


def _process(task: Tuple[str, str, List[str]]) -> List[str]:
    lang, mode, lines = task
    run = _pipeline(lang, mode)
    return [run(line.rstrip("\n")) + "\n" for line in lines]


_SEG_OPEN = re.compile(r'<seg id="?[0-9]*"?>\s*')
_SEG_CLOSE = re.compile(r"\s*</seg>\s*")


def sgm_segments(path: str) -> Iterable[str]:
    """The text of each ``<seg id=...>`` line of a WMT .sgm file (as the recipe's grep and sed)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if "<seg id" in line:
                yield _SEG_CLOSE.sub("", _SEG_OPEN.sub("", line.rstrip("\n")))


def write_reference(sgm: str, output: str) -> int:
    """The untokenized segments of ``sgm``, one per line, stripped and with runs of whitespace
    collapsed (as sacrebleu reads WMT test sets): the reference of detokenized sacreBLEU."""
    count = 0
    with open(output, "w", encoding="utf-8") as out:
        for segment in sgm_segments(sgm):
            out.write(" ".join(segment.split()) + "\n")
            count += 1
    return count


def _lines(mode: str, inputs: Sequence[str]) -> Iterable[str]:
    for path in inputs:
        if mode == SGM:
            yield from sgm_segments(path)
        else:
            with open(path, encoding="utf-8", newline="\n") as f:
                yield from f


def tokenize(jobs: Sequence[Tuple[str, str, str, Sequence[str]]], workers: int = 1) -> None:
    """Run each job ``(lang, mode, output, inputs)``; mode is ``"text"`` or ``"sgm"``."""
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(Pool(workers)) if workers > 1 else None
        for lang, mode, output, inputs in jobs:
            total = sum(count_lines(p) for p in inputs) if mode == TEXT else None
            tasks = ((lang, mode, batch) for batch in batches(_lines(mode, inputs)))
            results = ordered_map(pool, _process, tasks, ahead=4 * workers)
            with open(output, "w", encoding="utf-8") as fout, progress(total, f"tokenize {output}") as bar:
                for lines in results:
                    fout.writelines(lines)
                    bar.update(len(lines))


def _clean_side(line: str) -> str:
    return " ".join(line.replace("|", "").split())


def clean(
    corpus: str, langs: Tuple[str, str], output: str, ratio: float = 1.5, min_words: int = 1, max_words: int = 250
) -> Tuple[int, int]:
    """``clean-corpus-n.perl -ratio RATIO CORPUS L1 L2 OUTPUT MIN MAX``; returns (pairs read, pairs kept)."""
    l1, l2 = langs
    read = kept = 0
    with contextlib.ExitStack() as stack:
        in1 = stack.enter_context(open(f"{corpus}.{l1}", encoding="utf-8", newline="\n"))
        in2 = stack.enter_context(open(f"{corpus}.{l2}", encoding="utf-8", newline="\n"))
        out1 = stack.enter_context(open(f"{output}.{l1}", "w", encoding="utf-8"))
        out2 = stack.enter_context(open(f"{output}.{l2}", "w", encoding="utf-8"))
        bar = stack.enter_context(progress(count_lines(f"{corpus}.{l1}"), f"clean {corpus}"))
        for a, b in itertools.zip_longest(in1, in2):
            if a is None or b is None:
                raise SystemExit(f"clean: {corpus}.{l1 if a is None else l2} has fewer lines than the other side")
            read += 1
            bar.update(1)
            a, b = _clean_side(a), _clean_side(b)
            if not a or not b:
                continue
            na, nb = a.count(" ") + 1, b.count(" ") + 1
            if not (min_words <= na <= max_words and min_words <= nb <= max_words):
                continue
            if na / nb > ratio or nb / na > ratio:
                continue
            out1.write(a + "\n")
            out2.write(b + "\n")
            kept += 1
    return read, kept


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    tok = commands.add_parser("tokenize", help="normalise and tokenise text, or extract and tokenise .sgm")
    tok.add_argument("--text", nargs="+", action="append", default=[], metavar="LANG OUTPUT INPUT",
                     help="training-data pipeline on the concatenated INPUTs (repeatable)")
    tok.add_argument("--sgm", nargs="+", action="append", default=[], metavar="LANG OUTPUT INPUT.sgm",
                     help="test-set pipeline on the segments of INPUT.sgm (repeatable)")
    tok.add_argument("--workers", type=int, default=default_workers())

    ref = commands.add_parser("reference", help="the raw segments of a .sgm file, for detokenized sacreBLEU")
    ref.add_argument("sgm")
    ref.add_argument("output")

    cln = commands.add_parser("clean", help="clean-corpus-n.perl")
    cln.add_argument("--langs", nargs=2, required=True, metavar=("L1", "L2"))
    cln.add_argument("--corpus", nargs=2, action="append", required=True, metavar=("CORPUS", "OUTPUT"),
                     help="reads CORPUS.L1/.L2, writes OUTPUT.L1/.L2 (repeatable)")
    cln.add_argument("--ratio", type=float, default=1.5)
    cln.add_argument("--min", type=int, default=1)
    cln.add_argument("--max", type=int, default=250)

    args = parser.parse_args(argv)
    if args.command == "reference":
        write_reference(args.sgm, args.output)
        return
    if args.command == "tokenize":
        jobs = []
        for mode, specs in ((TEXT, args.text), (SGM, args.sgm)):
            for spec in specs:
                if len(spec) < 3:
                    parser.error(f"--{mode} needs LANG OUTPUT INPUT..., got {' '.join(spec)}")
                jobs.append((spec[0], mode, spec[1], spec[2:]))
        if not jobs:
            parser.error("nothing to do: give --text or --sgm jobs")
        tokenize(jobs, args.workers)
    else:
        for corpus, output in args.corpus:
            read, kept = clean(corpus, tuple(args.langs), output, args.ratio, args.min, args.max)
            print(f"clean {corpus}: kept {kept} of {read} pairs", file=sys.stderr)


if __name__ == "__main__":
    main()
