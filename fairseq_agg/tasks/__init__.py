from fairseq_agg.tasks import language_modeling_agg, translation_agg  # noqa: F401 (registers)
