"""fairseq-agg: Adaptive Gradient Gating (Yu et al., ACL 2022) as a fairseq plug-in.

``--user-dir fairseq_agg`` registers the criteria ``agg_cross_entropy``,
``agg_unlikelihood`` and ``unlikelihood_cross_entropy`` and the tasks
``language_modeling_agg`` and ``translation_agg``. The math lives in
:mod:`fairseq_agg.core`, which needs PyTorch only and works without fairseq installed.
"""

__version__ = "0.1.0"

try:
    import fairseq  # noqa: F401
except ImportError:
    pass
else:
    # Registered on any import of the package: fairseq's --user-dir does not re-import a
    # package that was imported before it.
    from fairseq_agg import criterions, tasks  # noqa: F401
