"""``fairseq-agg-eval``, one module per subcommand: :mod:`.lm`, :mod:`.mt`, :mod:`.compare`;
:mod:`.cli` holds the options and the input checks, :mod:`.common` what they share. The metrics
themselves are fairseq-free, in :mod:`fairseq_agg.metrics`."""
