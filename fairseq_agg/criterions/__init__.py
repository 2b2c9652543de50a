from fairseq_agg.criterions import agg_cross_entropy  # noqa: F401 (registers)
