"""Adaptive Gradient Gating in plain PyTorch: the token counter, the gates and the
single-pass gated output projection.

Nothing here imports fairseq, so the math can be tested (and reused) on its own.
The fairseq criteria and tasks in this package are thin adapters around it.

Conventions (see README, "Exact semantics"):

* ``N``: vocabulary size, ``d``: model dimension, ``M``: number of positions.
* ``avg[k]``: average count of token ``k`` per completed update over the window.
* Token ``k`` is rare when ``avg[k] < alpha``; the first ``nspecial`` symbols never are.
* For position ``i`` with target ``y_i`` and a rare token ``k != y_i`` the gradient that
  ``W[k]`` receives through the output projection is multiplied by ``g1[k] = avg[k]`` when
  ``y_i`` is not rare and by ``g2[k] = min(avg[k] / mean_rare_avg, 1)`` when it is.
  Everything else (the loss value, the gradient of the features) is plain cross-entropy.
"""

from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "Gates",
    "compute_gates",
    "constant_gates",
    "static_rare_mask",
    "gated_linear",
    "gate_matrix",
    "label_smoothed_nll_loss",
    "gated_cross_entropy",
    "log_probs",
    "TokenCounter",
]


@dataclass
class Gates:
    """Per-token gate values for one update. All tensors have shape (N,)."""

    rare: torch.Tensor  # bool
    g1: torch.Tensor  # float32, 1 where not rare
    g2: torch.Tensor  # float32, 1 where not rare

    @property
    def num_rare(self) -> int:
        return int(self.rare.sum().item())

    def is_identity(self) -> bool:
        return not bool(self.rare.any())

    def to(self, device) -> "Gates":
        return Gates(self.rare.to(device), self.g1.to(device), self.g2.to(device))


def compute_gates(
    avg: torch.Tensor,
    alpha: float,
    nspecial: int,
    use_g1: bool = True,
    use_g2: bool = True,
) -> Gates:
    """Paper eqs. 5, 7 and 8 from the windowed average counts ``avg`` (shape (N,))."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"agg alpha must lie in (0, 1], got {alpha}")
    avg = avg.to(torch.float64)
    rare = avg < alpha
    rare[:nspecial] = False
    ones = torch.ones_like(avg)
    g1 = torch.where(rare, avg, ones) if use_g1 else ones
    if use_g2 and bool(rare.any()):
        mean_rare = avg[rare].mean()
        if mean_rare > 0:
            g2 = torch.where(rare, torch.clamp(avg / mean_rare, max=1.0), ones)
        else:
            g2 = torch.where(rare, torch.zeros_like(avg), ones)
    else:
        g2 = ones
    return Gates(rare, g1.to(torch.float32), g2.to(torch.float32))


def constant_gates(rare: torch.Tensor, g1_value: float, g2_value: float) -> Gates:
    """Gates of the empirical study (paper Tables 1-2): a fixed rare group whose part (b)
    and/or part (c) gradients are kept (1.0) or detached (0.0)."""
    ones = torch.ones(rare.shape, dtype=torch.float32, device=rare.device)
    g1 = torch.where(rare, torch.full_like(ones, g1_value), ones)
    g2 = torch.where(rare, torch.full_like(ones, g2_value), ones)
    return Gates(rare.clone(), g1, g2)


def static_rare_mask(counts: torch.Tensor, nspecial: int, fraction: float = 0.2) -> torch.Tensor:
    """The ``fraction`` least frequent non-special tokens by corpus count (ties broken by
    dictionary index, so the group is deterministic)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"rare fraction must lie in (0, 1), got {fraction}")
    counts = torch.as_tensor(counts, dtype=torch.float64)
    candidates = torch.arange(nspecial, counts.numel())
    n_rare = int(fraction * candidates.numel())
    order = torch.sort(counts[candidates], stable=True).indices
    rare = torch.zeros(counts.numel(), dtype=torch.bool)
    rare[candidates[order[:n_rare]]] = True
    return rare


def gate_matrix(target: torch.Tensor, gates: Gates) -> torch.Tensor:
    """Dense (M, N) gate of eq. 23: g1 on rows with a non-rare target, g2 on rows with a
    rare target, and 1 on each row's own target column."""
    target = target.reshape(-1)
    row_is_rare = gates.rare[target]
    gate = torch.where(row_is_rare.unsqueeze(1), gates.g2.unsqueeze(0), gates.g1.unsqueeze(0))
    gate.scatter_(1, target.unsqueeze(1), 1.0)
    return gate


class _GatedLinear(torch.autograd.Function):
    """logits = h @ W^T whose backward gates only the W path (eq. 23)."""

    @staticmethod
    def forward(ctx, features, weight, target, rare, g1, g2):
        ctx.save_for_backward(features, weight, target, rare, g1, g2)
        return features.matmul(weight.t())

    @staticmethod
    def backward(ctx, grad_logits):
        features, weight, target, rare, g1, g2 = ctx.saved_tensors
        grad_features = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_features = grad_logits.matmul(weight)
        if ctx.needs_input_grad[1]:
            gate = gate_matrix(target, Gates(rare, g1, g2))
            # Gating happens in float32 at least, whatever the training precision.
            compute_dtype = torch.promote_types(grad_logits.dtype, torch.float32)
            gated = (grad_logits.to(compute_dtype) * gate.to(compute_dtype)).to(grad_logits.dtype)
            grad_weight = gated.t().matmul(features)
        return grad_features, grad_weight, None, None, None, None


def gated_linear(
    features: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    gates: Optional[Gates],
) -> torch.Tensor:
    """Output projection of ``features`` (M, d) by ``weight`` (N, d) with AGG-gated W grads.

    ``target`` (M,) holds each row's target token. With ``gates`` None or without any rare
    token this is an ordinary ``features @ weight.T``.
    """
    if features.dim() != 2 or target.dim() != 1 or target.numel() != features.size(0):
        raise ValueError(
            f"gated_linear expects features (M, d) and target (M,), got "
            f"{tuple(features.shape)} and {tuple(target.shape)}"
        )
    if gates is None or gates.is_identity():
        return features.matmul(weight.t())
    if gates.rare.numel() != weight.size(0):
        raise ValueError(
            f"gates cover {gates.rare.numel()} tokens but the output layer has {weight.size(0)} rows"
        )
    gates = gates.to(features.device)
    return _GatedLinear.apply(features, weight, target, gates.rare, gates.g1, gates.g2)


def label_smoothed_nll_loss(
    lprobs: torch.Tensor,
    target: torch.Tensor,
    epsilon: float,
    ignore_index: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Summed loss and NLL, the same formula as fairseq's ``label_smoothed_nll_loss``."""
    if epsilon == 0.0:
        nll_loss = F.nll_loss(lprobs, target, ignore_index=-100 if ignore_index is None else ignore_index, reduction="sum")
        return nll_loss, nll_loss
    target = target.unsqueeze(-1)
    nll_loss = -lprobs.gather(dim=-1, index=target)
    smooth_loss = -lprobs.sum(dim=-1, keepdim=True)
    if ignore_index is not None:
        pad_mask = target.eq(ignore_index)
        nll_loss = nll_loss.masked_fill(pad_mask, 0.0)
        smooth_loss = smooth_loss.masked_fill(pad_mask, 0.0)
    nll_loss = nll_loss.sum()
    smooth_loss = smooth_loss.sum()
    eps_i = epsilon / (lprobs.size(-1) - 1)
    loss = (1.0 - epsilon - eps_i) * nll_loss + eps_i * smooth_loss
    return loss, nll_loss


def gated_cross_entropy(
    features: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    gates: Optional[Gates],
    ignore_index: Optional[int] = None,
    label_smoothing: float = 0.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Summed (label-smoothed) cross-entropy and NLL of one logits pass with AGG gating.

    Values equal plain cross-entropy; the gradient of ``features`` is ungated; the gradient
    of ``weight`` is gated entry by entry (paper eq. 23).
    """
    logits = gated_linear(features, weight, target, gates)
    return label_smoothed_nll_loss(log_probs(logits), target, label_smoothing, ignore_index)


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax in float32 at least (float64 stays float64), as the loss needs."""
    return F.log_softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))


class TokenCounter:
    """Counts of training-target tokens over the last K completed updates.

    Per update, counts accumulate in a dense pending vector (cost: the update's tokens);
    ``commit`` closes the update (one pass over the vocabulary) and stores it as a sparse
    slot, so the window costs memory in proportion to the tokens it holds, never K x N.
    With ``window=None`` the window is unbounded until ``set_window`` fixes it (the tasks
    set it from the training iterator to the updates of one epoch, the paper's K).
    """

    def __init__(self, vocab_size: int, nspecial: int, window: Optional[int] = None):
        if vocab_size <= nspecial:
            raise ValueError(f"vocabulary of {vocab_size} symbols has no non-special token")
        if window is not None and window < 1:
            raise ValueError(f"agg window must be a positive number of updates, got {window}")
        self.vocab_size = vocab_size
        self.nspecial = nspecial
        self.window = window
        self.freeze_after: Optional[int] = None  # ablation: the window stops changing then
        self.num_updates = 0
        self.device = torch.device("cpu")
        self.window_sum = torch.zeros(vocab_size, dtype=torch.int64)
        self.pending = torch.zeros(vocab_size, dtype=torch.int64)
        self.slots: deque = deque()  # (token ids, counts) per completed update, oldest first

    # -- counting -------------------------------------------------------------------
    def to(self, device) -> "TokenCounter":
        device = torch.device(device)
        self.device = device
        self.window_sum = self.window_sum.to(device)
        self.pending = self.pending.to(device)
        self.slots = deque((ids.to(device), cnt.to(device)) for ids, cnt in self.slots)
        return self

    def add(self, target: torch.Tensor, padding_idx: Optional[int] = None) -> None:
        """Count the target tokens of one micro-batch into the pending update."""
        tokens = target.reshape(-1)
        if padding_idx is not None:
            tokens = tokens[tokens != padding_idx]
        if tokens.numel() == 0:
            return
        if tokens.device != self.device:
            # The counter lives where the targets are, so counting never syncs with the host.
            self.to(tokens.device)
        if tokens.device.type == "cpu" and (int(tokens.max()) >= self.vocab_size or int(tokens.min()) < 0):
            raise ValueError(f"target token id out of range for a counter of {self.vocab_size} symbols")
        self.pending.index_add_(0, tokens, torch.ones_like(tokens))

    def discard_pending(self) -> None:
        self.pending.zero_()

    def commit(self, all_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
        """Close one completed update; ``all_reduce`` sums the pending counts of all workers."""
        pending = self.pending
        if all_reduce is not None:
            pending = all_reduce(pending)
        if self.frozen:
            self.num_updates += 1
            self.pending = torch.zeros_like(self.window_sum)
            return
        ids = pending.nonzero().squeeze(1)
        counts = pending[ids]
        self.window_sum += pending
        self.slots.append((ids, counts))
        self.num_updates += 1
        self.pending = torch.zeros_like(self.window_sum)
        self._trim()

    def set_window(self, window: int) -> None:
        if window < 1:
            raise ValueError(f"agg window must be a positive number of updates, got {window}")
        self.window = window
        self._trim()

    @property
    def frozen(self) -> bool:
        return self.freeze_after is not None and self.num_updates >= self.freeze_after

    def _trim(self) -> None:
        if self.window is None or self.frozen:
            return
        while len(self.slots) > self.window:
            ids, counts = self.slots.popleft()
            self.window_sum.index_add_(0, ids, -counts)

    # -- reading ----------------------------------------------------------------------
    def updates_in_window(self) -> int:
        return len(self.slots)

    def average(self) -> torch.Tensor:
        """a_k = S_k / min(u, K) as float64; all zeros before the first completed update."""
        n = self.updates_in_window()
        if n == 0:
            return torch.zeros(self.vocab_size, dtype=torch.float64, device=self.device)
        return self.window_sum.to(torch.float64) / n

    # -- checkpointing ------------------------------------------------------------------
    def state_dict(self) -> dict:
        lengths = torch.tensor([ids.numel() for ids, _ in self.slots], dtype=torch.int64)
        if self.slots:
            ids = torch.cat([ids for ids, _ in self.slots]).cpu()
            counts = torch.cat([c for _, c in self.slots]).cpu()
        else:
            ids = counts = torch.zeros(0, dtype=torch.int64)
        return {
            "vocab_size": self.vocab_size,
            "nspecial": self.nspecial,
            "window": self.window,
            "num_updates": self.num_updates,
            "freeze_after": self.freeze_after,
            "slot_lengths": lengths,
            "slot_ids": ids,
            "slot_counts": counts,
        }

    def load_state_dict(self, state: dict) -> None:
        if int(state["vocab_size"]) != self.vocab_size:
            raise ValueError(
                f"the checkpoint's AGG token counter covers a vocabulary of {state['vocab_size']} "
                f"symbols but this task's target dictionary has {self.vocab_size}; the checkpoint "
                f"was trained with another dictionary"
            )
        self.window = state["window"] if self.window is None else self.window
        self.num_updates = int(state["num_updates"])
        if self.freeze_after is None:
            self.freeze_after = state.get("freeze_after")
        self.slots = deque()
        self.window_sum = torch.zeros(self.vocab_size, dtype=torch.int64)
        offset = 0
        for length in state["slot_lengths"].tolist():
            ids = state["slot_ids"][offset : offset + length].long()
            counts = state["slot_counts"][offset : offset + length].long()
            offset += length
            self.slots.append((ids, counts))
            self.window_sum.index_add_(0, ids, counts)
        self.pending = torch.zeros_like(self.window_sum)
        self.to(self.device)
        self._trim()


def unlikelihood_candidates(target: torch.Tensor, padding_idx: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token-level unlikelihood candidates (Welleck et al. 2020) as sparse pairs.

    For position t of sequence b, the candidates are the distinct tokens among the earlier
    targets target[b, :t] of the *same* sequence, minus target[b, t] and padding; padding
    positions have none. Returns (flat position index b*T + t, candidate token id) pairs.
    The work is O(B x T x distinct tokens per sequence), never B x T x vocabulary.
    """
    if target.dim() != 2:
        raise ValueError(f"unlikelihood candidates need targets of shape (batch, length), got {tuple(target.shape)}")
    bsz, length = target.shape
    device = target.device
    positions = torch.arange(length, device=device)
    # First position of each token in its sequence: a token is a candidate strictly after it.
    first_pos = torch.full((bsz, length), length, dtype=torch.long, device=device)
    same = target.unsqueeze(2) == target.unsqueeze(1)  # (B, T, T): target[b, s] == target[b, u]
    earlier_same = same & (positions.view(1, 1, -1) < positions.view(1, -1, 1))
    is_first = ~earlier_same.any(dim=2)  # (B, T): position s holds the first occurrence
    if padding_idx is not None:
        is_first &= target != padding_idx
    first_pos = torch.where(is_first, positions.expand(bsz, -1), first_pos)
    # candidate[b, t, s]: the token first seen at s is a candidate at t.
    candidate = first_pos.unsqueeze(1) < positions.view(1, -1, 1)
    candidate &= target.unsqueeze(2) != target.unsqueeze(1)
    if padding_idx is not None:
        candidate &= (target != padding_idx).unsqueeze(2)
    b, t, s = candidate.nonzero(as_tuple=True)
    return b * length + t, target[b, s]


def unlikelihood_loss(lprobs: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Summed sum_c -log(clamp(1 - p_c, 1e-5)) over the candidate pairs."""
    candidate_lprobs = lprobs[rows, tokens]
    one_minus = torch.clamp(1.0 - candidate_lprobs.exp(), min=1e-5)
    return -torch.log(one_minus).sum()
