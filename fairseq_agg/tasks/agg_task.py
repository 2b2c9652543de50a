"""What the AGG criteria need from a task: the update clock, counting of training targets
summed over micro-batches and workers, and the counter in the checkpoint. Also, whatever the
criterion, I(W) of the output embedding at each validation (paper Figure 2 from the log)."""

import logging
import math
from typing import Optional

import torch
from fairseq.distributed import utils as distributed_utils
from fairseq.logging import metrics

from fairseq_agg.core import TokenCounter
from fairseq_agg.errors import AggConfigError
from fairseq_agg.fairseq_fixes import LEGACY_COUNTER_KEY
from fairseq_agg.isotropy import isotropy
from fairseq_agg.modeling import output_embedding, unwrap
from fairseq_agg.optim.coupled_adam import mark_embedding_parameters

logger = logging.getLogger(__name__)

class _SetAsideLegacyCounter:
    """Load-state-dict pre-hook of the task's models. Checkpoints of fairseq-agg 0.1 kept the
    counter in the model state; it is set aside for ``restore_agg_checkpoint_state``, so that
    loading weights (into the model or a copy of it) never moves the counter."""

    def __init__(self, task):
        self.task = task

    def __deepcopy__(self, memo):
        return self  # copies of the model (fairseq's EMA) must not copy the task

    def __call__(self, module, state_dict, prefix, *args):
        legacy = state_dict.pop(prefix + LEGACY_COUNTER_KEY, None)
        if legacy is not None and not prefix:
            self.task._agg_legacy_counter = legacy


class AggTaskMixin:
    """Mixed into fairseq's language-modelling and translation tasks."""

    def _init_agg(self):
        # fairseq's language-modelling task is a legacy task: its config lives in self.args.
        self.agg_options = getattr(self, "cfg", None) or self.args
        dictionary = self.target_dictionary
        self.agg_counter = TokenCounter(len(dictionary), dictionary.nspecial)
        self._agg_window_from_option = False
        self._agg_options_to_compare = None  # set on resume, logged once the window is known
        self._agg_frozen_rows = None
        self._valid_isotropy = not getattr(self.agg_options, "no_valid_isotropy", False)
        self._isotropy_due = self._valid_isotropy
        if getattr(self.agg_options, "amp", False):
            raise AggConfigError(
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
        model.register_load_state_dict_pre_hook(_SetAsideLegacyCounter(self))
        mark_embedding_parameters(model)  # read by --optimizer coupled_adam only
        return model

    def get_batch_iterator(self, dataset, *args, epoch=1, **kwargs):
        itr = self._batches_of_an_uninterrupted_run(dataset, args, kwargs, epoch)
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
            self._log_changed_options()
        return itr

    def _batches_of_an_uninterrupted_run(self, dataset, args, kwargs, epoch):
        # fairseq shuffles examples into batches once, seeded with the epoch in which the
        # iterator is first built (seed + epoch), then reuses those batches in every epoch. An
        # uninterrupted run builds them in epoch 1; a run resumed in epoch 2 or later would build
        # others. Built as in epoch 1, they are the same whenever the run was resumed.
        reused = (
            self.can_reuse_epoch_itr(dataset)
            and not kwargs.get("disable_iterator_cache", False)
            and not kwargs.get("update_epoch_batch_itr", False)
            and not getattr(self.agg_options, "rebuild_batches", False)
        )
        if not reused or epoch == 1 or dataset in self.dataset_to_epoch_iter:
            return super().get_batch_iterator(dataset, *args, epoch=epoch, **kwargs)
        itr = super().get_batch_iterator(dataset, *args, epoch=1, **kwargs)
        itr.epoch = epoch
        dataset.set_epoch(epoch)
        return itr

    # -- the checkpoint --------------------------------------------------------------------
    def agg_checkpoint_state(self, criterion) -> dict:
        """What the trainer saves under the checkpoint's ``extra_state["agg"]``."""
        options = criterion.agg_options() if hasattr(criterion, "agg_options") else None
        return {"counter": self.agg_counter.state_dict(), "options": options}

    def restore_agg_checkpoint_state(self, state: Optional[dict], criterion, fine_tuning: Optional[str] = None,
                                     next_update: Optional[int] = None) -> None:
        """Called on every worker when training starts from a checkpoint. ``fine_tuning``: the
        option that restarts the training (a fresh counter, unless --agg-keep-counter);
        ``next_update``: the trainer's first update from here."""
        counter_state = state.get("counter") if state else self.__dict__.pop("_agg_legacy_counter", None)
        if counter_state is None:
            return
        next_update = next_update or int(counter_state["num_updates"]) + 1
        keep = getattr(self.agg_options, "agg_keep_counter", False)
        saved_updates = int(counter_state["num_updates"])
        if fine_tuning and not keep:
            logger.info(
                f"{fine_tuning}: a new training from the checkpoint, with a fresh AGG token counter from update "
                f"{next_update} on (--agg-keep-counter would continue the checkpoint's, {saved_updates} updates)"
            )
        else:
            if fine_tuning:
                logger.info(
                    f"--agg-keep-counter: the new training ({fine_tuning}) continues the checkpoint's AGG token "
                    f"counter ({saved_updates} updates)"
                )
            # Every AGG option takes this run's value, defaults included: the window (until the
            # training iterator sets the default, one epoch) and --agg-static-after too.
            self.agg_counter.load_state_dict(  # refuses a counter of another dictionary
                {**counter_state, "window": self.agg_counter.window, "freeze_after": self.agg_counter.freeze_after}
            )
        if hasattr(criterion, "agg_options"):
            self._agg_options_to_compare = ((state or {}).get("options"), counter_state.get("window"),
                                            criterion.agg_options(), next_update)
            self._log_changed_options()

    def _log_changed_options(self) -> None:
        """Once the window is known (the default one, from the training iterator), each AGG option
        whose value differs from the checkpoint's, as ``--name old -> new``."""
        if self._agg_options_to_compare is None or self.agg_counter.window is None:
            return
        saved, saved_window, now, next_update = self._agg_options_to_compare
        self._agg_options_to_compare = None
        changes = []
        if saved is not None:
            for name, value in now.items():
                if name != "agg_window" and name in saved and saved[name] != value:
                    changes.append(f"--{name.replace('_', '-')} {saved[name]} -> {value}")
        window = self.agg_counter.window
        if saved_window != window:
            default = "" if self._agg_window_from_option else " (one epoch, the default)"
            changes.append(f"--agg-window {saved_window} -> {window}{default}")
        if changes:
            logger.warning(
                "AGG options differ from the checkpoint's: " + "; ".join(changes)
                + f" (the new values apply from update {next_update} on)"
            )

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
            weight = output_embedding(model)
            if weight is not None:
                logging_output["isotropy"] = isotropy(weight, signs="both")  # sign-independent I(W)
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
            raise AggConfigError(
                "--agg-study freeze cannot hold rows fixed while the optimizer keeps fp32 master "
                "weights (--fp16, --bf16); train the study in fp32 or with --memory-efficient-fp16 "
                "or --memory-efficient-bf16"
            )
        decoder = unwrap(model).decoder
        weights = (decoder.embed_tokens.weight, decoder.output_projection.weight)
        return list({id(w): w for w in weights}.values())


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
