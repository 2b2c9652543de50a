"""What the AGG criteria need from a task: the update clock, counting of training targets
summed over micro-batches and workers, and the counter in the checkpoint. Also, whatever the
criterion, I(W) of the output embedding at each validation (paper Figure 2 from the log)."""

import argparse
import logging
import math
from typing import Optional

import torch
from fairseq.distributed import utils as distributed_utils
from fairseq.logging import metrics

from fairseq_agg.core import TokenCounter
from fairseq_agg.criterions.agg_cross_entropy import output_projection_weight
from fairseq_agg.isotropy import isotropy
from fairseq_agg.optim.coupled_adam import mark_embedding_parameters

logger = logging.getLogger(__name__)

# fairseq 0.12 loads checkpoints with torch.load's default, weights_only=True since torch 2.6;
# checkpoints of architectures configured through argparse (transformer_wmt_en_de and the other
# translation models) hold an argparse.Namespace, so without this neither resuming nor
# fairseq-generate could load them.
if hasattr(torch.serialization, "add_safe_globals"):
    torch.serialization.add_safe_globals([argparse.Namespace])


class AggCounterState(torch.nn.Module):
    """Carries the task's token counter inside the model's state dict.

    fairseq saves ``task_state`` but does not restore it when training resumes, while the
    model state is restored on every worker; so the counter travels as the model's extra
    state (key ``agg_counter._extra_state``). It has no parameters and no buffers.
    """

    def __init__(self, task):
        super().__init__()
        self._task = [task]  # a list keeps the task out of the module tree
        self.register_load_state_dict_pre_hook(self._allow_missing)

    @staticmethod
    def _allow_missing(module, state_dict, prefix, *args):
        # Checkpoints of plain fairseq runs hold no counter: start from an empty one.
        state_dict.setdefault(prefix + "_extra_state", None)

    def __deepcopy__(self, memo):
        # Copies of the model (fairseq's EMA) share the task's one counter.
        return AggCounterState(self._task[0])

    def get_extra_state(self):
        return self._task[0].agg_counter.state_dict()

    def set_extra_state(self, state):
        if state is not None:
            self._task[0].agg_counter.load_state_dict(state)


class AggTaskMixin:
    """Mixed into fairseq's language-modelling and translation tasks."""

    def _init_agg(self):
        # fairseq's language-modelling task is a legacy task: its config lives in self.args.
        self.agg_options = getattr(self, "cfg", None) or self.args
        dictionary = self.target_dictionary
        self.agg_counter = TokenCounter(len(dictionary), dictionary.nspecial)
        self._agg_window_from_option = False
        self._agg_frozen_rows = None
        self._valid_isotropy = not getattr(self.agg_options, "no_valid_isotropy", False)
        self._isotropy_due = self._valid_isotropy
        if getattr(self.agg_options, "amp", False):
            raise ValueError(
                "the AGG tasks do not support --amp: it retries overflowing batches after the "
                "optimizer step, which the token counter cannot tell from a new update; use --fp16 or --bf16"
            )

    # -- set-up ---------------------------------------------------------------------
    def configure_agg(self, window: Optional[int], static_after: Optional[int]) -> TokenCounter:
        if window is not None:
            self.agg_counter.set_window(window)
            self._agg_window_from_option = True
        self.agg_counter.freeze_after = static_after
        return self.agg_counter

    def freeze_rows(self, rows: torch.Tensor) -> None:
        """Keep the embedding rows in ``rows`` (bool, over the target dictionary) untrained."""
        self._agg_frozen_rows = rows

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        model.agg_counter = AggCounterState(self)
        mark_embedding_parameters(model)  # read by --optimizer coupled_adam only
        return model

    def get_batch_iterator(self, dataset, *args, epoch=1, **kwargs):
        itr = super().get_batch_iterator(dataset, *args, epoch=epoch, **kwargs)
        if (
            self.agg_counter.window is None
            and not self._agg_window_from_option
            and dataset is self.datasets.get(self.agg_options.train_subset)
        ):
            schedule = self.agg_options.update_freq
            update_freq = schedule[min(epoch, len(schedule)) - 1]
            window = max(1, math.ceil(len(itr) / update_freq))
            self.agg_counter.set_window(window)
            logger.info(f"AGG token counter window K = {window} updates (one epoch)")
        return itr

    # -- the update clock -------------------------------------------------------------
    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        if _starts_update(model):
            # fairseq clears gradients when an update begins and when it throws one away
            # (fp16 overflow, OOM): the pending counts go with them.
            self.agg_counter.discard_pending()
            # Counts live where the model is, so that the all-reduce runs on the right device
            # even for a worker whose first batches are all dummies.
            self.agg_counter.to(next(model.parameters()).device)
        result = super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)
        # Counted only once its gradient exists: a batch that fails (OOM) is not.
        if not ignore_grad:
            self.agg_counter.add(sample["target"], self.target_dictionary.pad())
        for weight in self._frozen_weights(model, optimizer):
            if weight.grad is not None:
                weight.grad[self._agg_frozen_rows.to(weight.device)] = 0
        return result

    def optimizer_step(self, optimizer, model, update_num):
        frozen = [(w, w.data[self._agg_frozen_rows.to(w.device)].clone()) for w in self._frozen_weights(model, optimizer)]
        super().optimizer_step(optimizer, model, update_num)
        for weight, saved in frozen:
            # Restored, not only gradient-free: weight decay would still move them.
            weight.data[self._agg_frozen_rows.to(weight.device)] = saved
        self.agg_counter.commit(all_reduce=_data_parallel_sum)
        self._isotropy_due = self._valid_isotropy

    # -- validation -------------------------------------------------------------------
    def valid_step(self, sample, model, criterion):
        loss, sample_size, logging_output = super().valid_step(sample, model, criterion)
        if self._isotropy_due:
            # Once per validation (its first batch, on every worker alike, so that the logging
            # outputs keep the same keys everywhere): the weights change only between updates.
            self._isotropy_due = False
            weight = _output_embedding(model)
            if weight is not None:
                logging_output["isotropy"] = isotropy(weight)
                logging_output["isotropy_logs"] = 1
        return loss, sample_size, logging_output

    def reduce_metrics(self, logging_outputs, criterion):
        super().reduce_metrics(logging_outputs, criterion)
        logs = sum(log.get("isotropy_logs", 0) for log in logging_outputs)
        if logs > 0:
            metrics.log_scalar("isotropy", sum(log.get("isotropy", 0) for log in logging_outputs) / logs, logs, round=4)

    def _frozen_weights(self, model, optimizer):
        if self._agg_frozen_rows is None:
            return []
        if getattr(optimizer, "fp32_params", None) is not None:
            raise ValueError(
                "--agg-study freeze cannot hold rows fixed while the optimizer keeps fp32 master "
                "weights (--fp16, --bf16); train the study in fp32 or with --memory-efficient-fp16 "
                "or --memory-efficient-bf16"
            )
        decoder = _unwrap(model).decoder
        weights = (decoder.embed_tokens.weight, decoder.output_projection.weight)
        return list({id(w): w for w in weights}.values())


def _unwrap(model):
    while hasattr(model, "module"):  # fairseq's data-parallel wrappers
        model = model.module
    return model


def _output_embedding(model) -> Optional[torch.Tensor]:
    """W of logits = h W^T, or None for output layers without one (adaptive softmax)."""
    try:
        return output_projection_weight(_unwrap(model))
    except ValueError:
        return None


def _starts_update(model) -> bool:
    return all(param.grad is None for param in model.parameters())


def _data_parallel_sum(pending: torch.Tensor) -> torch.Tensor:
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return pending
    if distributed_utils.get_data_parallel_world_size() <= 1:
        return pending
    return distributed_utils.all_reduce(
        pending, group=distributed_utils.get_data_parallel_group(), op="sum"
    )
