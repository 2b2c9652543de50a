"""Adaptive Gradient Gating in plain PyTorch: the token counter, the gates and the
single-pass gated output projection.

Nothing here imports fairseq, so the math can be tested (and reused) on its own.
The fairseq criteria and tasks in this package are thin adapters around it.

Conventions (docs/semantics.md):

* ``N``: vocabulary size, ``d``: model dimension, ``M``: number of positions.
* ``avg[k]``: average count of token ``k`` per completed update over the window.
* Token ``k`` is rare when ``avg[k] < alpha``; the first ``nspecial`` symbols never are.
* For position ``i`` with target ``y_i`` and a rare token ``k != y_i`` the gradient that
  ``W[k]`` receives through the output projection is multiplied by ``g1[k] = avg[k]`` when
  ``y_i`` is not rare and by ``g2[k] = min(avg[k] / mean_rare_avg, 1)`` when it is.
  Everything else (the loss value, the gradient of the features) is plain cross-entropy.
"""

import math
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from fairseq_agg.errors import AggConfigError

__all__ = [
    "Gates",
    "compute_gates",
    "constant_gates",
    "static_rare_mask",
    "gated_linear",
    "VocabShard",
    "RowGating",
    "row_gating",
    "gated_weight_gradient",
    "label_smoothed_nll_loss",
    "gated_cross_entropy",
    "log_probs",
    "TokenCounter",
    "unlikelihood_candidates",
    "unlikelihood_loss",
    "chunked_gated_loss",
    "gated_loss",
    "auto_chunk_rows",
]


@dataclass
class Gates:
    """Per-token gate values for one update. All tensors have shape (N,)."""

    rare: torch.Tensor  # bool
    # float64, 1 where not rare: each path casts them to the precision it accumulates W's
    # gradient in, so a float64 run is gated in float64.
    g1: torch.Tensor
    g2: torch.Tensor
    num_rare: Optional[int] = None  # counted once here, so that users never sync with the device

    def __post_init__(self):
        if self.num_rare is None:
            self.num_rare = int(self.rare.sum())

    def is_identity(self) -> bool:
        return self.num_rare == 0

    def to(self, device) -> "Gates":
        if self.rare.device == torch.device(device):
            return self
        return Gates(self.rare.to(device), self.g1.to(device), self.g2.to(device), self.num_rare)


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
    return Gates(rare, g1, g2)


def constant_gates(rare: torch.Tensor, g1_value: float, g2_value: float) -> Gates:
    """Gates of the empirical study (paper Tables 1-2): a fixed rare group whose part (b)
    and/or part (c) gradients are kept (1.0) or detached (0.0)."""
    ones = torch.ones(rare.shape, dtype=torch.float64, device=rare.device)
    g1 = torch.where(rare, torch.full_like(ones, g1_value), ones)
    g2 = torch.where(rare, torch.full_like(ones, g2_value), ones)
    return Gates(rare.clone(), g1, g2)


def static_rare_mask(
    counts: torch.Tensor, nspecial: int, fraction: float = 0.2, exclude: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """The ``fraction`` least frequent non-special tokens by corpus count (ties broken by
    dictionary index, so the group is deterministic). ``exclude`` (bool, per token) marks
    symbols that are no tokens at all, such as fairseq's padding words ``madeupword*``."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"rare fraction must lie in (0, 1), got {fraction}")
    counts = torch.as_tensor(counts, dtype=torch.float64)
    eligible = torch.ones(counts.numel(), dtype=torch.bool)
    eligible[:nspecial] = False
    if exclude is not None:
        eligible &= ~exclude
    candidates = eligible.nonzero().squeeze(1)
    n_rare = int(fraction * candidates.numel())
    order = torch.sort(counts[candidates], stable=True).indices
    rare = torch.zeros(counts.numel(), dtype=torch.bool)
    rare[candidates[order[:n_rare]]] = True
    return rare


@dataclass(frozen=True)
class VocabShard:
    """This process holds rows [start, start + rows) of an output layer of ``vocab_size`` rows
    (vocabulary parallelism); the processes of ``group`` hold the others, so a row's softmax
    and the features' gradient are combined over ``group``."""

    start: int
    vocab_size: int
    group: object = None  # a torch.distributed ProcessGroup


@dataclass
class RowGating:
    """How each row of one output projection is gated: ``rare[i]``, whether row i's target is
    rare (False for rows without a target), and ``own[i]``, the local column of row i's target
    (-1 when it has none here: ignored, or held by another shard). ``g1``/``g2`` are the local
    columns' gates."""

    rare: torch.Tensor
    own: torch.Tensor
    g1: torch.Tensor
    g2: torch.Tensor


def row_gating(target: torch.Tensor, gates: Gates, local_rows: int, ignore_index: Optional[int] = None,
               shard: Optional[VocabShard] = None) -> RowGating:
    """The gating of rows with targets ``target`` (M,) (global ids; ``ignore_index`` for none)
    for the ``local_rows`` columns that this process holds."""
    start = shard.start if shard is not None else 0
    valid = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
    safe = torch.where(valid, target, torch.zeros_like(target))
    own = safe - start
    here = valid & (own >= 0) & (own < local_rows)
    return RowGating(
        rare=gates.rare[safe] & valid,
        own=torch.where(here, own, torch.full_like(own, -1)),
        g1=gates.g1[start:start + local_rows],
        g2=gates.g2[start:start + local_rows],
    )


def gated_weight_gradient(grad_logits: torch.Tensor, features: torch.Tensor, rows: RowGating,
                          out_dtype: torch.dtype, rare_rows_from: Optional[int] = None) -> torch.Tensor:
    """(D * Gate)^T H for D = ``grad_logits`` (M, V), H = ``features`` (M, d) (paper eq. 23).

    Gate[i, k] is g1[k] on rows whose target is not rare and g2[k] on rows whose target is
    rare, with 1 on each row's own target column, so
    (D * Gate)^T H = diag(g1) D^T H + diag(g2 - g1) D_r^T H_r + sum_r (1 - g2[y_r]) D[r, y_r] e_{y_r} h_r^T
    over the rows r whose target is rare. No (rows x vocabulary) gate is ever built: one matmul
    over all rows, and one over whichever row set (rare or not) is smaller and the columns of
    rare tokens only, which it corrects.
    ``rare_rows_from`` promises that rows [rare_rows_from:] are exactly the rare-target rows
    (then the two row blocks cost one matmul in all).
    """
    g1, g2 = rows.g1.to(out_dtype), rows.g2.to(out_dtype)
    if rare_rows_from is not None:
        split = rare_rows_from
        gated = grad_logits[:split].t().matmul(features[:split]).to(out_dtype).mul_(g1.unsqueeze(1))
        if split < grad_logits.size(0):
            gated.addcmul_(g2.unsqueeze(1), grad_logits[split:].t().matmul(features[split:]).to(out_dtype))
        rare_rows = torch.arange(split, grad_logits.size(0), device=grad_logits.device)
    else:
        gated = _matmul(grad_logits.t(), features, out_dtype)
        rare_rows = rows.rare.nonzero().squeeze(1)
        if 2 * rare_rows.numel() <= rows.rare.numel():
            # Few rare-target rows (the usual case once training has run a while).
            base, delta, fewer = g1, g2 - g1, rare_rows
        else:
            # Early in training nearly every target is rare: correct the rows that are not.
            base, delta, fewer = g2, g1 - g2, (~rows.rare).nonzero().squeeze(1)
        # Only the columns of rare tokens are gated (base 1 and delta 0 elsewhere): the
        # correction's matmul covers those columns of the fewer rows only (in a steady state,
        # about a tenth of the rows and half the vocabulary).
        gated_columns = ((base != 1) | (delta != 0)).nonzero().squeeze(1)
        if gated_columns.numel() > 0:
            lo, last = gated_columns[[0, -1]].tolist()
            span = slice(lo, last + 1)
            h_fewer = features[fewer].to(out_dtype) if fewer.numel() > 0 else None
            if last + 1 - lo <= 2 * gated_columns.numel():
                # The rare columns fill most of their span (the tail of a frequency-sorted
                # vocabulary, with a few frequent ones inside): the span is scaled and corrected in
                # place as a view, its other columns exactly unchanged (base 1, delta 0), which costs
                # less than gathering the columns (no two-index gather, no temporary, no index_add_).
                gated[span].mul_(base[span].unsqueeze(1))
                if h_fewer is not None:
                    d_fewer = grad_logits[:, span].index_select(0, fewer).to(out_dtype).mul_(delta[span])
                    gated[span].addmm_(d_fewer.t(), h_fewer)
            else:
                gated.mul_(base.unsqueeze(1))
                if h_fewer is not None:
                    d_fewer = grad_logits[fewer.unsqueeze(1), gated_columns].to(out_dtype).mul_(delta[gated_columns])
                    gated.index_add_(0, gated_columns, d_fewer.t().matmul(h_fewer))
    own = rows.own[rare_rows]
    mine = (own >= 0).nonzero().squeeze(1)
    if mine.numel() > 0:
        r, y_r = rare_rows[mine], own[mine]
        fix = (1.0 - g2[y_r]) * grad_logits[r, y_r].to(out_dtype)
        gated.index_add_(0, y_r, fix.unsqueeze(1) * features[r].to(out_dtype))
    return gated


class _GatedLinear(torch.autograd.Function):
    """logits = h @ W^T whose backward gates only the W path (eq. 23)."""

    @staticmethod
    def forward(ctx, features, weight, row_rare, own, g1, g2, rare_rows_from):
        ctx.save_for_backward(features, weight, row_rare, own, g1, g2)
        ctx.rare_rows_from = rare_rows_from
        return features.matmul(weight.t())

    @staticmethod
    def backward(ctx, grad_logits):
        features, weight, row_rare, own, g1, g2 = ctx.saved_tensors
        grad_features = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_features = grad_logits.matmul(weight)
        if ctx.needs_input_grad[1]:
            # Gating happens in float32 at least, whatever the training precision (float64 in a
            # float64 run: the gates are float64).
            acc_dtype = torch.promote_types(grad_logits.dtype, torch.float32)
            rows = RowGating(row_rare, own, g1, g2)
            grad_weight = gated_weight_gradient(grad_logits, features, rows, acc_dtype, ctx.rare_rows_from)
            grad_weight = grad_weight.to(weight.dtype)
        return grad_features, grad_weight, None, None, None, None, None


def _effective_gates(gates: Optional[Gates], weight: torch.Tensor, shard: Optional[VocabShard] = None) -> Optional[Gates]:
    """None when nothing is gated; otherwise the gates, checked and on the weight's device."""
    if gates is None or gates.is_identity():
        return None
    rows = shard.vocab_size if shard is not None else weight.size(0)
    if gates.rare.numel() != rows:
        raise ValueError(f"gates cover {gates.rare.numel()} tokens but the output layer has {rows} rows")
    return gates.to(weight.device)


def gated_linear(
    features: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    gates: Optional[Gates],
    rare_rows_from: Optional[int] = None,
    ignore_index: Optional[int] = None,
    shard: Optional[VocabShard] = None,
) -> torch.Tensor:
    """Output projection of ``features`` (M, d) by ``weight`` (N, d) with AGG-gated W grads.

    ``target`` (M,) holds each row's target token; rows whose target is ``ignore_index`` have
    none and are gated as rows whose target is not rare (g1 on every rare column). With
    ``gates`` None or without any rare token this is an ordinary ``features @ weight.T``.
    ``rare_rows_from``, if given, promises that the rows from that index on are exactly the
    rows whose target is rare (the cheapest backward; ``gated_loss`` orders rows so). With
    ``shard``, ``weight`` is this process's slice of the vocabulary, the logits returned are
    that slice's, and ``gates`` and ``target`` are global.
    """
    if features.dim() != 2 or target.dim() != 1 or target.numel() != features.size(0):
        raise ValueError(
            f"gated_linear expects features (M, d) and target (M,), got "
            f"{tuple(features.shape)} and {tuple(target.shape)}"
        )
    gates = _effective_gates(gates, weight, shard)
    if gates is None:
        return features.matmul(weight.t())
    rows = row_gating(target, gates, weight.size(0), ignore_index, shard)
    return _GatedLinear.apply(features, weight, rows.rare, rows.own, rows.g1, rows.g2, rare_rows_from)


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
        self.version = 0  # changes whenever average() may change: caches key on it
        self.device = torch.device("cpu")
        self.window_sum = torch.zeros(vocab_size, dtype=torch.int64)
        self.pending = torch.zeros(vocab_size, dtype=torch.int64)
        self.slots: deque = deque()  # (token ids, counts) per completed update, oldest first

    # -- counting -------------------------------------------------------------------
    def to(self, device) -> "TokenCounter":
        device = torch.device(device)
        if device == self.device:
            return self
        self.device = device
        self.window_sum = self.window_sum.to(device)
        self.pending = self.pending.to(device)
        self.slots = deque((ids.to(device), cnt.to(device)) for ids, cnt in self.slots)
        return self

    def add(self, target: torch.Tensor, padding_idx: Optional[int] = None) -> None:
        """Count the target tokens of one micro-batch into the pending update."""
        tokens = target.reshape(-1)
        if tokens.numel() == 0:
            return
        if tokens.device != self.device:
            # The counter lives where the targets are, so counting never syncs with the host.
            self.to(tokens.device)
        if tokens.device.type == "cpu" and (int(tokens.max()) >= self.vocab_size or int(tokens.min()) < 0):
            raise ValueError(f"target token id out of range for a counter of {self.vocab_size} symbols")
        # Padding is added with weight 0 rather than filtered out: no data-dependent shape.
        weights = torch.ones_like(tokens) if padding_idx is None else (tokens != padding_idx).to(tokens.dtype)
        self.pending.index_add_(0, tokens, weights)

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
        self.version += 1
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
        self.version += 1
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
            raise AggConfigError(
                f"the checkpoint's AGG token counter covers a vocabulary of {state['vocab_size']} "
                f"symbols but this task's target dictionary has {self.vocab_size}; the checkpoint "
                f"was trained with another dictionary: resume with that one, or pass --reset-dataloader "
                f"--reset-optimizer to start from its weights only"
            )
        self.window = state["window"] if self.window is None else self.window
        self.num_updates = int(state["num_updates"])
        self.version += 1
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
    The work and memory are O(B x T^2) booleans, never B x T x vocabulary.
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


class _ChunkedGatedLoss(torch.autograd.Function):
    """(Label-smoothed) cross-entropy [+ unlikelihood] of ``features @ weight.T`` computed
    chunk by chunk of rows: each chunk's logits are made, turned into the loss and into
    their share of both gradients, and freed. The gradients (W path gated as eq. 23) are
    kept, in float32 at least, for backward; no (rows x vocabulary) tensor outlives a chunk.

    Memory beyond the inputs: W's gradient, the features' gradient, and one chunk of logits
    (turned in place into probabilities and then into the logits' gradient)."""

    @staticmethod
    def forward(ctx, features, weight, target, rare, g1, g2, epsilon, ignore_index, chunk_rows,
                ul_rows, ul_tokens, ul_alpha, rare_rows_from, shard, row_order):
        rows_total, local_rows = features.size(0), weight.size(0)
        vocab = shard.vocab_size if shard is not None else local_rows
        first_row = shard.start if shard is not None else 0
        acc_dtype = torch.promote_types(features.dtype, torch.float32)
        mm_dtype = _matmul_dtype(features.dtype, features.device)
        # float16 holds the logits' gradient only from about 6e-8 up: scaled by a power of two
        # before the cast (as a loss scale would), unscaled exactly in the float32 results.
        mm_scale = FLOAT16_GRADIENT_SCALE if mm_dtype == torch.float16 else 1.0
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_features = torch.empty(features.shape, dtype=acc_dtype, device=features.device) if need_h else None
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
        gated = need_w and rare is not None
        if gated:
            g1_acc = g1[first_row:first_row + local_rows].to(acc_dtype)
            g2_acc = g2[first_row:first_row + local_rows].to(acc_dtype)
        weight_mm = weight.to(mm_dtype)
        weight_t_mm = weight_mm.t()
        eps_i = epsilon / (vocab - 1)
        loss = torch.zeros((), dtype=acc_dtype, device=features.device)
        nll = torch.zeros_like(loss)
        ul = torch.zeros_like(loss)
        use_ul = ul_rows is not None and ul_rows.numel() > 0
        if use_ul:
            starts = torch.arange(0, rows_total + chunk_rows, chunk_rows, device=ul_rows.device)
            bounds = torch.searchsorted(ul_rows, starts).tolist()
        for chunk, start in enumerate(range(0, rows_total, chunk_rows)):
            end = min(start + chunk_rows, rows_total)
            # The chunk's rows of the features, in ``row_order`` when given (the features are
            # never copied whole; their gradient is written back to the same rows).
            rows = slice(start, end) if row_order is None else row_order[start:end]
            h, y = features[rows], target[start:end]
            valid = y != ignore_index if ignore_index is not None else torch.ones_like(y, dtype=torch.bool)
            # Each row's target as a column of this shard (0 where the row has none here), and
            # whether it has one: the target's logit and its gradient live on one shard only.
            y_here = y - first_row
            here = valid & (y_here >= 0) & (y_here < local_rows)
            y_col = torch.where(here, y_here, torch.zeros_like(y_here)).unsqueeze(1)
            here_acc, valid_acc = here.to(acc_dtype), valid.to(acc_dtype)
            # One (chunk x vocabulary) buffer: logits, then probabilities, then their gradient.
            probs = _matmul(h.to(mm_dtype), weight_t_mm, acc_dtype)
            logit_y = probs.gather(1, y_col).squeeze(1) * here_acc
            logit_sum = probs.sum(dim=1) if epsilon > 0 else None
            row_max = probs.amax(dim=1, keepdim=True)
            if shard is not None:
                torch.distributed.all_reduce(row_max, torch.distributed.ReduceOp.MAX, group=shard.group)
            probs.sub_(row_max).exp_()
            sum_exp = probs.sum(dim=1)
            if shard is not None:
                # The softmax over the whole vocabulary: the shards' sums, target logits and
                # (for label smoothing) logit sums, in one all-reduce.
                sums = torch.stack([sum_exp, logit_y] + ([logit_sum] if epsilon > 0 else []))
                torch.distributed.all_reduce(sums, group=shard.group)
                sum_exp, logit_y = sums[0], sums[1]
                logit_sum = sums[2] if epsilon > 0 else None
            log_z = row_max.squeeze(1) + sum_exp.log()
            probs.div_(sum_exp.unsqueeze(1))
            nll_rows = (log_z - logit_y) * valid_acc
            nll += nll_rows.sum()
            if epsilon > 0:
                smooth = ((vocab * log_z - logit_sum) * valid_acc).sum()
                loss += (1.0 - epsilon - eps_i) * nll_rows.sum() + eps_i * smooth
            else:
                loss += nll_rows.sum()
            if use_ul:
                lo, hi = bounds[chunk], bounds[chunk + 1]
                pair_rows, pair_tokens = ul_rows[lo:hi] - start, ul_tokens[lo:hi]
                p_cand = probs[pair_rows, pair_tokens]
                ul_chunk = -torch.log(torch.clamp(1.0 - p_cand, min=1e-5)).sum()
                ul += ul_chunk
                loss += ul_alpha * ul_chunk
            if not (need_h or need_w):
                continue
            # d loss / d logits, built in place of the probabilities.
            row_coef = valid_acc * (1.0 - epsilon - eps_i + vocab * eps_i)
            if use_ul:
                # d(-log(1 - p_c))/dz_j = w_c (delta_jc - p_j), w_c = p_c / (1 - p_c); 0 where clamped.
                weight_c = torch.where(1.0 - p_cand >= 1e-5, p_cand / (1.0 - p_cand), torch.zeros_like(p_cand)) * ul_alpha
                row_coef = row_coef - torch.zeros_like(row_coef).index_add_(0, pair_rows, weight_c)
            grad_logits = probs.mul_(row_coef.unsqueeze(1))
            if use_ul:
                grad_logits.index_put_((pair_rows, pair_tokens), weight_c, accumulate=True)
            grad_logits.scatter_add_(1, y_col, (-(1.0 - epsilon - eps_i) * here_acc).unsqueeze(1))
            if epsilon > 0:
                grad_logits -= (eps_i * valid_acc).unsqueeze(1)
            if need_h:
                grad_h = _matmul(_scaled(grad_logits, mm_dtype, mm_scale), weight_mm, acc_dtype)
                grad_features[rows] = grad_h / mm_scale if mm_scale != 1.0 else grad_h
            if not need_w:
                continue
            h_mm = h.to(mm_dtype)
            if gated and rare_rows_from is None:
                # Rows in their own order (on CUDA, where reading how many rows have a rare target
                # would stall the host once per micro-batch): D * Gate built in place through one
                # (chunk x vocabulary) gate, each row's own target column put back ungated.
                row_rare = rare[torch.where(valid, y, torch.zeros_like(y))].unsqueeze(1)
                own = grad_logits.gather(1, y_col)
                gate = torch.where(row_rare, g2_acc, g1_acc)
                grad_logits.mul_(gate)
                grad_logits.scatter_add_(1, y_col, own * (1.0 - gate.gather(1, y_col)) * here_acc.unsqueeze(1))
            elif gated:
                # Rows [rare_rows_from:] are exactly those with a rare target (chunked_gated_loss
                # orders them so): D * Gate is D with its columns scaled by g1 on the rows before
                # and by g2 on the rows after, each row's own target column left ungated; so W's
                # gated gradient is one matmul, as plain cross-entropy's.
                first_rare = min(max(rare_rows_from - start, 0), end - start)
                if first_rare > 0:
                    grad_logits[:first_rare].mul_(g1_acc)
                if first_rare < end - start:
                    d_r, y_r = grad_logits[first_rare:], y_col[first_rare:]
                    own = d_r.gather(1, y_r)
                    d_r.mul_(g2_acc)
                    d_r.scatter_add_(1, y_r, own * (1.0 - g2_acc[y_r]) * here_acc[first_rare:].unsqueeze(1))
            _matmul(_scaled(grad_logits, mm_dtype, mm_scale).t(), h_mm, acc_dtype, accumulate=grad_weight,
                    alpha=1 / mm_scale)
        if need_h and shard is not None:
            # Every shard's share of d loss / d features: the features are the same on every shard.
            torch.distributed.all_reduce(grad_features, group=shard.group)
        ctx.save_for_backward(grad_features, grad_weight)
        ctx.dtypes = (features.dtype, weight.dtype)
        ctx.mark_non_differentiable(nll, ul)
        return loss, nll, ul

    @staticmethod
    def backward(ctx, grad_loss, _grad_nll, _grad_ul):
        grad_features, grad_weight = ctx.saved_tensors
        features_dtype, weight_dtype = ctx.dtypes
        # In place: the saved gradients are this graph's own and the backward runs once, so no
        # second W-sized tensor is made.
        if grad_features is not None:
            grad_features = grad_features.mul_(grad_loss).to(features_dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_loss).to(weight_dtype)
        return (grad_features, grad_weight) + (None,) * 13


FLOAT16_GRADIENT_SCALE = 2.0 ** 10  # |d loss / d logits| <= 1 + epsilon: far below 65504 scaled
_FLOAT32_OUTPUT_MATMUL: dict = {}


def _float32_output_matmul(device: torch.device) -> bool:
    """Whether torch multiplies float16/bfloat16 matrices into a float32 result on ``device``
    (``out_dtype``: CUDA, torch >= 2.8); probed once per device."""
    if device.type != "cuda":
        return False
    key = device.index
    if key not in _FLOAT32_OUTPUT_MATMUL:
        try:
            a = torch.ones(2, 2, device=device, dtype=torch.float16)
            out = torch.ones(2, 2, device=device)
            torch.addmm(out, a, a, out_dtype=torch.float32, out=out)
            _FLOAT32_OUTPUT_MATMUL[key] = bool(torch.equal(out, torch.full_like(out, 3.0)))
        except (RuntimeError, TypeError, NotImplementedError):
            _FLOAT32_OUTPUT_MATMUL[key] = False
    return _FLOAT32_OUTPUT_MATMUL[key]


def _matmul_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The precision of the chunked path's matmuls. float32 and float64 stay. float16 and
    bfloat16 stay on CUDA (tensor cores; sums in float32) except float16 without float32-output
    matmuls, whose product could overflow 65504; on CPU, where torch emulates both, float32."""
    if dtype in (torch.float32, torch.float64):
        return dtype
    if device.type != "cuda":
        return torch.float32
    if dtype == torch.float16 and not _float32_output_matmul(device):
        return torch.float32
    return dtype


def _scaled(grad: torch.Tensor, mm_dtype: torch.dtype, scale: float) -> torch.Tensor:
    return (grad * scale if scale != 1.0 else grad).to(mm_dtype)


def _matmul(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype, accumulate: Optional[torch.Tensor] = None,
            alpha: float = 1.0) -> torch.Tensor:
    """a @ b in a's precision with the result in ``out_dtype``; with ``accumulate``, added into
    it (times ``alpha``) instead: the product is summed in float32 by the matmul itself where
    the device allows, so no temporary the size of the result is made."""
    if a.dtype == out_dtype:
        if accumulate is None:
            return a.matmul(b) if alpha == 1.0 else a.matmul(b).mul_(alpha)
        return accumulate.addmm_(a, b, alpha=alpha)
    if _float32_output_matmul(a.device) and out_dtype == torch.float32:
        if accumulate is None:
            return torch.mm(a, b, out_dtype=out_dtype).mul_(alpha) if alpha != 1.0 else torch.mm(a, b, out_dtype=out_dtype)
        return torch.addmm(accumulate, a, b, out_dtype=out_dtype, alpha=alpha, out=accumulate)
    product = a.matmul(b).to(out_dtype)
    if accumulate is None:
        return product.mul_(alpha) if alpha != 1.0 else product
    return accumulate.add_(product, alpha=alpha)


def chunked_gated_loss(
    features: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    gates: Optional[Gates],
    ignore_index: Optional[int] = None,
    label_smoothing: float = 0.0,
    chunk_rows: int = 1024,
    unlikelihood: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    unlikelihood_alpha: float = 0.0,
    shard: Optional[VocabShard] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed (loss, nll, ul) equal to ``gated_linear`` followed by ``log_probs``,
    ``label_smoothed_nll_loss`` and (optionally) ``unlikelihood_loss`` on the candidate pairs
    ``unlikelihood`` = (rows, tokens), with rows ascending, but without ever holding the
    whole logits tensor. ``ul`` is the unweighted unlikelihood sum.

    With ``shard`` (vocabulary parallelism), ``weight`` holds this process's rows of the output
    layer and ``target``/``gates`` are global: each process computes its slice of every chunk's
    logits, the softmax is combined over ``shard.group`` (all-reduces of the row maxima and of
    the sums), W's gradient stays this process's slice, and the features' gradient is summed
    over the group. Every process of the group must pass the same features and targets."""
    if chunk_rows < 1:
        raise ValueError(f"chunk size must be a positive number of rows, got {chunk_rows}")
    if shard is not None and unlikelihood is not None:
        raise ValueError("the vocabulary-parallel loss has no unlikelihood term")
    gates = _effective_gates(gates, weight, shard)
    if not torch.is_grad_enabled():
        # Parameters still say requires_grad under no_grad: don't compute their gradients.
        features, weight = features.detach(), weight.detach()
    rare, g1, g2 = (gates.rare, gates.g1, gates.g2) if gates is not None else (None, None, None)
    rare_rows_from = row_order = None
    if gates is not None and _orders_rare_rows(features.device):
        row_order, target, unlikelihood, rare_rows_from = _rare_rows_last(target, gates, unlikelihood, ignore_index)
    ul_rows, ul_tokens = unlikelihood if unlikelihood is not None else (None, None)
    return _ChunkedGatedLoss.apply(
        features, weight, target, rare, g1, g2, float(label_smoothing), ignore_index, int(chunk_rows),
        ul_rows, ul_tokens, float(unlikelihood_alpha), rare_rows_from, shard, row_order,
    )


def _orders_rare_rows(device: torch.device) -> bool:
    """Whether the chunked path orders rows by rare target (no (chunk x vocabulary) gate; one
    device-to-host read per call): yes on CPU, not on CUDA, where that read would stall the host."""
    return device.type != "cuda"


def _rare_rows_last(target, gates: Gates, pairs, ignore_index: Optional[int] = None):
    """An order of the rows in which those whose target is rare come last (the loss is a sum over
    rows, so their order is free): W's gated gradient then needs no per-entry gate. Returns
    (the order, the targets in it, unlikelihood pairs remapped with rows ascending, index of the
    first row with a rare target). Rows whose target is ``ignore_index`` count as not rare."""
    valid = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
    row_is_rare = gates.rare[torch.where(valid, target, torch.zeros_like(target))] & valid
    order = torch.argsort(row_is_rare.to(torch.uint8), stable=True)
    rare_rows_from = target.numel() - int(row_is_rare.sum())
    if pairs is not None:
        new_row = torch.empty_like(order)
        new_row[order] = torch.arange(order.numel(), device=order.device)
        rows = new_row[pairs[0]]
        ascending = torch.argsort(rows, stable=True)
        pairs = (rows[ascending], pairs[1][ascending])
    return order, target[order], pairs, rare_rows_from


MIN_AUTO_CHUNK_ROWS = 256


def auto_chunk_rows(rows: int, vocab: int, dim: int) -> int:
    """Rows per chunk for ``chunk_rows=None``: torch's ``aspect_ratio:2`` rule for its chunked
    ``linear_cross_entropy`` (a chunk's logits take about half the memory of the (rows x dim)
    features), but at least 256 rows, below which the matmuls of a chunk run slower (measured
    on CPU at d=512); 0, one logits tensor, when that would be a single chunk."""
    chunks_per_batch = -(-vocab // dim)
    chunk = 1 << max(0, math.ceil(math.log2(max(1, -(-rows // chunks_per_batch)))))
    chunk = max(MIN_AUTO_CHUNK_ROWS, chunk // 2)
    return 0 if chunk >= rows else chunk


def gated_loss(
    features: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    gates: Optional[Gates],
    ignore_index: Optional[int] = None,
    label_smoothing: float = 0.0,
    unlikelihood_alpha: float = 0.0,
    chunk_rows: Optional[int] = 0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The objective of the criteria: summed (loss, nll, ul) for ``features`` (B*T, d),
    output embedding ``weight`` (V, d) and ``target`` (B, T).

    loss = (label-smoothed) NLL + unlikelihood_alpha * UL, with the W gradient gated by
    ``gates`` (None: plain). ``chunk_rows`` > 0 selects the chunked path, which never holds
    the (B*T, V) logits; 0 the single-logits-tensor path; None picks by shape
    (:func:`auto_chunk_rows`). Both paths give the same values and gradients up to float
    rounding.
    """
    if target.dim() != 2:
        raise ValueError(f"gated_loss needs targets of shape (batch, length), got {tuple(target.shape)}")
    flat_target = target.reshape(-1)
    if chunk_rows is None:
        chunk_rows = auto_chunk_rows(flat_target.numel(), weight.size(0), weight.size(1))
    pairs = unlikelihood_candidates(target, ignore_index) if unlikelihood_alpha > 0 else None
    if chunk_rows > 0:
        return chunked_gated_loss(
            features, weight, flat_target, gates, ignore_index, label_smoothing, chunk_rows,
            pairs, unlikelihood_alpha,
        )
    gates = _effective_gates(gates, weight)
    rare_rows_from = None
    if gates is not None:
        # Rows with a rare target last: the backward gates W's gradient with two matmuls over
        # row blocks.
        order, flat_target, pairs, rare_rows_from = _rare_rows_last(flat_target, gates, pairs, ignore_index)
        features = features[order]
    lprobs = log_probs(gated_linear(features, weight, flat_target, gates, rare_rows_from, ignore_index))
    loss, nll = label_smoothed_nll_loss(lprobs, flat_target, label_smoothing, ignore_index)
    if pairs is None:
        return loss, nll, torch.zeros_like(nll)
    ul = unlikelihood_loss(lprobs, *pairs)
    return loss + unlikelihood_alpha * ul, nll, ul
