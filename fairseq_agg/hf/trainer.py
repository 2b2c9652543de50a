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
* **The model's own loss** (``agg_output_layer``, default ``auto``). At the first training step the
  model is also called once with the labels (one example, no gradient, the same mode, the RNG
  forked so training's random stream is untouched). Where its own loss is plain cross-entropy on
  its output head, the fused loss above serves it. Where it is more (an auxiliary loss such as a
  Mixtral's router loss, logits scaled or soft-capped after the head, the last read from the
  config before training), the gated output layer does
  (:class:`~fairseq_agg.training.GatedOutputLayer`): the model computes its own loss from full
  logits, exactly as under the stock ``Trainer``, and AGG gates only the gradient that the head's
  weight receives through the logits. ``agg_output_layer="fused"`` refuses such a model in one line
  naming both values instead; ``"gated"`` always uses the gated layer.
* **Checkpoints.** Every Trainer checkpoint holds the counter and the AGG options in
  ``agg_counter.pt``; ``train(resume_from_checkpoint=...)`` restores the counter. On resume every
  AGG option takes the value of the current arguments, defaults included (the window's default
  being one epoch of optimizer steps); each option whose value differs from the checkpoint's is
  logged once as ``name old -> new``.
* **Logging.** ``agg_rare`` (the rare-group size, averaged over the updates since the last log)
  joins the Trainer's training logs, so TensorBoard, W&B etc. see it.
* **Label smoothing.** ``TrainingArguments.label_smoothing_factor``, with the Trainer's own
  definition (that of ``F.cross_entropy(label_smoothing=...)``).
"""

import contextlib
import logging
import math
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
from fairseq_agg.training import AdaptiveGradientGating, causal_targets, check_options

logger = logging.getLogger(__name__)

__all__ = ["AggArguments", "AggTrainer", "AGG_COUNTER_NAME", "output_head"]

AGG_COUNTER_NAME = "agg_counter.pt"
AGG_OPTIONS_KEY = "agg_options"  # beside the counter state in agg_counter.pt
IGNORE_INDEX = -100
# How far the model's own loss may lie from cross-entropy on its head and still be that loss:
# float32 rounding of a mean is ~1e-7 of it, while a Mixtral's router loss at its default weight
# (0.001) adds ~5e-4.
MODEL_LOSS_RTOL = 1e-4

# Config attributes by which a model transforms the head's output before it becomes the logits:
# AGG's loss on the head's input would not be the model's loss, and the first-step check may not
# see it (soft-capping barely moves the small logits of a fresh model), so such models are served
# by the gated output layer from the start.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_logit_scale")
OUTPUT_LAYERS = ("auto", "fused", "gated")

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
    agg_output_layer: str = field(
        default="auto",
        metadata={"help": "fused: AGG's loss in place of the head (no full logits), refusing a model whose own "
                          "loss is more than cross-entropy on its head; gated: the model's own loss on full logits, "
                          "W's gradient through them gated (GatedOutputLayer); auto: fused where the model's own "
                          "loss is cross-entropy on its head (checked at the first step), gated elsewhere",
                  "choices": list(OUTPUT_LAYERS)},
    )

    def __post_init__(self):
        check_options(
            alpha=self.agg_alpha, window=self.agg_window, nspecial=self.agg_nspecial,
            static_after=self.agg_static_after, chunk_size=self.agg_chunk_size,
        )
        if self.agg_output_layer not in OUTPUT_LAYERS:
            raise AggConfigError(
                f"AGG output_layer must be one of {', '.join(OUTPUT_LAYERS)}, got {self.agg_output_layer!r}"
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
    return head


def logit_transform(model: nn.Module) -> Optional[str]:
    """``config.<attr> = <value>`` for a model that transforms its head's output before the
    loss (soft-capping, a logit scale), else None."""
    config = getattr(unwrap(model), "config", None)
    for attr in _LOGIT_TRANSFORMS:
        value = getattr(config, attr, None)
        if value is None or (attr == "final_logit_softcapping" and not value) or (attr != "final_logit_softcapping" and value == 1):
            continue
        return f"config.{attr} = {value}"
    return None


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
        # What the stock loss paths need when the model computes its own loss (the gated layer).
        self._stock_loss_settings = (self.loss_is_scaled_for_ga, self.model_accepts_loss_kwargs, self.label_smoother)
        # The stock loss paths must not rescale ours (transformers versions without
        # loss_is_scaled_for_ga read this flag instead).
        self.model_accepts_loss_kwargs = True
        self.label_smoother = None
        self.agg_output_layer = None  # "fused" or "gated", once decided
        transform = logit_transform(self.model)
        if agg_args.agg_output_layer == "gated" or (agg_args.agg_output_layer == "auto" and transform):
            self._use_output_layer("gated", transform and f"{type(unwrap(self.model)).__name__} has {transform}")
        elif agg_args.agg_output_layer == "fused" and transform:
            raise AggConfigError(
                f"AggTrainer: {type(unwrap(self.model)).__name__} transforms its logits after the head ({transform}), "
                f"which AGG's fused loss would drop; use agg_output_layer='gated' (or 'auto')"
            )
        self._agg_rare_sum = 0
        self._agg_rare_updates = 0
        self.model_loss_check = None  # (model's own loss, cross-entropy on its head), once measured
        self._agg_options_resumed = None  # the options of the checkpoint being resumed
        self.add_callback(_AggCallback(self))

    def _agg_head(self, model: nn.Module) -> nn.Linear:
        """The model's output head, refusing one resized after the counter was sized to it."""
        head = output_head(model)
        if head.weight.size(0) != self.agg.vocab_size:
            raise AggConfigError(
                f"AggTrainer: the model's output layer has {head.weight.size(0)} rows but had {self.agg.vocab_size} "
                f"when AggTrainer was built: it was resized (resize_token_embeddings) after AggTrainer was built; "
                f"resize the model first, then build AggTrainer"
            )
        return head

    # -- the model's own loss -----------------------------------------------------------------
    def model_loss_is_head_cross_entropy(self, model: nn.Module, inputs: dict) -> bool:
        """Whether the model's own loss on ``inputs`` (the model called with the labels) is plain
        cross-entropy on its output head's logits: the loss that AGG's replaces (label smoothing
        aside). Both values come from one forward pass (so dropout draws match) without gradients,
        in the model's current mode, with the RNG forked so that training's random stream is
        untouched; they are kept in ``self.model_loss_check``."""
        model = unwrap(model)
        head = self._agg_head(model)
        labels, shift_labels = inputs.get("labels"), inputs.get("shift_labels")
        measured = {}

        def projecting_head(hidden):
            logits = F.linear(hidden, head.weight)
            if "head" not in measured:
                z, y = (logits, shift_labels) if shift_labels is not None else (logits[..., :-1, :], labels[..., 1:])
                z = z.reshape(-1, z.size(-1)).to(torch.promote_types(z.dtype, torch.float32))
                measured["head"] = float(F.cross_entropy(z, y.reshape(-1), ignore_index=IGNORE_INDEX))
            return logits

        # The model computes its own loss only when given labels.
        own_inputs = {**inputs, "labels": labels if labels is not None else shift_labels}
        device = head.weight.device
        accelerator = device.type != "cpu"  # the CPU's RNG is always forked
        rng = torch.random.fork_rng([device] if accelerator else [], device_type=device.type if accelerator else None)
        with torch.no_grad(), rng, _head_replaced(head, projecting_head):
            outputs = model(**own_inputs)
        own = outputs.get("loss") if isinstance(outputs, dict) else getattr(outputs, "loss", None)
        if own is None or "head" not in measured:
            logger.warning(f"AggTrainer: {type(model).__name__} returned no loss for labelled inputs; its own loss "
                           f"could not be compared with AGG's")
            return True
        self.model_loss_check = (float(own), measured["head"])
        return math.isclose(*self.model_loss_check, rel_tol=MODEL_LOSS_RTOL, abs_tol=1e-6)

    def _choose_output_layer(self, model: nn.Module, inputs: dict) -> None:
        """At the first labelled training batch: the fused loss where the model's own loss is
        cross-entropy on its head; otherwise the gated output layer (``auto``) or a refusal
        (``fused``)."""
        example = _one_labelled_example(inputs)
        if example is None:
            return  # every label ignored: the next batch is checked
        if self.model_loss_is_head_cross_entropy(model, example):
            self._use_output_layer("fused")
            return
        own, head = self.model_loss_check
        name = type(unwrap(model)).__name__
        if self.agg_args.agg_output_layer == "fused":
            raise AggConfigError(
                f"AggTrainer: {name}'s own loss on a training example is {own:.6g} but cross-entropy on its output "
                f"head is {head:.6g}, the loss AGG's fused loss trains with: the model adds to or transforms its "
                f"logits' loss (an auxiliary loss such as a router loss, or logits scaled after the head), which the "
                f"fused loss would drop; use agg_output_layer='gated' (or 'auto'), which keeps the model's own loss"
            )
        self._use_output_layer("gated", f"{name}'s own loss on a training example is {own:.6g} where "
                                        f"cross-entropy on its output head is {head:.6g}")

    def _use_output_layer(self, kind: str, why: Optional[str] = None) -> None:
        self.agg_output_layer = kind
        if kind == "gated":
            # The model's own loss, normalized and scaled exactly as the stock Trainer does.
            self.loss_is_scaled_for_ga, self.model_accepts_loss_kwargs, self.label_smoother = self._stock_loss_settings
            if why:
                logger.info(f"AggTrainer: {why}; the model computes its own loss from full logits and AGG gates the "
                            f"gradient its output layer's weight receives through them (agg_output_layer='gated')")

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
        if inputs.get("labels") is None and inputs.get("shift_labels") is None:
            raise AggConfigError("AggTrainer needs labels in every batch (e.g. DataCollatorForLanguageModeling(mlm=False))")
        if model.training and self.agg_output_layer is None:
            self._choose_output_layer(model, {k: v for k, v in inputs.items() if v is not None})
        if self.agg_output_layer == "gated":
            return self._gated_compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        shift_labels = inputs.pop("shift_labels", None)
        head = self._agg_head(model)
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

    def _gated_compute_loss(self, model, inputs, return_outputs, num_items_in_batch):
        """The stock Trainer's loss (the model's own, from full logits) with the head's forward
        replaced, for this call, by the gated output layer's."""
        head = self._agg_head(model)
        self.agg.train(model.training)
        shift_labels = inputs.get("shift_labels")
        targets = shift_labels if shift_labels is not None else causal_targets(inputs["labels"], IGNORE_INDEX)

        def gated_head(hidden):
            if model.training and torch.is_grad_enabled():
                return self.agg._gated_logits(hidden, head.weight)
            return F.linear(hidden, head.weight)

        with self.agg.targets(targets), _head_replaced(head, gated_head):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        has_labels = len(self.label_names) > 0 and all(inputs.get(k) is not None for k in self.label_names)
        if not (prediction_loss_only and has_labels) or self.agg_output_layer == "gated":
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
        # Fresh or resumed, the window is the current argument's, or one epoch of this run.
        window = self.agg_args.agg_window
        if window is None:
            window = max(1, int(values[1]))
            logger.info(f"AGG token counter window K = {window} optimizer steps (one epoch)")
        self.agg.set_window(window)
        self._log_changed_agg_options()
        return values

    def agg_options(self) -> dict:
        """The AGG options in force (the window as the counter holds it), saved with every checkpoint."""
        options = {f.name: getattr(self.agg_args, f.name) for f in fields(AggArguments)}
        options["agg_window"] = self.agg.window
        return options

    def _log_changed_agg_options(self) -> None:
        saved, self._agg_options_resumed = self._agg_options_resumed, None
        if saved is None:
            return
        changes = [f"{name} {saved[name]} -> {value}" for name, value in self.agg_options().items()
                   if name in saved and saved[name] != value]
        if changes:
            logger.warning("AGG options differ from the checkpoint's: " + "; ".join(changes)
                           + " (the current values apply)")

    def log(self, logs, *args, **kwargs):
        if "loss" in logs and self._agg_rare_updates > 0:
            logs = {**logs, "agg_rare": self._agg_rare_sum / self._agg_rare_updates}
            self._agg_rare_sum, self._agg_rare_updates = 0, 0
        return super().log(logs, *args, **kwargs)

    def _save_checkpoint(self, model, trial, *args, **kwargs):
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            os.makedirs(folder, exist_ok=True)
            state = {**self.agg.state_dict(), AGG_OPTIONS_KEY: self.agg_options()}
            torch.save(state, os.path.join(folder, AGG_COUNTER_NAME))
        return super()._save_checkpoint(model, trial, *args, **kwargs)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        self._agg_head(self.model)  # before any long work
        checkpoint = resume_from_checkpoint
        if isinstance(checkpoint, bool):
            checkpoint = get_last_checkpoint(self.args.output_dir) if checkpoint else None
        if checkpoint is not None:
            self.load_agg_counter(checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def load_agg_counter(self, checkpoint: str) -> None:
        """Restores the token counter saved in a Trainer checkpoint folder; the options stay the
        current arguments' (the changed ones are logged when training starts)."""
        path = os.path.join(checkpoint, AGG_COUNTER_NAME)
        if not os.path.isfile(path):
            logger.warning(f"{checkpoint} holds no AGG token counter ({AGG_COUNTER_NAME}): the counter starts empty")
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved_options = state.pop(AGG_OPTIONS_KEY, None) or {}
        self.agg.load_state_dict(state)
        counter = state.get("_extra_state", state)
        # Files written before the options were saved: the two that the counter itself kept.
        self._agg_options_resumed = {"agg_window": counter.get("window"), "agg_static_after": counter.get("freeze_after"),
                                     **saved_options}
        self.agg.counter.freeze_after = self.agg_args.agg_static_after


def _one_labelled_example(inputs: dict) -> Optional[dict]:
    """``inputs`` cut to their first example with a counted label (None without one), so that
    the loss check's forward builds one sequence's logits whatever the batch size."""
    counted = _aligned_labels(inputs).ne(IGNORE_INDEX)
    if counted.dim() < 2:
        return dict(inputs) if bool(counted.any()) else None
    rows = counted.flatten(1).any(1).nonzero()
    if rows.numel() == 0:
        return None
    row, batch = int(rows[0]), counted.size(0)
    return {k: v[row : row + 1] if torch.is_tensor(v) and v.dim() > 0 and v.size(0) == batch else v
            for k, v in inputs.items()}


def _aligned_labels(batch) -> torch.Tensor:
    shift_labels = batch.get("shift_labels")
    if shift_labels is not None:
        return shift_labels
    return batch["labels"][..., 1:]
