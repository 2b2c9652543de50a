"""Adaptive Gradient Gating for Hugging Face ``transformers`` (``pip install -e ".[hf]"``).

:class:`AggTrainer` is a ``transformers.Trainer`` that trains any causal LM whose output head is
a bias-free ``nn.Linear`` (GPT-2, Llama/Qwen2/Mistral-style, GPT-NeoX; tied or untied) with
AGG's loss; :class:`AggArguments` holds its options. See :mod:`fairseq_agg.hf.trainer`.
"""

from fairseq_agg.hf._compat import hide_unloadable_torchaudio

hide_unloadable_torchaudio()

try:
    import transformers  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "fairseq_agg.hf needs Hugging Face transformers and accelerate: pip install -e \".[hf]\" "
        "(or pip install transformers accelerate)"
    ) from error

from fairseq_agg.hf.trainer import AGG_COUNTER_NAME, AggArguments, AggTrainer, output_head

__all__ = ["AggArguments", "AggTrainer", "AGG_COUNTER_NAME", "output_head"]
