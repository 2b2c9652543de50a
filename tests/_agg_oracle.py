"""Independent reference for the AGG tests of the plain API and the Hugging Face trainer.

Nothing here calls ``fairseq_agg``: the rare group and gates are recomputed from the labels of
the completed updates, and the gradient comes from the paper's three-logit formulation
(eqs. 9-10, as ``scripts/bench.py``'s ``naive_three_logit_loss``):

    z0 = h W~^T,   z_l = G_l * (h~ W^T) + (1 - G_l) * (h~ W~^T)   (l = 1, 2)
    L  = CE(z0) + 1(y not rare) CE(z1) + 1(y rare) CE(z2)

(~ = detached; G_l[i, k] = g_l[k] for rare k != y_i, 1 otherwise; CE label-smoothed as
``F.cross_entropy(label_smoothing=eps)``). Its value is twice the cross-entropy; its gradient
is AGG's.
"""

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100


def reference_gates(
    history: Sequence[torch.Tensor], vocab: int, alpha: float, window: Optional[int], nspecial: int = 0
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rare, g1, g2) from the target ids of each completed update (oldest first)."""
    slots = list(history)[-window:] if window else list(history)
    avg = torch.zeros(vocab, dtype=torch.float64)
    if slots:
        for ids in slots:
            avg += torch.bincount(ids.reshape(-1), minlength=vocab).to(torch.float64)
        avg /= len(slots)
    rare = avg < alpha
    rare[:nspecial] = False
    ones = torch.ones_like(avg)
    g1 = torch.where(rare, avg, ones)
    if rare.any():
        mean_rare = avg[rare].mean()
        g2 = torch.where(rare, (avg / mean_rare).clamp(max=1.0), ones) if mean_rare > 0 else torch.where(rare, 0 * ones, ones)
    else:
        g2 = ones
    return rare, g1, g2


def three_logit_loss(h, w, y, rare, g1, g2, eps: float = 0.0) -> torch.Tensor:
    """Summed over the rows with y != -100; h (M, d), w (V, d), y (M,)."""
    keep = y != IGNORE
    h, y = h[keep], y[keep]
    rows = y.numel()
    gate1 = g1.to(h.dtype).expand(rows, -1).clone()
    gate2 = g2.to(h.dtype).expand(rows, -1).clone()
    gate1.scatter_(1, y.unsqueeze(1), 1.0)
    gate2.scatter_(1, y.unsqueeze(1), 1.0)
    z0 = h @ w.detach().t()
    z1 = gate1 * (h.detach() @ w.t()) + (1 - gate1) * (h.detach() @ w.detach().t())
    z2 = gate2 * (h.detach() @ w.t()) + (1 - gate2) * (h.detach() @ w.detach().t())
    rare_row = rare[y].to(h.dtype)

    def ce(z):
        return F.cross_entropy(z, y, label_smoothing=eps, reduction="none")

    return ce(z0).sum() + (ce(z1) * (1 - rare_row)).sum() + (ce(z2) * rare_row).sum()


def zipf_tokens(n: int, length: int, vocab: int, seed: int, ignore_tail: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """(input ids, labels) of n sequences: Zipf-distributed ids (a mix of frequent and rare
    tokens); every third sequence has its last two labels ignored."""
    gen = torch.Generator().manual_seed(seed)
    probs = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64) ** 1.1
    ids = torch.multinomial(probs, n * length, replacement=True, generator=gen).view(n, length)
    labels = ids.clone()
    if ignore_tail:
        labels[::3, -2:] = IGNORE
    return ids, labels


class TinyLM(nn.Module):
    """A hand-written causal LM: embeddings, causal running mean, tanh MLP, layer norm and a
    bias-free output head (tied to the input embedding or not)."""

    def __init__(self, vocab: int, dim: int, length: int, tied: bool, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(0.1 * torch.randn(length, dim))
        self.mix = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def features(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos[: ids.size(1)]
        steps = torch.arange(1, ids.size(1) + 1, dtype=x.dtype, device=x.device).view(1, -1, 1)
        x = torch.cumsum(x, dim=1) / steps  # position t sees positions <= t
        return self.norm(torch.tanh(self.mix(x)) + x)


def assert_grads_match(got: dict, want: dict, what: str, rtol: float = 1e-14, atol: float = 1e-14) -> None:
    """float64 rounding (observed: 3e-15 relative); the gates are float64 in a float64 run."""
    assert set(got) == set(want), f"{what}: parameters differ: {sorted(set(got) ^ set(want))}"
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=lambda m: f"{what}, {name}: {m}")


def named_grads(model: nn.Module) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def shifted_targets(labels_list: List[torch.Tensor]) -> torch.Tensor:
    """The counted targets of one update: labels[:, 1:] without -100, all micro-batches."""
    flat = torch.cat([lab[:, 1:].reshape(-1) for lab in labels_list])
    return flat[flat != IGNORE]
