"""Adaptive Gradient Gating for any PyTorch training loop (no fairseq, no transformers).

::

    from fairseq_agg.training import AdaptiveGradientGating

    agg = AdaptiveGradientGating(vocab_size, alpha=0.03)
    for batch in loader:                      # (gradient accumulation: several loss() calls)
        hidden = model.features(batch.x)      # (..., d): the input of the output layer
        loss = agg.loss(hidden, model.lm_head.weight, batch.y)   # y aligned with hidden, -100 ignored
        loss.backward()
        optimizer.step(); optimizer.zero_grad()
        agg.step()                            # closes the update: commits (and all-reduces) the counts

``loss`` returns the cross-entropy of ``hidden @ weight.T`` (label smoothing as
``torch.nn.functional.cross_entropy(..., label_smoothing=eps)`` and Hugging Face's Trainer
define it), the same value and the same gradient for ``hidden`` and everything below it; only
the gradient that ``weight`` receives through this output projection is gated, exactly as the
fairseq criterion ``agg_cross_entropy`` gates it (docs/semantics.md). The math is
:func:`fairseq_agg.core.gated_loss`; the counter is :class:`fairseq_agg.core.TokenCounter`.

Counting: every ``loss`` call under grad mode on a module in training mode (``agg.train()``,
the default) adds its non-ignored labels to the pending update; under ``torch.no_grad()`` or
after ``agg.eval()`` nothing is counted. ``step`` closes one optimizer update: with
``torch.distributed`` initialized it sums the pending counts over the default process group, so
every rank holds the same counter and computes the same gates. The gates used by ``loss``
depend only on completed updates.

Misuse is reported once per instance as an :class:`AggUsageWarning`: ``step`` without a counted
``loss`` call since the previous ``step`` (an empty update: averages fall, more tokens turn rare;
an update whose labels are all ``ignore_index`` is not empty, its ``loss`` was called), and a
``loss`` call after an optimizer step that no ``agg.step()`` followed (the gates would never
move; any ``torch.optim`` optimizer's step is seen, so gradient accumulation never triggers it).
``state_dict`` holds the open update's counts too, so a checkpoint taken mid-accumulation resumes
exactly (with several processes each rank restores only the counts it saved itself).

``hidden`` and ``weight`` must have one dtype; under ``torch.autocast`` both are cast to
autocast's dtype first, as ``nn.Linear`` would be.
"""

import contextlib
import warnings
from collections import OrderedDict
from typing import Optional, Tuple

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from fairseq_agg import core, parallel
from fairseq_agg.errors import AggConfigError

__all__ = ["AdaptiveGradientGating", "AggUsageWarning", "GatedOutputLayer", "causal_targets", "check_options"]

_REDUCTIONS = ("mean", "sum")
# A loop without a torch.optim optimizer cannot be watched: so many loss() calls in one update
# before the first step() means step() is missing.
LOSS_CALLS_BEFORE_A_FIRST_STEP = 1000


class AggUsageWarning(UserWarning):
    """A call sequence that trains with wrong gates (given once per AdaptiveGradientGating)."""


class _OptimizerSteps:
    """Steps taken by every ``torch.optim`` optimizer of this process (one global post-step
    hook): how ``loss`` tells gradient accumulation from a forgotten ``agg.step()``."""

    count = 0
    _hook = None

    @classmethod
    def watch(cls) -> None:
        if cls._hook is None:
            cls._hook = register_optimizer_step_post_hook(cls._count)

    @classmethod
    def _count(cls, optimizer, args, kwargs) -> None:
        cls.count += 1


def _check_positive(name: str, value: Optional[int], what: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AggConfigError(f"AGG {name} must be a positive number of {what} (or None), got {value!r}")


def check_options(
    alpha: float = 0.03,
    window: Optional[int] = None,
    nspecial: int = 0,
    label_smoothing: float = 0.0,
    static_after: Optional[int] = None,
    chunk_size: Optional[int] = None,
) -> None:
    """Refuses AGG options outside their range with one :class:`AggConfigError` line."""
    try:
        alpha_ok = not isinstance(alpha, bool) and 0.0 < float(alpha) <= 1.0
    except (TypeError, ValueError):
        alpha_ok = False
    if not alpha_ok:
        raise AggConfigError(f"AGG alpha must lie in (0, 1], got {alpha!r}")
    _check_positive("window", window, "updates")
    _check_positive("static_after", static_after, "updates")
    if isinstance(nspecial, bool) or not isinstance(nspecial, int) or nspecial < 0:
        raise AggConfigError(f"AGG nspecial must be an integer >= 0, got {nspecial!r}")
    try:
        smoothing_ok = not isinstance(label_smoothing, bool) and 0.0 <= float(label_smoothing) < 1.0
    except (TypeError, ValueError):
        smoothing_ok = False
    if not smoothing_ok:
        raise AggConfigError(f"AGG label_smoothing must lie in [0, 1), got {label_smoothing!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 0):
        raise AggConfigError(
            f"AGG chunk_size must be None (picked by shape) or an integer >= 0 (0: one logits tensor), got {chunk_size!r}"
        )


def _sum_over_processes(pending: torch.Tensor) -> torch.Tensor:
    """Sums ``pending`` over the default process group (a no-op without one)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return pending
    tensor = pending
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        # A rank that never counted holds its counter on the CPU; NCCL needs a CUDA tensor.
        tensor = tensor.to(torch.device("cuda", torch.cuda.current_device()))
    else:
        tensor = tensor.clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.to(pending.device)


def _process_rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _autocast_operands(hidden: torch.Tensor, weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The operands ``nn.Linear`` would multiply: under ``torch.autocast``, cast to its dtype
    (float64 stays, as autocast leaves it); the loss itself then runs with autocast off."""
    device_type = hidden.device.type
    if not torch.is_autocast_enabled(device_type):
        return hidden, weight
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        return t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t

    return cast(hidden), cast(weight)


class AdaptiveGradientGating(nn.Module):
    """The AGG loss and its token counter for a plain PyTorch loop.

    Args:
        vocab_size: rows of the output embedding (the model's vocabulary, padding rows included).
        alpha: token k is rare when its average count per update over the window is below alpha;
            in (0, 1].
        window: K, the number of completed updates the counter remembers; None: unbounded until
            :meth:`set_window` (the paper's K is one epoch of updates).
        nspecial: the first ``nspecial`` ids are never rare (fairseq's bos, pad, eos, unk).
        ignore_index: label value that is neither a target nor counted (default -100).
        label_smoothing: epsilon as in ``F.cross_entropy(label_smoothing=...)``, in [0, 1).
        no_g1: ablation: gate g1 held at 1 (part (b) not gated).
        no_g2: ablation: gate g2 held at 1 (part (c) not gated).
        static_after: ablation: the rare group and its gates stop changing after this many updates.
        chunk_size: > 0: the output layer and loss run over chunks of this many positions, so the
            (positions x vocabulary) logits are never held at once; 0: one logits tensor; None
            (default): chunks picked by shape (``core.auto_chunk_rows``: 256 positions or more),
            leaner and measured not slower than one logits tensor (docs/performance.md).
    """

    def __init__(
        self,
        vocab_size: int,
        alpha: float = 0.03,
        window: Optional[int] = None,
        nspecial: int = 0,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        no_g1: bool = False,
        no_g2: bool = False,
        static_after: Optional[int] = None,
        chunk_size: Optional[int] = None,
    ):
        super().__init__()
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
            raise AggConfigError(f"AGG vocab_size must be an integer >= 2, got {vocab_size!r}")
        check_options(alpha=alpha, window=window, nspecial=nspecial, label_smoothing=label_smoothing,
                      static_after=static_after, chunk_size=chunk_size)
        if nspecial >= vocab_size:
            raise AggConfigError(f"AGG nspecial must be smaller than vocab_size={vocab_size}, got {nspecial}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int) or 0 <= ignore_index < vocab_size:
            raise AggConfigError(
                f"AGG ignore_index must be an integer outside the vocabulary [0, {vocab_size}) (such as -100), "
                f"got {ignore_index!r}"
            )
        self.vocab_size = vocab_size
        self.alpha = float(alpha)
        self.nspecial = nspecial
        self.ignore_index = ignore_index
        self.label_smoothing = float(label_smoothing)
        self.no_g1 = bool(no_g1)
        self.no_g2 = bool(no_g2)
        self.chunk_size = chunk_size
        self.counter = core.TokenCounter(vocab_size, nspecial, window)
        self.counter.freeze_after = static_after
        self._gates_cache = (None, None)  # (counter version, Gates)
        self._loss_calls = 0  # counted loss() calls of the open update
        self._optimizer_steps_seen = 0  # _OptimizerSteps.count at the open update's first loss() call
        self._warned = set()
        self._targets = None  # (targets, [forward calls]) inside `with agg.targets(...)`
        _OptimizerSteps.watch()

    def extra_repr(self) -> str:
        return (
            f"vocab_size={self.vocab_size}, alpha={self.alpha}, window={self.window}, nspecial={self.nspecial}, "
            f"label_smoothing={self.label_smoothing}, chunk_size={self.chunk_size}"
        )

    # -- the counter ------------------------------------------------------------------
    @property
    def window(self) -> Optional[int]:
        return self.counter.window

    def set_window(self, window: int) -> None:
        """Fixes K, the number of completed updates the counter remembers."""
        if window is None:
            raise AggConfigError("AGG window must be a positive number of updates, got None")
        _check_positive("window", window, "updates")
        self.counter.set_window(window)

    @property
    def num_updates(self) -> int:
        """Completed updates (calls of :meth:`step`)."""
        return self.counter.num_updates

    def gates(self) -> core.Gates:
        """The gates that the next :meth:`loss` applies (from completed updates only)."""
        version, gates = self._gates_cache
        if version != self.counter.version:
            gates = core.compute_gates(
                self.counter.average(), self.alpha, self.nspecial, use_g1=not self.no_g1, use_g2=not self.no_g2
            )
            self._gates_cache = (self.counter.version, gates)
        return gates

    @property
    def num_rare(self) -> int:
        """Size of the rare group that the next :meth:`loss` gates."""
        return self.gates().num_rare

    def step(self) -> None:
        """Closes one optimizer update (call it right after ``optimizer.step()``)."""
        if self._loss_calls == 0:
            self._warn_once(
                "empty update",
                "AGG step() was called without a training loss() call since the previous step(): it "
                "commits an empty update, which lowers every average and turns more tokens rare; "
                "call agg.step() once per optimizer update, after that update's loss() calls",
            )
        self.counter.commit(all_reduce=_sum_over_processes)
        self._loss_calls = 0

    def discard_pending(self) -> None:
        """Forgets the counts of the open update (for an update whose gradients are thrown away)."""
        self.counter.discard_pending()
        self._loss_calls = 0

    def _count_loss_call(self, targets: torch.Tensor, counts_labels: bool = True) -> None:
        """Counts one training loss() call into the open update, warning once where the previous
        update was never closed by step(). ``counts_labels`` False: the call is recorded but its
        labels are another process's to count (the same labels on every vocabulary shard)."""
        if self._loss_calls == 0:
            self._optimizer_steps_seen = _OptimizerSteps.count
        elif _OptimizerSteps.count != self._optimizer_steps_seen:
            self._warn_once(
                "missing step",
                "AGG loss() was called after an optimizer step that no agg.step() followed: the counts "
                "of several updates pile into one and the gates stop following the data; call "
                "agg.step() right after every optimizer.step()",
            )
        elif self.counter.num_updates == 0 and self._loss_calls == LOSS_CALLS_BEFORE_A_FIRST_STEP:
            self._warn_once(
                "missing step",
                f"AGG loss() was called {LOSS_CALLS_BEFORE_A_FIRST_STEP} times without agg.step(): the "
                f"gates never move until it is called; call agg.step() right after every optimizer step",
            )
        self._loss_calls += 1
        if counts_labels:
            self.counter.add(targets)

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(message, AggUsageWarning, stacklevel=3)

    # -- the loss ---------------------------------------------------------------------
    def loss(
        self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, reduction: str = "mean",
        vocab_parallel: bool = False,
    ) -> torch.Tensor:
        """(Label-smoothed) cross-entropy of ``hidden @ weight.T`` against ``labels``.

        hidden (..., d), weight (V, d) (the output embedding of a bias-free head), labels (...)
        aligned with hidden (for a causal LM the caller shifts: ``hidden[:, :-1]``,
        ``labels[:, 1:]``). ``reduction="mean"`` averages over the non-ignored labels (0 when there
        are none), ``"sum"`` sums. The gradient of ``weight`` through this projection is gated
        by AGG; everything else is plain cross-entropy.

        ``vocab_parallel=True``: ``weight`` is a DTensor sharded over the vocabulary
        (``Shard(0)``, as ``ColwiseParallel`` makes it) and ``hidden``/``labels`` are the same on
        every process of its mesh (plain tensors or ``Replicate`` DTensors). Each process computes
        the logits of its vocabulary slice only, chunk by chunk; the softmax is combined over the
        mesh, W's gradient stays on its shard, the gradient of ``hidden`` is summed over the mesh,
        and the loss (a plain tensor) is the same on every process. Only the first process of the
        mesh counts the labels, so ``step()`` needs nothing more. Neither W nor the full logits
        are ever gathered.
        """
        if reduction not in _REDUCTIONS:
            raise AggConfigError(f"AGG loss reduction must be one of {', '.join(_REDUCTIONS)}, got {reduction!r}")
        shard, counts_labels = None, True
        if parallel.is_dtensor(weight):
            if not vocab_parallel:
                raise AggConfigError(parallel.DTENSOR_WEIGHT_REFUSAL.format(placements=tuple(weight.placements)))
            if weight.dim() != 2 or weight.size(0) != self.vocab_size:
                raise AggConfigError(
                    f"AGG output embedding must have shape (vocab_size={self.vocab_size}, d), got {tuple(weight.shape)}"
                )
            weight, shard, counts_labels = parallel.vocab_shard(weight)
            hidden = parallel.replicated_local(hidden, "hidden states")
            labels = parallel.replicated_local(labels, "labels")
        elif vocab_parallel:
            raise AggConfigError(
                "vocab_parallel=True needs the output weight as a DTensor sharded over the vocabulary "
                "(Shard(0), e.g. from ColwiseParallel), got a plain tensor; leave vocab_parallel out for a "
                "weight that every process holds whole"
            )
        vocab_rows = shard.vocab_size if shard is not None else weight.size(0)
        if weight.dim() != 2 or vocab_rows != self.vocab_size:
            raise AggConfigError(
                f"AGG output embedding must have shape (vocab_size={self.vocab_size}, d), got {tuple(weight.shape)}"
            )
        if hidden.dim() < 1 or hidden.size(-1) != weight.size(1):
            raise AggConfigError(
                f"AGG hidden states must have shape (..., d={weight.size(1)}), got {tuple(hidden.shape)}"
            )
        if tuple(labels.shape) != tuple(hidden.shape[:-1]):
            raise AggConfigError(
                f"AGG labels of shape {tuple(labels.shape)} do not align with hidden states of shape "
                f"{tuple(hidden.shape)} (labels must have the shape hidden.shape[:-1]; shift them for a causal LM)"
            )
        self._check_label_dtype(labels)
        hidden, weight = _autocast_operands(hidden, weight)
        if hidden.dtype != weight.dtype:
            raise AggConfigError(
                f"AGG hidden states are {hidden.dtype} but the output embedding is {weight.dtype}: pass both "
                f"in one dtype (e.g. hidden.to(weight.dtype)), or call loss() under torch.autocast, which "
                f"casts both as nn.Linear would"
            )
        flat_labels = labels.reshape(-1).long()
        flat_hidden = hidden.reshape(-1, hidden.size(-1))
        # Ignored positions are dropped: they add nothing to the loss or to any gradient.
        keep = (flat_labels != self.ignore_index).nonzero().squeeze(1)
        targets = flat_labels.index_select(0, keep)
        self._check_label_range(targets)
        # Not copied where none is (every process of a vocabulary-parallel loss holds them whole).
        features = flat_hidden if keep.numel() == flat_labels.numel() else flat_hidden.index_select(0, keep)
        grad = torch.is_grad_enabled()
        if grad and self.training:
            self._count_loss_call(targets, counts_labels)
        gates = self.gates() if grad else None
        # F.cross_entropy's epsilon spreads eps/V over every class; core's (fairseq's) eps'/(V-1)
        # over the non-targets: the same loss for eps' = eps (V-1)/V.
        epsilon = self.label_smoothing * (self.vocab_size - 1) / self.vocab_size
        with torch.autocast(features.device.type, enabled=False):
            if shard is None:
                total, _, _ = core.gated_loss(
                    features, weight, targets.view(1, -1), gates,
                    ignore_index=None, label_smoothing=epsilon, chunk_rows=self.chunk_size,
                )
            else:
                rows = max(1, targets.numel())
                chunk = self.chunk_size if self.chunk_size is not None else core.auto_chunk_rows(
                    rows, weight.size(0), weight.size(1))
                total, _, _ = core.chunked_gated_loss(
                    features, weight, targets, gates, ignore_index=None, label_smoothing=epsilon,
                    chunk_rows=chunk or rows, shard=shard,
                )
        if reduction == "sum":
            return total
        return total / max(int(targets.numel()), 1)

    forward = loss

    def _check_label_dtype(self, labels: torch.Tensor) -> None:
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise AggConfigError(f"AGG labels must be integer token ids, got {labels.dtype}")

    def _check_label_range(self, targets: torch.Tensor) -> None:
        """Targets (ignored labels removed) outside the vocabulary, refused where reading them
        costs no device sync (on the CPU)."""
        if targets.device.type == "cpu" and targets.numel() > 0:
            low, high = int(targets.min()), int(targets.max())
            if low < 0 or high >= self.vocab_size:
                bad = low if low < 0 else high
                raise AggConfigError(
                    f"AGG label {bad} lies outside the vocabulary [0, {self.vocab_size}) and is not "
                    f"ignore_index={self.ignore_index}"
                )

    # -- the gated output layer ------------------------------------------------------------
    @contextlib.contextmanager
    def targets(self, targets: torch.Tensor):
        """The targets of the rows that :class:`GatedOutputLayer` projects inside this block:
        ``targets`` has the shape of the layer's input without its last dimension, one target
        per row of logits (``ignore_index`` for rows without one). For a causal LM whose labels
        are the input ids, :func:`causal_targets` shifts them."""
        self._check_label_dtype(targets)
        previous, self._targets = self._targets, (targets, [0])
        try:
            yield
        finally:
            self._targets = previous

    def gated_output_layer(self, head: nn.Linear) -> "GatedOutputLayer":
        """A :class:`GatedOutputLayer` sharing ``head``'s weight (a tied embedding stays tied):
        put it where ``head`` was, e.g. ``model.set_output_embeddings(agg.gated_output_layer(head))``."""
        return GatedOutputLayer.replacing(head, self)

    def _gated_logits(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The output layer's forward in training: the logits, with W's gradient gated for the
        targets of :meth:`targets`."""
        if self._targets is None:
            raise AggConfigError(
                "GatedOutputLayer ran a training forward without its targets: wrap the model's forward in "
                "`with agg.targets(targets):` (targets: one per row of logits, e.g. causal_targets(labels))"
            )
        targets, calls = self._targets
        if calls[0]:
            raise AggConfigError(
                "GatedOutputLayer ran twice inside one `with agg.targets(...)` block; give each forward its own block"
            )
        calls[0] += 1
        if tuple(targets.shape) != tuple(hidden.shape[:-1]):
            raise AggConfigError(
                f"AGG targets of shape {tuple(targets.shape)} do not align with the output layer's input of "
                f"shape {tuple(hidden.shape)} (one target per row of logits: the input's shape without its last "
                f"dimension; causal_targets(labels) shifts a causal LM's labels)"
            )
        if weight.size(0) != self.vocab_size:
            raise AggConfigError(
                f"the output layer has {weight.size(0)} rows but AGG counts a vocabulary of {self.vocab_size}: "
                f"the layer was resized after AdaptiveGradientGating was built; build it with the new size"
            )
        shard, counts_labels, wrap = None, True, None
        if parallel.is_dtensor(weight):
            local_weight, shard, counts_labels = parallel.vocab_shard(weight)
            hidden, wrap = parallel.sharded_logits_io(hidden, weight)
            weight = local_weight
        targets = parallel.replicated_local(targets, "targets").to(hidden.device)
        flat_targets = targets.reshape(-1).long()
        self._check_label_range(flat_targets[flat_targets != self.ignore_index])
        self._count_loss_call(flat_targets[flat_targets != self.ignore_index], counts_labels)
        hidden, weight = _autocast_operands(hidden, weight)
        with torch.autocast(hidden.device.type, enabled=False):
            logits = core.gated_linear(
                hidden.reshape(-1, hidden.size(-1)), weight, flat_targets, self.gates(),
                ignore_index=self.ignore_index, shard=shard,
            ).view(*hidden.shape[:-1], weight.size(0))
        return wrap(logits) if wrap is not None else logits

    # -- checkpointing ------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        """The counter, and the open update's counts with the rank that counted them. The
        variable-length id and count lists are stored as byte arrays, so that
        ``torch.distributed.checkpoint`` (which loads tensors in place, into tensors of the
        sizes it is given) restores them whatever their length."""
        pending_ids = self.counter.pending.nonzero().squeeze(1)
        state = {
            **self.counter.state_dict(),
            "pending_ids": pending_ids.cpu(),
            "pending_counts": self.counter.pending[pending_ids].cpu(),
            "pending_loss_calls": self._loss_calls,
            "pending_rank": _process_rank(),
        }
        return {key: _int64_bytes(value) if key in _LIST_KEYS else value for key, value in state.items()}

    def set_extra_state(self, state: dict) -> None:
        if not isinstance(state, dict) or "vocab_size" not in state:
            raise AggConfigError("AGG state is not a token-counter state (expected the dict agg.state_dict() returns)")
        state = {key: _int64_tensor(value) if key in _LIST_KEYS else value for key, value in state.items()}
        if int(state["vocab_size"]) != self.vocab_size:
            raise AggConfigError(
                f"AGG counter state covers a vocabulary of {int(state['vocab_size'])} tokens but this "
                f"AdaptiveGradientGating has {self.vocab_size}: it was saved for another model or tokenizer"
            )
        self.counter.load_state_dict(state)
        self._gates_cache = (None, None)
        self._loss_calls = 0
        # Only the rank that counted them takes the open update's counts back: every rank loading
        # one rank's checkpoint must not add them world-size times at the next step().
        if "pending_ids" in state and state.get("pending_rank") == _process_rank():
            ids = state["pending_ids"].long().to(self.counter.device)
            self.counter.pending.index_add_(0, ids, state["pending_counts"].long().to(self.counter.device))
            self._loss_calls = int(state.get("pending_loss_calls", 0))
            self._optimizer_steps_seen = _OptimizerSteps.count

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Restores the counter from :meth:`state_dict` (or from a bare counter state)."""
        if isinstance(state_dict, dict) and "vocab_size" in state_dict:
            state_dict = OrderedDict(_extra_state=state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


_LIST_KEYS = ("slot_lengths", "slot_ids", "slot_counts", "pending_ids", "pending_counts")


def _int64_bytes(tensor: torch.Tensor) -> bytearray:
    # bytearray, not bytes: torch's weights-only unpickler refuses an empty bytes object.
    return bytearray(tensor.to(torch.int64).cpu().numpy().tobytes())


def _int64_tensor(value) -> torch.Tensor:
    """A list saved by :func:`_int64_bytes` (or, by earlier versions, as a tensor)."""
    if isinstance(value, (bytes, bytearray)):
        return torch.frombuffer(bytearray(value), dtype=torch.int64) if value else torch.zeros(0, dtype=torch.int64)
    return value


class GatedOutputLayer(nn.Linear):
    """A drop-in replacement for a model's bias-free output layer (``lm_head``, tied or untied)
    whose forward returns the ordinary logits ``hidden @ W^T`` and whose backward gates only
    W's gradient through them (paper eq. 23) for the targets given by ``agg.targets(...)``. The
    model computes its own loss from the logits (router auxiliary losses, logit multipliers,
    soft-capping, z-loss): AGG gates exactly the part of W's gradient that flows through the
    logits, and for plain cross-entropy the result equals :meth:`AdaptiveGradientGating.loss`.

    ::

        model.lm_head = agg.gated_output_layer(model.lm_head)
        with agg.targets(causal_targets(labels)):      # counts them; gates this forward's backward
            loss = model(input_ids, labels=labels).loss
        loss.backward(); optimizer.step(); optimizer.zero_grad(); agg.step()

    In evaluation mode or without gradients it is a plain ``nn.Linear`` (no targets needed). It
    works under FSDP2 as a unit of its own (FSDP gathers the weight for the call) and with
    ``ColwiseParallel`` (the weight sharded over the vocabulary; ``use_local_output=False`` and
    ``loss_parallel()`` compute the loss on the sharded logits): each process gates its slice,
    and only the first process of the vocabulary mesh counts the targets.
    """

    def __init__(self, in_features: int, out_features: int, agg: "AdaptiveGradientGating", device=None, dtype=None):
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        # Not a submodule: the counter belongs to the training loop, not to the model's state.
        object.__setattr__(self, "agg", agg)

    @classmethod
    def replacing(cls, head: nn.Linear, agg: "AdaptiveGradientGating") -> "GatedOutputLayer":
        if not isinstance(head, nn.Linear) or head.bias is not None:
            raise AggConfigError(
                f"GatedOutputLayer replaces a bias-free nn.Linear (logits = h W^T), got {type(head).__name__}"
                + (" with a bias" if isinstance(head, nn.Linear) else "")
            )
        if head.out_features != agg.vocab_size:
            raise AggConfigError(
                f"the output layer has {head.out_features} rows but AGG counts a vocabulary of {agg.vocab_size}: "
                f"build AdaptiveGradientGating with vocab_size={head.out_features}"
            )
        layer = cls(head.in_features, head.out_features, agg, device="meta")
        layer.weight = head.weight  # the same Parameter: a tied input embedding stays tied
        layer.train(head.training)
        return layer

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.agg.training and torch.is_grad_enabled()):
            return nn.functional.linear(hidden, self.weight)
        return self.agg._gated_logits(hidden, self.weight)


def causal_targets(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """The target of each position's logits for a causal LM whose ``labels`` are aligned with
    its inputs (Hugging Face's convention): ``labels`` shifted left by one, the last position
    given ``ignore_index``."""
    return torch.cat([labels[..., 1:], labels.new_full((*labels.shape[:-1], 1), ignore_index)], dim=-1)
