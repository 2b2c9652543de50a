"""The ``fairseq-agg-eval`` command line: options, the input checks that run before any scoring, and dispatch to the subcommands."""

import argparse
import logging
import sys
import warnings
from pathlib import Path
from typing import Mapping, Optional, Sequence

from fairseq_agg.evaluation.common import (
    BPE_MODULES, EvalError, KIND_WORDS, REQUIRED_MODULES, _check_modules, _check_readable_file,
    _split_exists, check_output_folder, checkpoint_kind, peek_checkpoint, read_text,
)
from fairseq_agg.evaluation.compare import compare
from fairseq_agg.evaluation.lm import evaluate_lm, load_wordsim, resolve_bpe
from fairseq_agg.evaluation.mt import evaluate_mt


def _dictionary_words(path: Path) -> set:
    """The entries of a fairseq dict.txt as fairseq's Dictionary reads them, plus its specials."""
    words = {"<s>", "<pad>", "</s>"}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        word, _, flag = line.rstrip().rpartition(" ")
        if flag == "#fairseq:overwrite":
            word = word.rpartition(" ")[0]
        words.add(word)
    return words


PREPROCESS_FIX = "give the folder fairseq-preprocess wrote (its --destdir) for the checkpoint's data"


def _check_data_folder(data: Path) -> None:
    if data.is_dir():
        return
    if data.exists():
        raise EvalError(f"data {data} is a file, not a folder; give the binarized data-bin folder that "
                        "fairseq-preprocess wrote (its --destdir) for the checkpoint's data")
    raise EvalError(f"data folder {data} does not exist; {PREPROCESS_FIX}")


def _check_data(args, task_cfg: Mapping) -> Optional[Path]:
    """The data folder holds the dictionaries and the split the subcommand reads; returns the
    dictionary that --neighbours' tokens come from (None when the languages are not known)."""
    data = args.data
    if args.command == "lm":
        dicts, splits = [data / "dict.txt"], [data / args.subset]
    else:
        src, tgt = task_cfg.get("source_lang"), task_cfg.get("target_lang")
        if not src or not tgt:
            return None  # fairseq infers the languages from the folder's file names
        dicts = [data / f"dict.{src}.txt", data / f"dict.{tgt}.txt"]
        splits = [] if args.generate_output else [data / f"{args.subset}.{src}-{tgt}.{src}",
                                                   data / f"{args.subset}.{tgt}-{src}.{src}"]
    for path in dicts:
        if not path.is_file():
            raise EvalError(f"data folder {data} has no {path.name}; {PREPROCESS_FIX}")
    if splits and not any(_split_exists(prefix) for prefix in splits):
        raise EvalError(f"data folder {data} has no '{args.subset}' split ({splits[0].name}.bin and .idx); "
                        "choose another --subset or binarize that split with fairseq-preprocess")
    return dicts[0]


def _check_bpe(args) -> None:
    resolve_bpe(args)
    needed = {"gpt2": (("--gpt2-encoder-json", args.gpt2_encoder_json), ("--gpt2-vocab-bpe", args.gpt2_vocab_bpe)),
              "sentencepiece": (("--sentencepiece-model", args.sentencepiece_model),),
              "subword_nmt": (("--bpe-codes", args.bpe_codes),)}.get(args.bpe, ())
    for option, value in needed:
        if value is None:
            raise EvalError(f"--bpe {args.bpe} needs {option} FILE")
        _check_readable_file(Path(value), option, "give the file, or --bpe none for a word-level dictionary")
    if args.bpe in BPE_MODULES:
        _check_modules([BPE_MODULES[args.bpe]], f"--bpe {args.bpe}")


def check_inputs(args) -> None:
    """Every input of ``lm`` and ``mt``, in the order of their cost: options, files named on
    the command line, the output folder, the checkpoint's kind, the data folder. Word-similarity
    files are read and kept (``args.wordsim_loaded``)."""
    if args.abtt_directions is not None and args.abtt_directions <= 0:
        raise EvalError("--abtt-directions must be positive")
    for option in ("max_tokens", "k"):
        if getattr(args, option) <= 0:
            raise EvalError(f"--{option.replace('_', '-')} must be positive")
    if args.command == "lm":
        if args.prefix_len <= 0 or args.gen_len <= 0 or args.num_texts < 0 or args.batch_size <= 0:
            raise EvalError("--prefix-len, --gen-len and --batch-size must be positive, --num-texts non-negative")
        if args.tokens_per_sample is not None and args.tokens_per_sample <= 0:
            raise EvalError("--tokens-per-sample must be positive")
        if args.context_window is not None and args.context_window < 0:
            raise EvalError("--context-window must not be negative")
        if args.max_hidden_states <= 0:
            raise EvalError("--max-hidden-states must be positive")
    _check_modules(REQUIRED_MODULES[args.command], f"fairseq-agg-eval {args.command}")
    _check_data_folder(args.data)
    header = peek_checkpoint(args.path)
    kind = checkpoint_kind(header["task"])
    if kind is not None and kind != args.command:
        raise EvalError(f"{args.path} is a {KIND_WORDS[kind]} checkpoint (task {header['task']}); "
                        f"score it with `fairseq-agg-eval {kind}`")
    check_output_folder(args.out)
    if args.command == "lm":
        if args.train_log is not None:
            _check_readable_file(args.train_log, "--train-log", "give fairseq-train's log, or leave --train-log out")
        _check_bpe(args)
        args.wordsim_loaded = load_wordsim(args)
    else:
        if args.generate_output is not None:
            _check_readable_file(args.generate_output, "--generate-output",
                                 "give a file fairseq-generate wrote, or leave the option out to run it")
            read_text(args.generate_output, f"--generate-output {args.generate_output}",
                      "give a file fairseq-generate wrote")
        if args.reference is not None:
            _check_readable_file(args.reference, "--reference", "give the raw reference text of the split")
            read_text(args.reference, f"--reference {args.reference}", "give the raw reference text of the split")
    dictionary = _check_data(args, header["task_cfg"])
    if args.neighbours and dictionary is not None:
        words = _dictionary_words(dictionary)
        for word in args.neighbours:
            if word not in words:
                raise EvalError(f"--neighbours: {word!r} is not in the dictionary {dictionary}; "
                                "give tokens as they appear there")


DESCRIPTION = "fairseq-agg-eval: the AGG paper's evaluations from a checkpoint, as JSON, Markdown and PNG."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fairseq-agg-eval", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(q):
        q.add_argument("data", type=Path, help="fairseq data-bin folder the checkpoint was trained on")
        q.add_argument("--path", type=Path, required=True, help="checkpoint to evaluate")
        q.add_argument("--out", type=Path, required=True, help="folder for results.json, report.md and figures")
        q.add_argument("--name", default=None, help="run name in reports (default: the checkpoint's folder name)")
        q.add_argument("--subset", default="test", help="split to evaluate (default: %(default)s)")
        q.add_argument("--max-tokens", type=int, default=4096, help="tokens per scoring batch (default: %(default)s)")
        q.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is present")
        q.add_argument("--fp16", action="store_true", help="run the model in float16 (GPU)")
        q.add_argument("--k", type=int, default=5, help="nearest neighbours per query (default: %(default)s)")
        q.add_argument("--neighbours", nargs="+", default=None, metavar="TOKEN",
                       help="tokens whose nearest neighbours to list (default: three rare-group tokens)")
        q.add_argument("--post-hoc", nargs="+", default=None, choices=["mean_removal", "abtt"],
                       help="also report I(W), geometry (and word similarity) after these post-hoc remedies "
                       "of the output embedding: mean removal, all-but-the-top (Mu and Viswanath 2018)")
        q.add_argument("--isotropy-signs", default="both", choices=["both", "as_returned"],
                       help="I(W)'s directions: both signs of every eigenvector of W^T W, independent of the "
                       "signs LAPACK returns (default), or as_returned, the older variant over the eigenvectors "
                       "with the signs torch.linalg.eigh returned (it changes when a sign flips)")
        q.add_argument("--abtt-directions", type=int, default=None,
                       help="principal directions all-but-the-top removes (default: d / 100, at least 1)")
        q.add_argument("--no-progress-bar", action="store_true")

    lm = sub.add_parser("lm", help="language model: PPL/Uniq per frequency group, I(W), word similarity, "
                        "neighbours, greedy generation, rep/wrep, geometry, figures")
    common(lm)
    lm.add_argument("--tokens-per-sample", type=int, default=None,
                    help="scoring block length (default: the checkpoint's training value)")
    lm.add_argument("--context-window", type=int, default=None,
                    help="tokens of context before each scored block, as fairseq-eval-lm "
                    "(default: half of --tokens-per-sample)")
    lm.add_argument("--sample-break-mode", default="none", choices=["none", "complete", "complete_doc", "eos"],
                    help="as fairseq-eval-lm (default: %(default)s)")
    lm.add_argument("--wordsim", nargs="+", default=None, metavar="NAME=FILE",
                    help="word-similarity files (default: MEN, WS353, RG65, RW from data/wordsim, the "
                    "excerpts shipped in data/wordsim/excerpts unless scripts/download-wordsim.sh fetched them)")
    lm.add_argument("--bpe", default="auto", choices=["auto", "none", "gpt2", "sentencepiece", "subword_nmt"],
                    help="how words map to dictionary pieces for word similarity; auto: the BPE files that "
                    "scripts/prepare-*.sh left in DATA/bpe, else none (default: %(default)s)")
    lm.add_argument("--gpt2-encoder-json", default=None,
                    help="(default: DATA/bpe/encoder.json, else the copy shipped in data/gpt2_bpe)")
    lm.add_argument("--gpt2-vocab-bpe", default=None,
                    help="(default: DATA/bpe/vocab.bpe, else the copy shipped in data/gpt2_bpe)")
    lm.add_argument("--sentencepiece-model", default=None, help="(default: DATA/bpe/spm.model)")
    lm.add_argument("--bpe-codes", default=None, help="subword-nmt codes, for --bpe subword_nmt")
    lm.add_argument("--num-texts", type=int, default=100,
                    help="greedy continuations to generate; 0 skips generation (default: %(default)s)")
    lm.add_argument("--prefix-len", type=int, default=50, help="(default: %(default)s)")
    lm.add_argument("--gen-len", type=int, default=100, help="(default: %(default)s)")
    lm.add_argument("--batch-size", type=int, default=32, help="continuations generated at once (default: %(default)s)")
    lm.add_argument("--examples", type=int, default=3, help="continuations quoted in the report (default: %(default)s)")
    lm.add_argument("--max-hidden-states", type=int, default=5000,
                    help="hidden states sampled for their mean cosine (default: %(default)s)")
    lm.add_argument("--train-log", type=Path, default=None,
                    help="fairseq-train log for the rare-group curve (default: train.log next to the checkpoint)")
    lm.add_argument("--no-training-curves", action="store_true",
                    help="skip I(W) over the other checkpoints of the checkpoint's folder")

    mt = sub.add_parser("mt", help="translation: tokenized (compound-split) BLEU and sacreBLEU, "
                        "cross-lingual neighbours, I(W), geometry, figures")
    common(mt)
    mt.add_argument("--generate-output", type=Path, default=None,
                    help="an existing fairseq-generate output to score (default: run fairseq-generate)")
    mt.add_argument("--reference", type=Path, default=None,
                    help="raw (untokenized) reference file for sacreBLEU, e.g. newstest2014.de")
    mt.add_argument("--beam", type=int, default=4, help="(default: %(default)s)")
    mt.add_argument("--lenpen", type=float, default=0.6, help="(default: %(default)s)")

    cmp_ = sub.add_parser("compare", help="several runs' results.json side by side as the paper's tables")
    cmp_.add_argument("results", nargs="+", help="results.json files (or folders holding one)")
    cmp_.add_argument("--out", type=Path, required=True)
    cmp_.add_argument("--names", nargs="+", default=None,
                      help="row names, one per run (default: each run's name); runs given the same name are runs of "
                      "one method (seeds): their row shows mean ± sample std (ddof=1), compare.json each run's values")
    cmp_.add_argument("--tables", nargs="+", default=None,
                      help="tables to write (default: all that the runs support); see fairseq_agg/report.py")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    # fairseq 0.12 on current hydra/torch: deprecation notices that say nothing about the run
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(hydra|torch\.utils\.data)")
    warnings.filterwarnings("ignore", message=".*(schema_matching|strict flag|pin_memory).*")
    if args.command == "compare":
        compare(args)
        return 0
    if args.name is None:
        args.name = args.path.resolve().parent.name
    check_inputs(args)  # all of them, before anything that takes time
    if args.command == "lm":
        result = evaluate_lm(args)
    else:
        result = evaluate_mt(args)
    from fairseq_agg.report import summary_line

    print(summary_line(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
