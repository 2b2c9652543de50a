"""Where AGG finds what it needs in a model: the one place that knows fairseq's and the data-
parallel wrappers' layout (used by the criteria, the tasks, the optimizer, the evaluation, the
demo and the Hugging Face adapter). Attribute access only: no fairseq import."""

from typing import Optional

import torch

from fairseq_agg.errors import AggConfigError


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside data-parallel wrappers (fairseq's, torch's DDP and DataParallel, accelerate's)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def output_projection_weight(model: torch.nn.Module) -> torch.Tensor:
    """W of logits = h W^T of a fairseq model, refusing output layers that AGG's gradient split
    does not cover."""
    decoder = getattr(unwrap(model), "decoder", None)
    if decoder is None:
        raise AggConfigError("agg criteria need a fairseq model with a decoder")
    if getattr(decoder, "adaptive_softmax", None) is not None:
        raise AggConfigError("agg criteria do not support --adaptive-softmax-cutoff: AGG needs a full softmax over W")
    projection = getattr(decoder, "output_projection", None)
    if not isinstance(projection, torch.nn.Linear) or projection.bias is not None:
        raise AggConfigError(
            "agg criteria need decoder.output_projection to be a bias-free nn.Linear "
            "(fairseq's transformer_lm_* and transformer_* architectures)"
        )
    return projection.weight


def output_embedding(model: torch.nn.Module) -> Optional[torch.Tensor]:
    """W of a fairseq model, or None for output layers without one (adaptive softmax)."""
    try:
        return output_projection_weight(model)
    except AggConfigError:
        return None
