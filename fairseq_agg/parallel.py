"""AGG's output layer under torch's native parallelism (DTensor): which rows of the vocabulary
this process holds, how its features enter and leave the sharded projection, and one-line
refusals for layouts AGG cannot serve. torch only (no fairseq, no transformers).

Two layouts put a ``DTensor`` weight in AGG's hands, and their placements cannot tell them apart:

* tensor parallelism (``ColwiseParallel`` on the output layer): the weight is sharded over the
  vocabulary for good; each process computes its slice of the logits (``vocab_parallel=True``);
* FSDP2 (``fully_shard``) outside the unit's forward: the weight is sharded only for storage;
  FSDP gathers it when the unit's forward runs, so the loss belongs inside that forward.
"""

from typing import Tuple

import torch

from fairseq_agg import core
from fairseq_agg.errors import AggConfigError

__all__ = ["is_dtensor", "vocab_shard", "replicated_local", "DTENSOR_WEIGHT_REFUSAL"]

DTENSOR_WEIGHT_REFUSAL = (
    "the output weight is a DTensor with placements {placements}: under FSDP2, compute AGG's loss "
    "inside the forward of the module that owns the weight (or use GatedOutputLayer, called as a "
    "module), where FSDP has gathered it; under tensor parallelism (ColwiseParallel, the weight "
    "sharded over the vocabulary) pass vocab_parallel=True"
)


def is_dtensor(tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(tensor, DTensor)


def vocab_shard(weight) -> Tuple[torch.Tensor, core.VocabShard, bool]:
    """For a weight sharded over the vocabulary (``Shard(0)`` on one mesh dimension, replicated
    on any other): this process's rows, where they sit in the vocabulary, and whether this
    process counts the labels for its group (the first process of the vocabulary dimension
    only: the processes of one group see the same labels, which must be counted once)."""
    placements = tuple(weight.placements)
    sharded = [dim for dim, placement in enumerate(placements) if placement.is_shard()]
    if (
        len(sharded) != 1
        or not placements[sharded[0]].is_shard(0)
        or type(placements[sharded[0]]).__name__ != "Shard"
        or not all(p.is_replicate() for dim, p in enumerate(placements) if dim != sharded[0])
    ):
        raise AggConfigError(
            f"vocab_parallel=True needs the output weight sharded over the vocabulary on one mesh "
            f"dimension (placements (Shard(dim=0),), as ColwiseParallel makes), got {placements}; "
            f"a weight that FSDP2 shards too must be used inside its module's forward, where FSDP has gathered it"
        )
    mesh, dim = weight.device_mesh, sharded[0]
    shards, rank = mesh.size(dim), mesh.get_local_rank(dim)
    vocab = weight.size(0)
    rows_per_shard = -(-vocab // shards)  # torch.chunk's split, which Shard(0) uses
    start = min(rank * rows_per_shard, vocab)
    local = weight.to_local()
    if local.size(0) != min(vocab, start + rows_per_shard) - start:
        raise AggConfigError(
            f"the output weight's shard on this process has {local.size(0)} rows where Shard(0) of "
            f"{vocab} rows over {shards} processes gives {min(vocab, start + rows_per_shard) - start}: "
            f"distribute it with ColwiseParallel or distribute_tensor"
        )
    return local, core.VocabShard(start, vocab, mesh.get_group(dim)), rank == 0


def replicated_local(tensor, name: str) -> torch.Tensor:
    """``tensor`` itself, or the local copy of a DTensor replicated on every mesh dimension
    (its gradient, summed over the vocabulary shards by AGG, is the replicated gradient)."""
    if not is_dtensor(tensor):
        return tensor
    if not all(p.is_replicate() for p in tensor.placements):
        raise AggConfigError(
            f"AGG {name} must be replicated on every process of the output layer's mesh, got "
            f"placements {tuple(tensor.placements)}: redistribute them to Replicate() first"
        )
    return tensor.to_local()


def sharded_logits_io(hidden, weight):
    """For the gated output layer under tensor parallelism: the features as a local tensor whose
    gradient DTensor sums over the vocabulary shards, and a function that wraps this process's
    slice of the logits as the ``Shard(-1)`` DTensor that ``loss_parallel()`` expects."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    mesh, placements = weight.device_mesh, tuple(weight.placements)
    vocab_dim = next(dim for dim, p in enumerate(placements) if p.is_shard())
    if not is_dtensor(hidden):
        hidden = DTensor.from_local(hidden, mesh, [Replicate()] * mesh.ndim, run_check=False)
    elif not all(p.is_replicate() for p in hidden.placements):
        hidden = hidden.redistribute(mesh, [Replicate()] * mesh.ndim)
    partial = [Partial() if dim == vocab_dim else Replicate() for dim in range(mesh.ndim)]
    local_hidden = hidden.to_local(grad_placements=partial)

    def wrap(local_logits: torch.Tensor):
        shape = (*local_hidden.shape[:-1], weight.size(0))
        out_placements = [Shard(local_logits.dim() - 1) if dim == vocab_dim else Replicate() for dim in range(mesh.ndim)]
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(local_logits, mesh, out_placements, run_check=False, shape=shape, stride=stride)

    return local_hidden, wrap
