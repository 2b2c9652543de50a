from fairseq_agg.criterions import agg_cross_entropy, cosreg_cross_entropy, unlikelihood  # noqa: F401 (registers)
