"""fairseq-agg: Adaptive Gradient Gating (Yu et al., ACL 2022) as a fairseq plug-in.

``--user-dir fairseq_agg`` registers the criteria ``agg_cross_entropy``,
``agg_unlikelihood``, ``unlikelihood_cross_entropy`` and ``cosreg_cross_entropy``, the tasks
``language_modeling_agg`` and ``translation_agg``, and the optimizer ``coupled_adam``. The math
lives in :mod:`fairseq_agg.core` (AGG) and :mod:`fairseq_agg.remedies` (Coupled Adam, CosReg,
post-hoc remedies), which need PyTorch only and work without fairseq installed.
"""

__version__ = "0.2.0"

import logging as _logging

# fairseq 0.12 prints "Please install tensorboardX" through these loggers on import, which would
# precede every one-line refusal of the plug-in's tools.
for _name in ("fairseq.tasks.text_to_speech", "fairseq.tasks.frm_text_to_speech"):
    _logging.getLogger(_name).setLevel(_logging.WARNING)

try:
    import fairseq  # noqa: F401
except ImportError:
    pass
else:
    # Registered on any import of the package: fairseq's --user-dir does not re-import a
    # package that was imported before it.
    from fairseq_agg import fairseq_fixes

    fairseq_fixes.apply()
    from fairseq_agg import criterions, optim, tasks  # noqa: F401
