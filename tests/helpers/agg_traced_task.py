"""Test-only task: ``language_modeling_agg`` that records, after every optimizer step, digests
of the AGG token counter, of the gates the update used, and of the parameters.

Registered as ``language_modeling_agg_traced`` when imported; each process appends one JSON line
per update to ``$AGG_TRACE_DIR/trace.rank{R}.jsonl`` (R: its data-parallel rank, 0 without
data parallelism). The product has no hooks for this: everything is observed from outside.
"""

import hashlib
import json
import os

import torch
from fairseq.tasks import register_task

from fairseq_agg.tasks.language_modeling_agg import LanguageModelingAggConfig, LanguageModelingAggTask

TASK_NAME = "language_modeling_agg_traced"


def digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


@register_task(TASK_NAME, dataclass=LanguageModelingAggConfig)
class TracedLanguageModelingAggTask(LanguageModelingAggTask):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._trace_gates = []  # digests of the gates seen by the micro-batches of this update
        self._trace_rare = None
        self._trace_ignored = 0  # micro-batches trained with ignore_grad (fairseq's dummy batches)

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        gates = criterion.current_gates()
        self._trace_gates.append(digest(gates.rare, gates.g1, gates.g2))
        self._trace_rare = gates.num_rare
        self._trace_ignored += int(bool(ignore_grad))
        return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)

    def optimizer_step(self, optimizer, model, update_num):
        super().optimizer_step(optimizer, model, update_num)
        counter = self.agg_counter
        params = sorted(getattr(model, "module", model).named_parameters())
        record = {
            "update": update_num + 1,
            "counter_updates": counter.num_updates,
            "slots": counter.updates_in_window(),
            "window_total": int(counter.window_sum.sum()),
            "window_sum": digest(counter.window_sum),
            "gates": self._trace_gates,
            "num_rare": self._trace_rare,
            "ignored": self._trace_ignored,
            "params": digest(*(p for _, p in params)),
        }
        self._trace_gates = []
        self._trace_ignored = 0
        path = os.path.join(os.environ["AGG_TRACE_DIR"], f"trace.rank{_rank()}.jsonl")
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
