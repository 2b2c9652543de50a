"""The plug-in's one error class (no fairseq import, so plain PyTorch code can catch it too)."""


class AggConfigError(ValueError):
    """A refusal at start-up: the message names the problem and the fix in one line.

    fairseq's command-line tools under ``--user-dir fairseq_agg`` print it as one line and exit
    with status 2 instead of a traceback (:mod:`fairseq_agg.fairseq_fixes`). It is a
    ``ValueError`` so that code catching those keeps working.
    """
