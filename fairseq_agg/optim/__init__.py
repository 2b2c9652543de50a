from fairseq_agg.optim.coupled_adam import mark_embedding_parameters  # registers coupled_adam

__all__ = ["mark_embedding_parameters"]
