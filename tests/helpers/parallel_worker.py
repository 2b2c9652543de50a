"""One torchrun worker of ``tests/test_parallel.py``: trains a tiny language model with AGG under
FSDP2, tensor parallelism or both (gloo, CPU) and, on the same process, the same model without any
parallelism on the same global batch (the reference); writes what the test compares to
``$AGG_PARALLEL_OUT/rank<R>.json``.

    AGG_PARALLEL_OUT=DIR torchrun --nproc-per-node 2 tests/helpers/parallel_worker.py tp:fused:float64 tp:gated:float32:resume

Layouts: ``fsdp`` (data parallel over all processes), ``tp`` (the output layer sharded over the
vocabulary on all processes, ``ColwiseParallel``), ``fsdp_tp`` (a 2 x 2 mesh: FSDP2 over ``dp``,
tensor parallel over ``tp``). Heads: ``fused`` (``agg.loss`` inside the model's forward;
``vocab_parallel=True`` wherever the weight is sharded over the vocabulary) and ``gated``
(``GatedOutputLayer`` as its own module, the loss computed by the model from its logits, with
``loss_parallel()`` under tensor parallelism). Every run has ignored labels and label smoothing, but
for the gated head on sharded logits: torch's ``loss_parallel()`` has no label smoothing.
``--resume`` stops half-way, saves with ``torch.distributed.checkpoint`` and continues in fresh
objects restored from it.
"""

import argparse
import contextlib
import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor.parallel import loss_parallel

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from fairseq_agg.training import AdaptiveGradientGating, GatedOutputLayer  # noqa: E402

VOCAB, DIM, SEQ, GLOBAL_BATCH, STEPS = 37, 16, 12, 8, 6
SMOOTHING, IGNORE = 0.1, -100
AGG_OPTIONS = dict(alpha=0.4, window=3, nspecial=2, label_smoothing=SMOOTHING)


class TinyLM(nn.Module):
    """Embedding, two residual MLP blocks, a final norm and an untied bias-free head."""

    def __init__(self, agg: AdaptiveGradientGating, head: str, sharded_logits: bool):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))
                                    for _ in range(2))
        self.norm = nn.LayerNorm(DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)
        if head == "gated":
            self.lm_head = agg.gated_output_layer(self.lm_head)
        object.__setattr__(self, "agg", agg)
        self.head = head
        self.vocab_parallel = False
        # torch's loss_parallel() refuses label smoothing (and a hand-written smoothing term gets
        # wrong gradients from it): the gated head smooths only where the logits are whole.
        self.gated_smoothing = not sharded_logits

    def forward(self, tokens, labels, normalizer):
        h = self.embed(tokens)
        for block in self.blocks:
            h = h + block(h)
        h = self.norm(h)
        if self.head == "fused":
            return self.agg.loss(h, self.lm_head.weight, labels, reduction="sum",
                                 vocab_parallel=self.vocab_parallel) / normalizer
        with self.agg.targets(labels):
            logits = self.lm_head(h)
        if self.gated_smoothing:
            return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                                   label_smoothing=SMOOTHING, reduction="sum") / normalizer
        # On sharded logits, inside loss_parallel(), which has no label smoothing.
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
        return (loss.full_tensor() if hasattr(loss, "full_tensor") else loss) / normalizer


def batches(dtype_seed: int):
    """The same global batches on every process: frequent tokens and a long tail, some ignored."""
    g = torch.Generator().manual_seed(dtype_seed)
    weights = 1.0 / torch.arange(1, VOCAB + 1, dtype=torch.float64) ** 1.3
    for _ in range(STEPS):
        tokens = torch.multinomial(weights.expand(GLOBAL_BATCH, -1), SEQ + 1, replacement=True, generator=g)
        labels = tokens[:, 1:].clone()
        labels[torch.rand(labels.shape, generator=g) < 0.15] = IGNORE
        yield tokens[:, :-1], labels


def build(head: str, dtype, sharded_logits: bool):
    torch.manual_seed(0)
    agg = AdaptiveGradientGating(VOCAB, **AGG_OPTIONS)
    model = TinyLM(agg, head, sharded_logits).to(dtype)
    return model, agg


def make_optimizer(model):
    return torch.optim.Adam(model.parameters(), lr=1e-2, foreach=False)


def train(model, agg, optimizer, steps, slice_of, dp_size, record, dp_group=None):
    for tokens, labels in steps:
        normalizer = labels.ne(IGNORE).sum()
        tokens, labels = slice_of(tokens), slice_of(labels)
        sharded_logits = model.vocab_parallel and model.head == "gated"
        with loss_parallel() if sharded_logits else contextlib.nullcontext():  # forward and backward
            # FSDP2 averages gradients over its processes: each process's share of the global
            # mean, times their number, sums to the global mean.
            loss = model(tokens, labels, normalizer) * dp_size
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        agg.step()
        total = loss.detach().clone()
        if dp_size > 1:
            dist.all_reduce(total, group=dp_group)  # the global loss: the data-parallel shares summed
        record.append(float(total) / dp_size)


def full_weights(model):
    out = {}
    for name, param in model.named_parameters():
        value = param.full_tensor() if hasattr(param, "full_tensor") else param
        out[name.replace("_checkpoint_wrapped_module.", "")] = value.detach()
    return out


def counter_state(agg):
    c = agg.counter
    return {"num_updates": c.num_updates, "window_sum": c.window_sum.tolist(),
            "slots": [[ids.tolist(), cnt.tolist()] for ids, cnt in c.slots]}


def parallelize(model, layout, head):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    world, rank = dist.get_world_size(), dist.get_rank()
    if layout == "fsdp":
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
        dp_mesh, dp_size, dp_rank = mesh, world, rank
        tp_mesh = None
    elif layout == "tp":
        tp_mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
        dp_mesh, dp_size, dp_rank = None, 1, 0
    else:
        mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
        dp_mesh, tp_mesh = mesh["dp"], mesh["tp"]
        dp_size, dp_rank = dp_mesh.size(), dp_mesh.get_local_rank()
    if tp_mesh is not None:
        parallelize_module(model.lm_head, tp_mesh, ColwiseParallel(use_local_output=head == "fused"))
        model.vocab_parallel = True
    if dp_mesh is not None:
        for block in model.blocks:
            fully_shard(block, mesh=dp_mesh)
        if head == "gated":
            fully_shard(model.lm_head, mesh=dp_mesh)  # the head as a unit of its own
        fully_shard(model, mesh=dp_mesh)
    per = GLOBAL_BATCH // dp_size
    dp_group = dp_mesh.get_group() if dp_mesh is not None else None
    return (lambda t: t[dp_rank * per:(dp_rank + 1) * per]), dp_size, dp_group


def run_parallel(scenario, dtype, sharded, reference):
    """The scenario's parallel run, compared with its reference: what rank<R>-<scenario>.json holds."""
    layout, head, _, *resume = scenario.split(":")
    model, agg = build(head, dtype, sharded)
    slice_of, dp_size, dp_group = parallelize(model, layout, head)
    optimizer = make_optimizer(model)
    losses, restored = [], None
    steps = batches(1)
    if resume:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                             set_model_state_dict, set_optimizer_state_dict)

        first = [next(steps) for _ in range(STEPS // 2)]
        train(model, agg, optimizer, first, slice_of, dp_size, losses, dp_group)
        folder = os.path.join(os.environ["AGG_PARALLEL_OUT"], f"dcp-{scenario.replace(':', '-')}")
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer),
                  "agg": agg.state_dict()}, checkpoint_id=folder)
        model, agg = build(head, dtype, sharded)  # fresh objects: everything comes from the checkpoint
        for param in model.parameters():
            param.data.normal_()  # nothing of the first half survives outside the checkpoint
        slice_of, dp_size, dp_group = parallelize(model, layout, head)
        optimizer = make_optimizer(model)
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer),
                 "agg": agg.state_dict()}
        dcp.load(state, checkpoint_id=folder)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optim"])
        agg.load_state_dict(state["agg"])
        restored = counter_state(agg)["num_updates"]
    train(model, agg, optimizer, steps, slice_of, dp_size, losses, dp_group)

    ref_model, ref_agg, ref_losses = reference
    ref_weights, weights = full_weights(ref_model), full_weights(model)
    return {
        "rank": dist.get_rank(),
        "losses": losses, "ref_losses": ref_losses,
        "max_weight_diff": max(float((weights[n] - ref_weights[n]).abs().max()) for n in ref_weights),
        "weight_scale": max(float(w.abs().max()) for w in ref_weights.values()),
        "same_parameters": sorted(weights) == sorted(ref_weights),
        "counter": counter_state(agg), "ref_counter": counter_state(ref_agg),
        "rare": agg.num_rare, "ref_rare": ref_agg.num_rare,
        "restored_updates": restored,
    }


def refusals():
    """What a DTensor weight gets from AGG without the right call: one AggConfigError line each."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from fairseq_agg.errors import AggConfigError

    def message(call):
        try:
            call()
        except AggConfigError as error:
            return str(error)
        return None

    world = dist.get_world_size()
    agg = AdaptiveGradientGating(VOCAB, **AGG_OPTIONS)
    hidden, labels = torch.randn(3, DIM), torch.randint(0, VOCAB, (3,))
    tp_head = nn.Linear(DIM, VOCAB, bias=False)
    parallelize_module(tp_head, init_device_mesh("cpu", (world,)), ColwiseParallel())
    fsdp_head = nn.Linear(DIM, VOCAB, bias=False)
    fully_shard(fsdp_head, mesh=init_device_mesh("cpu", (world,)))
    two_d = nn.Linear(DIM, VOCAB, bias=False)
    mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp")) if world == 4 else None
    if mesh is not None:
        parallelize_module(two_d, mesh["tp"], ColwiseParallel())
        fully_shard(two_d, mesh=mesh["dp"])
    return {
        "tp_weight_without_vocab_parallel": message(lambda: agg.loss(hidden, tp_head.weight, labels)),
        "fsdp_weight_outside_forward": message(lambda: agg.loss(hidden, fsdp_head.weight, labels)),
        "plain_weight_with_vocab_parallel": message(
            lambda: agg.loss(hidden, nn.Linear(DIM, VOCAB, bias=False).weight, labels, vocab_parallel=True)),
        "fsdp_tp_weight_outside_forward": None if mesh is None else message(
            lambda: agg.loss(hidden, two_d.weight, labels, vocab_parallel=True)),
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("scenarios", nargs="+", metavar="LAYOUT:HEAD:DTYPE[:resume]",
                   help="layout fsdp, tp or fsdp_tp; head fused or gated; dtype float64 or float32")
    args = p.parse_args()
    torch.set_num_threads(1)
    # The references first, before the process group exists: their agg.step() sums over no one.
    references = {}
    for scenario in args.scenarios:
        layout, head, dtype_name, *_ = scenario.split(":")
        dtype = getattr(torch, dtype_name)
        sharded = head == "gated" and layout != "fsdp"  # logits sharded over the vocabulary
        ref_model, ref_agg = build(head, dtype, sharded)
        ref_losses = []
        train(ref_model, ref_agg, make_optimizer(ref_model), batches(1), lambda t: t, 1, ref_losses)
        references[scenario] = (dtype, sharded, (ref_model, ref_agg, ref_losses))

    dist.init_process_group("gloo")
    with open(os.path.join(os.environ["AGG_PARALLEL_OUT"], f"rank{dist.get_rank()}-refusals.json"), "w") as f:
        json.dump(refusals(), f)
    for scenario, (dtype, sharded, reference) in references.items():
        result = run_parallel(scenario, dtype, sharded, reference)
        name = f"rank{dist.get_rank()}-{scenario.replace(':', '-')}.json"
        with open(os.path.join(os.environ["AGG_PARALLEL_OUT"], name), "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
