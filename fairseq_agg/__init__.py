"""fairseq-agg: Adaptive Gradient Gating (Yu et al., ACL 2022) as a fairseq plug-in.

``--user-dir fairseq_agg`` registers the criterion ``agg_cross_entropy`` and the tasks
``language_modeling_agg`` and ``translation_agg``. The math lives in
:mod:`fairseq_agg.core`, which needs PyTorch only.
"""

__version__ = "0.1.0"

try:
    import fairseq  # noqa: F401
except ImportError:  # the core module stays usable without fairseq
    pass
else:
    from fairseq_agg import criterions, tasks  # noqa: F401
