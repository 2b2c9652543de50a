"""fairseq-agg-eval: the AGG paper's evaluations from a checkpoint, as JSON, Markdown and PNG.

    fairseq-agg-eval lm  DATA_BIN --path CHECKPOINT --out DIR   # Tables 3-6, 10, 13, 15; geometry
    fairseq-agg-eval mt  DATA_BIN --path CHECKPOINT --out DIR   # Table 7 (BLEU), Table 14
    fairseq-agg-eval compare RUN.json ... --out DIR             # runs side by side, as the paper's tables

(also ``python -m fairseq_agg.eval``). The subcommands live in :mod:`fairseq_agg.evaluation`
(``lm``, ``mt``, ``compare``; ``cli`` holds the options and the input checks); this module is the
command's entry point and keeps their public names importable from here. The metrics themselves
live in :mod:`fairseq_agg.metrics`. Definitions: ``fairseq-agg-eval lm -h``.
"""

import sys

from fairseq_agg.evaluation.cli import build_parser, check_inputs, main
from fairseq_agg.evaluation.common import (
    EvalError, checkpoint_config, choose_queries, dictionary_groups, isotropy_series, load_dictionary_counts,
    output_embedding, word_rows, write_outputs,
)
from fairseq_agg.evaluation.compare import compare, method_summary
from fairseq_agg.evaluation.lm import (
    evaluate_lm, greedy_continuations, load_wordsim, log_points, parse_train_log, read_word_similarity, resolve_bpe,
    score_lm, setup_lm, training_curves,
)
from fairseq_agg.evaluation.mt import evaluate_mt, parse_generate_output

__all__ = [
    "EvalError", "build_parser", "check_inputs", "checkpoint_config", "choose_queries", "compare",
    "dictionary_groups", "evaluate_lm", "evaluate_mt", "greedy_continuations", "isotropy_series", "load_dictionary_counts",
    "load_wordsim", "log_points", "main", "method_summary", "output_embedding", "parse_generate_output",
    "parse_train_log", "read_word_similarity", "resolve_bpe", "score_lm", "setup_lm", "training_curves",
    "word_rows", "write_outputs",
]

if __name__ == "__main__":
    sys.exit(main())
