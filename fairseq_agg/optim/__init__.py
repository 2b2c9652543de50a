from fairseq_agg.optim.coupled_adam import mark_embedding_parameters  # noqa: F401 (registers coupled_adam)
