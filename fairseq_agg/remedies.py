"""Remedies for degenerate (anisotropic) embeddings other than AGG, in plain PyTorch.

Needs torch only (no fairseq); numpy arrays are accepted where noted.

* **Coupled Adam** (Stollenwerk & Stollenwerk, "Better Embeddings with Coupled Adam", 2025):
  Adam(W) in which all rows of an embedding matrix share one second moment, so that every
  row gets the same effective learning rate. :func:`coupled_adam_step` is the update,
  :class:`CoupledAdam` the ``torch.optim`` optimizer around it (fairseq's ``coupled_adam``,
  in :mod:`fairseq_agg.optim.coupled_adam`, wraps that class).
* **CosReg** (Gao et al., "Representation Degeneration Problem in Training Natural Language
  Generation Models", ICLR 2019): :func:`mean_pairwise_cosine`, the regulariser.
* **Post-hoc** (Mu & Viswanath, "All-but-the-Top", ICLR 2018): :func:`remove_mean` and
  :func:`all_but_the_top`.

The Coupled Adam update, for a parameter ``p`` with gradient ``g`` at step ``t`` (1-based)::

    m  = beta1 * m + (1 - beta1) * g
    v  = beta2 * v + (1 - beta2) * g**2          # plain Adam: per element
    v  = beta2 * v + (1 - beta2) * mean_rows(g**2)  # coupled: one value per column, shape (1, d)
    p  = p - lr * weight_decay * p               # decoupled weight decay (AdamW)
    p  = p - lr * sqrt(1 - beta2**t) / (1 - beta1**t) * m / (sqrt(v) + eps)

The paper keeps Adam's per-element ``v`` and averages it over the vocabulary before it is
used. The exponential average and the mean over rows are both linear, so the mean of the
per-element ``v`` equals the exponential average of the row-mean of ``g**2``: storing that
(1, d) row is the same update with V times less optimizer memory for the matrix, and it is
what this module does. The first moment stays per element. Bias correction is Adam's.

The formula, including where ``eps`` sits, is fairseq's ``adam`` optimizer (also an AdamW),
operation for operation, so that an uncoupled parameter gets exactly the update
``--optimizer adam`` gives it. ``torch.optim.AdamW`` divides by ``sqrt(v / (1 - beta2**t)) +
eps`` instead, i.e. its ``eps`` is ``sqrt(1 - beta2**t)`` times fairseq's; with ``eps = 0`` the
two are the same update.
"""

import math
import operator
from typing import Iterable, Tuple

import torch

__all__ = [
    "coupled_adam_step",
    "CoupledAdam",
    "mean_pairwise_cosine",
    "remove_mean",
    "all_but_the_top",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


# -- Coupled Adam ----------------------------------------------------------------------------------
def coupled_second_moment_shape(param_shape: torch.Size) -> Tuple[int, ...]:
    """Shape of the second moment of a coupled (V, d) matrix: one value per column."""
    if len(param_shape) != 2:
        raise ValueError(
            f"a coupled parameter must be a (vocabulary, dim) matrix, got shape {tuple(param_shape)}"
        )
    return (1, param_shape[1])


def coupled_adam_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    *,
    lr: float,
    betas: Tuple[float, float],
    eps: float,
    weight_decay: float,
    coupled: bool,
) -> None:
    """One AdamW update of ``param`` in place (module docstring for the formula).

    ``step`` is the number of this update, counting from 1. ``exp_avg`` has the shape of
    ``param``; ``exp_avg_sq`` too, or (1, d) when ``coupled`` (``param`` then is a (V, d)
    embedding matrix whose rows share the second moment). Both moments are updated in place.
    ``param``, ``grad`` and the moments must share one floating dtype (float32 or float64:
    callers upcast half-precision data, as :class:`CoupledAdam` does).
    """
    if step < 1:
        raise ValueError(f"step counts updates from 1, got {step}")
    beta1, beta2 = betas
    if coupled:
        expected = coupled_second_moment_shape(param.shape)
        if tuple(exp_avg_sq.shape) != expected:
            raise ValueError(
                f"the second moment of a coupled {tuple(param.shape)} matrix has shape {expected}, "
                f"got {tuple(exp_avg_sq.shape)}"
            )
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    if coupled:
        exp_avg_sq.mul_(beta2).add_(grad.square().mean(dim=0, keepdim=True), alpha=1 - beta2)
    else:
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = exp_avg_sq.sqrt().add_(eps)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr * math.sqrt(bias_correction2) / bias_correction1
    if weight_decay != 0:
        param.add_(param, alpha=-weight_decay * lr)
    param.addcdiv_(exp_avg, denom, value=-step_size)


class CoupledAdam(torch.optim.Optimizer):
    """AdamW whose parameter groups with ``coupled=True`` hold (V, d) embedding matrices that
    get one second moment per column, shared by all V rows (Coupled Adam). Groups without
    the flag are updated exactly as fairseq's ``adam`` (an AdamW) updates them.

    Example, an untied language model::

        optimizer = CoupledAdam(
            [{"params": [model.embed.weight, model.out.weight], "coupled": True},
             {"params": other_parameters}],
            lr=1e-3, betas=(0.9, 0.98), weight_decay=0.01)

    Half-precision parameters are updated through float32 copies (moments in float32), as
    fairseq's ``adam`` does, so the class also serves fairseq's memory-efficient fp16/bf16.
    amsgrad is not implemented.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        coupled: bool = False,
    ):
        if not lr >= 0.0:
            raise ValueError(f"learning rate must be >= 0, got {lr}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        betas = tuple(float(b) for b in betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight decay must be >= 0, got {weight_decay}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, coupled=coupled)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        if "amsgrad" in param_group:
            raise ValueError("CoupledAdam does not implement amsgrad; drop the option")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["coupled"]:
            for p in group["params"]:
                coupled_second_moment_shape(p.shape)  # refuses anything but a matrix

    # What fairseq's wrappers ask of the optimizer they wrap.
    supports_memory_efficient_fp16 = True
    # Coupling needs each embedding matrix as its own (V, d) tensor; a flat vector of all
    # parameters has no rows to share a second moment over.
    supports_flat_params = False

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            coupled = group["coupled"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("CoupledAdam does not support sparse gradients")
                if grad.dtype in _LOW_PRECISION:
                    grad = grad.float()
                data = p.data.float() if p.dtype in _LOW_PRECISION else p.data
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(data)
                    second_shape = coupled_second_moment_shape(data.shape) if coupled else data.shape
                    state["exp_avg_sq"] = data.new_zeros(second_shape)
                else:
                    # Loaded state may sit on another device or, after fairseq's
                    # memory-efficient fp16 loading, in another dtype.
                    state["exp_avg"] = state["exp_avg"].to(data)
                    state["exp_avg_sq"] = state["exp_avg_sq"].to(data)
                state["step"] += 1
                coupled_adam_step(
                    data, grad, state["exp_avg"], state["exp_avg_sq"], state["step"],
                    lr=group["lr"], betas=group["betas"], eps=group["eps"],
                    weight_decay=group["weight_decay"], coupled=coupled,
                )
                if data is not p.data:
                    p.data.copy_(data)
        return loss


# -- CosReg ------------------------------------------------------------------------------------------
def mean_pairwise_cosine(weight: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean cosine similarity over the N (N - 1) ordered pairs of distinct rows of ``weight``
    (N, d), differentiable, without an N x N matrix.

    With u_i = w_i / |w_i|, sum over i != j of u_i . u_j = |sum_i u_i|^2 - sum_i |u_i|^2.
    A row of norm at most ``eps`` has no direction: u_i = 0, a cosine of 0 with every row
    (which subtracting sum_i |u_i|^2, not N, keeps exact) and no gradient. fairseq initialises
    the padding row to zero; through a clamped norm its gradient would be of order 1 / eps,
    enough to dominate --clip-norm and overflow float16 in the first update.
    Computed in float32 at least (float64 stays float64); the result has that dtype.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected an (N, d) matrix, got shape {tuple(weight.shape)}")
    n = weight.size(0)
    if n < 2:
        raise ValueError(f"the mean pairwise cosine needs at least 2 rows, got {n}")
    w = weight.float() if weight.dtype in _LOW_PRECISION else weight
    norms = w.norm(dim=1, keepdim=True)
    unit = torch.where(norms > eps, w / norms.clamp_min(eps), torch.zeros_like(w))
    total = unit.sum(dim=0)
    return (total.dot(total) - unit.square().sum()) / (n * (n - 1))


# -- post-hoc remedies -------------------------------------------------------------------------------
def _as_float64(weight) -> Tuple[torch.Tensor, bool]:
    """(float64 torch copy of ``weight``, whether ``weight`` was a numpy array)."""
    is_numpy = type(weight).__module__ == "numpy"
    if is_numpy:
        w = torch.as_tensor(weight)
    elif isinstance(weight, torch.Tensor):
        w = weight.detach()
    else:
        raise TypeError(f"expected a torch tensor or numpy array, got {type(weight).__name__}")
    w = w.to(torch.float64)
    if w.dim() != 2:
        raise ValueError(f"expected an (N, d) embedding matrix, got shape {tuple(w.shape)}")
    if w.size(0) == 0:
        raise ValueError("the embedding matrix has no rows")
    if not torch.isfinite(w).all():
        raise ValueError("the embedding matrix holds non-finite values")
    return w, is_numpy


def _returned(w: torch.Tensor, is_numpy: bool):
    return w.cpu().numpy() if is_numpy else w


def remove_mean(weight):
    """``weight`` (N, d) minus its mean row, in float64; a numpy array for numpy input, else a
    float64 tensor on the input's device."""
    w, is_numpy = _as_float64(weight)
    return _returned(w - w.mean(dim=0, keepdim=True), is_numpy)


def all_but_the_top(weight, num_directions: int):
    """All-but-the-top (Mu & Viswanath 2018): subtract the mean row, then remove each row's
    projection on the top ``num_directions`` principal directions of the centred matrix
    (its leading right singular vectors). Float64; a numpy array for numpy input, else a
    float64 tensor on the input's device. ``num_directions`` 0 is :func:`remove_mean`.
    Mu & Viswanath suggest about d / 100 directions.
    """
    try:
        if isinstance(num_directions, bool):
            raise TypeError
        num_directions = operator.index(num_directions)  # numpy integers too, not floats
    except TypeError:
        raise TypeError(f"num_directions must be an integer, got {num_directions!r}") from None
    w, is_numpy = _as_float64(weight)
    n, d = w.shape
    limit = min(n, d)
    if not 0 <= num_directions <= limit:
        raise ValueError(
            f"num_directions must lie in [0, min(N, d)] = [0, {limit}] for an ({n}, {d}) matrix, "
            f"got {num_directions}"
        )
    centred = w - w.mean(dim=0, keepdim=True)
    if num_directions == 0:
        return _returned(centred, is_numpy)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    top = vh[:num_directions]  # (D, d), orthonormal rows
    return _returned(centred - (centred @ top.T) @ top, is_numpy)
