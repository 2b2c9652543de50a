"""``AggTrainer``: Adaptive Gradient Gating in a Hugging Face ``transformers.Trainer``.

The few lines a user changes::

    from fairseq_agg.hf import AggTrainer
    trainer = AggTrainer(model=model, args=training_args, train_dataset=train, agg_alpha=0.03)
    trainer.train()

How it works (nothing of the model is patched for longer than one forward call):

* **Loss.** ``compute_loss`` calls the (possibly DDP/accelerate-wrapped) model without labels,
  with the output head's ``forward`` replaced for that call by the AGG loss: the head receives
  exactly the hidden states it would project, and instead of the (batch x length x vocabulary)
  logits it computes ``AdaptiveGradientGating.loss`` on them (labels shifted for a causal LM,
  -100 ignored; the logits are never built, with ``agg_chunk_size`` not even inside the loss).
  Going through the wrapped model's own forward keeps DDP's gradient reduction (including
  ``find_unused_parameters``), accelerate's autocast and activation checkpointing as they are.
* **Normalization.** The summed loss is divided by the number of labels of the whole optimizer
  update (all micro-batches, and all processes when ``average_tokens_across_devices``), so
  gradient accumulation and data parallelism give the gradient of one big batch.
* **Counter.** Labels of training micro-batches are counted into the pending update; a callback
  commits it (summed over processes) once per optimizer step, right after the step, and throws
  it away when the step was skipped (fp16 overflow). ``evaluate()`` / ``predict()`` run under
  ``torch.no_grad()`` with the model in eval mode and never count. The window defaults to one
  epoch of optimizer steps (the paper's K).
* **Checkpoints.** Every Trainer checkpoint holds the counter in ``agg_counter.pt``;
  ``train(resume_from_checkpoint=...)`` restores it.
* **Logging.** ``agg_rare`` (the rare-group size, averaged over the updates since the last log)
  joins the Trainer's training logs, so TensorBoard, W&B etc. see it.
* **Label smoothing.** ``TrainingArguments.label_smoothing_factor``, with the Trainer's own
  definition (that of ``F.cross_entropy(label_smoothing=...)``).
"""

import contextlib
import logging
import os
from dataclasses import dataclass, field, fields
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from fairseq_agg.errors import AggConfigError
from fairseq_agg.modeling import unwrap
from fairseq_agg.training import AdaptiveGradientGating, check_options

logger = logging.getLogger(__name__)

__all__ = ["AggArguments", "AggTrainer", "AGG_COUNTER_NAME", "output_head"]

AGG_COUNTER_NAME = "agg_counter.pt"
IGNORE_INDEX = -100

# Config attributes by which a model transforms the head's output before it becomes the logits:
# AGG's loss on the head's input would not be the model's loss.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_logit_scale")

for _method in ("_get_num_items_in_batch", "set_initial_training_values", "_save_checkpoint"):
    if not hasattr(Trainer, _method):  # pragma: no cover - depends on the installed version
        raise ImportError(
            f"fairseq_agg.hf needs transformers >= 5.0 (Trainer.{_method} is missing); "
            f"run: pip install -U 'transformers>=5.0' accelerate"
        )


@dataclass
class AggArguments:
    """AGG's options; parse them next to ``TrainingArguments`` with ``HfArgumentParser``.
    Label smoothing comes from ``TrainingArguments.label_smoothing_factor``."""

    agg_alpha: float = field(
        default=0.03,
        metadata={"help": "token k is rare when its average count per update over the window is below alpha; in (0, 1]"},
    )
    agg_window: Optional[int] = field(
        default=None,
        metadata={"help": "K, the number of past optimizer steps the token counter remembers (default: one epoch)"},
    )
    agg_nspecial: int = field(default=0, metadata={"help": "the first N token ids are never rare"})
    agg_no_g1: bool = field(default=False, metadata={"help": "ablation: do not gate part (b) (gate g1 = 1)"})
    agg_no_g2: bool = field(default=False, metadata={"help": "ablation: do not gate part (c) (gate g2 = 1)"})
    agg_static_after: Optional[int] = field(
        default=None, metadata={"help": "ablation: freeze the rare group and its gates after this many steps"}
    )
    agg_chunk_size: Optional[int] = field(
        default=None,
        metadata={"help": "compute the loss over chunks of this many positions (never all logits at once); "
                          "0: one pass; default: picked by shape (256 positions or more)"},
    )

    def __post_init__(self):
        check_options(
            alpha=self.agg_alpha, window=self.agg_window, nspecial=self.agg_nspecial,
            static_after=self.agg_static_after, chunk_size=self.agg_chunk_size,
        )


_AGG_FIELDS = frozenset(f.name for f in fields(AggArguments))


def output_head(model: nn.Module) -> nn.Linear:
    """The model's output head, refusing models that AGG's loss cannot serve (one line each)."""
    model = unwrap(model)
    name = type(model).__name__
    getter = getattr(model, "get_output_embeddings", None)
    head = None
    if callable(getter):
        try:
            head = getter()
        except (AttributeError, NotImplementedError):
            head = None
    if head is None:
        raise AggConfigError(
            f"AggTrainer needs a causal language model with an output head, but "
            f"{name}.get_output_embeddings() returns none (use a *ForCausalLM model)"
        )
    if not isinstance(head, nn.Linear):
        raise AggConfigError(
            f"AggTrainer needs the output head to be an nn.Linear, but {name}'s is a {type(head).__name__}"
        )
    if head.bias is not None:
        raise AggConfigError(
            f"AggTrainer needs a bias-free output head (logits = h W^T), but {name}'s output head has a bias"
        )
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise AggConfigError(f"AggTrainer trains causal (decoder-only) language models; {name} is an encoder-decoder")
    for attr in _LOGIT_TRANSFORMS:
        value = getattr(config, attr, None)
        if value is None or (attr == "final_logit_softcapping" and not value) or (attr != "final_logit_softcapping" and value == 1):
            continue
        raise AggConfigError(
            f"AggTrainer computes the loss from the output head's logits, but {name} transforms them "
            f"afterwards (config.{attr} = {value})"
        )
    return head


@contextlib.contextmanager
def _head_replaced(head: nn.Module, forward):
    """``head.forward`` is ``forward`` inside the block (module hooks still run around it)."""
    had_own = "forward" in head.__dict__
    saved = head.__dict__.get("forward")
    head.forward = forward
    try:
        yield
    finally:
        if had_own:
            head.forward = saved
        else:
            del head.forward


class _AggCallback(TrainerCallback):
    """Closes the counter's update once per optimizer step."""

    def __init__(self, trainer: "AggTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.agg.discard_pending()

    def on_step_begin(self, args, state, control, **kwargs):
        # A new optimizer update begins: nothing pending may come from elsewhere.
        self.trainer.agg.discard_pending()

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        trainer._agg_rare_sum += trainer.agg.num_rare  # the gates this update used
        trainer._agg_rare_updates += 1
        if getattr(trainer.accelerator, "optimizer_step_was_skipped", False):
            trainer.agg.discard_pending()  # its gradients were thrown away (fp16 overflow)
        else:
            trainer.agg.step()


class AggTrainer(Trainer):
    """``transformers.Trainer`` whose loss is AGG's (Yu et al., ACL 2022).

    Takes every ``Trainer`` argument plus the AGG options, either as ``agg_args=AggArguments(...)``
    or as keyword arguments of the same names (``agg_alpha=0.03``, ``agg_window``,
    ``agg_nspecial``, ``agg_no_g1``, ``agg_no_g2``, ``agg_static_after``, ``agg_chunk_size``).
    The model must be a causal LM whose ``get_output_embeddings()`` is a bias-free ``nn.Linear``
    (tied or untied). ``self.agg`` is the :class:`~fairseq_agg.training.AdaptiveGradientGating`.
    """

    # compute_loss normalizes by the labels of the whole update (see _agg_normalizer).
    loss_is_scaled_for_ga = True

    def __init__(self, *args, agg_args: Optional[AggArguments] = None, **kwargs):
        agg_kwargs = {name: kwargs.pop(name) for name in list(kwargs) if name in _AGG_FIELDS}
        if agg_args is not None and agg_kwargs:
            raise AggConfigError(
                f"pass AGG options either as agg_args or as keyword arguments, not both (got agg_args and "
                f"{', '.join(sorted(agg_kwargs))})"
            )
        if agg_args is None:
            agg_args = AggArguments(**agg_kwargs)
        model = kwargs.get("model", args[0] if args else None)
        if model is not None:
            output_head(model)  # refuse before the Trainer builds anything
        if kwargs.get("compute_loss_func") is not None:
            raise AggConfigError("AggTrainer computes the loss itself; do not pass compute_loss_func")
        super().__init__(*args, **kwargs)
        head = output_head(self.model)
        if self.args.n_gpu > 1:
            raise AggConfigError(
                "AggTrainer does not support torch.nn.DataParallel (several GPUs in one process); "
                "launch one process per GPU with torchrun or accelerate launch"
            )
        self.agg_args = agg_args
        self.agg = AdaptiveGradientGating(
            head.weight.size(0),
            alpha=agg_args.agg_alpha,
            window=agg_args.agg_window,
            nspecial=agg_args.agg_nspecial,
            label_smoothing=self.args.label_smoothing_factor,
            no_g1=agg_args.agg_no_g1,
            no_g2=agg_args.agg_no_g2,
            static_after=agg_args.agg_static_after,
            chunk_size=agg_args.agg_chunk_size,
        )
        # The stock loss paths must not rescale ours (transformers versions without
        # loss_is_scaled_for_ga read this flag instead).
        self.model_accepts_loss_kwargs = True
        self.label_smoother = None
        self._agg_rare_sum = 0
        self._agg_rare_updates = 0
        self.add_callback(_AggCallback(self))

    # -- the loss -----------------------------------------------------------------------
    def _get_num_items_in_batch(self, batch_samples, device):
        """Labels that count in the loss (shifted), over all micro-batches of the update and,
        with ``average_tokens_across_devices``, over all processes."""
        if not batch_samples or not all(
            isinstance(b, dict) and ("labels" in b or "shift_labels" in b) for b in batch_samples
        ):
            return None
        count = sum(_aligned_labels(b).ne(IGNORE_INDEX).sum() for b in batch_samples)
        count = torch.as_tensor(count, device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count.reshape(1)).sum()
        return count

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        shift_labels = inputs.pop("shift_labels", None)
        if labels is None and shift_labels is None:
            raise AggConfigError("AggTrainer needs labels in every batch (e.g. DataCollatorForLanguageModeling(mlm=False))")
        head = output_head(model)
        # Counting follows the model's mode: training_step puts it in train mode, evaluation in eval.
        self.agg.train(model.training)
        slot = {}

        def agg_head(hidden):
            if "loss" in slot:
                raise AggConfigError("AggTrainer: the model called its output head twice in one forward pass")
            if shift_labels is not None:
                h, y = hidden, shift_labels
            else:
                h, y = hidden[..., :-1, :], labels[..., 1:]
            if tuple(h.shape[:-1]) != tuple(y.shape):
                raise AggConfigError(
                    f"AggTrainer: the output head received hidden states of shape {tuple(hidden.shape)}, "
                    f"which do not align with labels of shape {tuple((labels if shift_labels is None else shift_labels).shape)}"
                )
            slot["loss"] = self.agg.loss(h, head.weight, y, reduction="sum")
            if return_outputs:
                return F.linear(hidden, head.weight)  # the caller asked for the logits
            # In place of the logits: a stand-in connected to the loss, so that DDP's search for
            # unused parameters (which starts from the outputs) finds every parameter it used.
            return slot["loss"].reshape((1,) * hidden.dim()).expand(*hidden.shape[:-1], 1)

        with _head_replaced(head, agg_head):
            outputs = model(**inputs)
        if "loss" not in slot:
            raise AggConfigError(f"AggTrainer: {type(unwrap(model)).__name__} did not call its output head")
        total = slot["loss"]
        if num_items_in_batch is None:
            local = _aligned_labels({"labels": labels, "shift_labels": shift_labels}).ne(IGNORE_INDEX).sum()
            loss = total / local.clamp(min=1).to(total.device)
        else:
            count = num_items_in_batch.to(total.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
            loss = total / count
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                # DDP averages gradients over processes; the count already covers all of them.
                loss = loss * self.accelerator.num_processes
        if return_outputs:
            if isinstance(outputs, dict):
                outputs["loss"] = loss
            return loss, outputs
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        has_labels = len(self.label_names) > 0 and all(inputs.get(k) is not None for k in self.label_names)
        if not (prediction_loss_only and has_labels):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        # The loss alone: never build the logits.
        inputs = self._prepare_inputs(inputs)
        num_items_in_batch = self._get_num_items_in_batch([inputs], self.args.device)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        return loss.detach().mean(), None, None

    # -- the window, logging and checkpoints -----------------------------------------------------
    def set_initial_training_values(self, args, dataloader):
        values = super().set_initial_training_values(args, dataloader)
        if self.agg.window is None:
            steps_per_epoch = max(1, int(values[1]))
            self.agg.set_window(steps_per_epoch)
            logger.info(f"AGG token counter window K = {steps_per_epoch} optimizer steps (one epoch)")
        return values

    def log(self, logs, *args, **kwargs):
        if "loss" in logs and self._agg_rare_updates > 0:
            logs = {**logs, "agg_rare": self._agg_rare_sum / self._agg_rare_updates}
            self._agg_rare_sum, self._agg_rare_updates = 0, 0
        return super().log(logs, *args, **kwargs)

    def _save_checkpoint(self, model, trial, *args, **kwargs):
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            os.makedirs(folder, exist_ok=True)
            torch.save(self.agg.state_dict(), os.path.join(folder, AGG_COUNTER_NAME))
        return super()._save_checkpoint(model, trial, *args, **kwargs)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        checkpoint = resume_from_checkpoint
        if isinstance(checkpoint, bool):
            checkpoint = get_last_checkpoint(self.args.output_dir) if checkpoint else None
        if checkpoint is not None:
            self.load_agg_counter(checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def load_agg_counter(self, checkpoint: str) -> None:
        """Restores the token counter saved in a Trainer checkpoint folder."""
        path = os.path.join(checkpoint, AGG_COUNTER_NAME)
        if not os.path.isfile(path):
            logger.warning(f"{checkpoint} holds no AGG token counter ({AGG_COUNTER_NAME}): the counter starts empty")
            return
        self.agg.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))


def _aligned_labels(batch) -> torch.Tensor:
    shift_labels = batch.get("shift_labels")
    if shift_labels is not None:
        return shift_labels
    return batch["labels"][..., 1:]
