"""Isotropy of an embedding matrix, I(W) (Arora et al. 2016; Mu and Viswanath 2018; the
AGG paper, eq. 3).

    I(W) = min_a Z(a) / max_a Z(a),   Z(a) = sum_k exp(w_k . a),

with ``a`` running over the eigenvectors of W^T W. I(W) lies in (0, 1]; 1 means the
partition function looks the same in every principal direction (isotropic), values near 0
mean the rows crowd into a narrow cone.

``exp(w_k . a)`` overflows float32 as soon as a projection exceeds about 88 (trained output
embeddings get there), and the ratio of two huge sums loses everything. So log Z is computed
with ``logsumexp`` in float64 and I(W) = exp(min log Z - max log Z).

The eigenvectors are those ``torch.linalg.eigh`` returns for W^T W in float64. Z(a) and
Z(-a) differ, so an eigenvector's sign (LAPACK's choice) is part of the metric, as in the
implementations this measure comes from.

Needs torch only (numpy arrays are accepted), no fairseq.
"""

from typing import Optional, Union

import numpy as np
import torch

__all__ = ["log_partition", "isotropy"]

ArrayLike = Union[torch.Tensor, np.ndarray]


def _as_float64_matrix(weight: ArrayLike, rows: Optional[ArrayLike]) -> torch.Tensor:
    if isinstance(weight, np.ndarray):
        weight = torch.from_numpy(weight)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"expected a torch tensor or numpy array, got {type(weight).__name__}")
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    if w.dim() != 2:
        raise ValueError(f"expected an (N, d) embedding matrix, got shape {tuple(w.shape)}")
    if rows is not None:
        if isinstance(rows, np.ndarray):
            rows = torch.from_numpy(rows)
        rows = torch.as_tensor(rows, device="cpu")
        if rows.dtype == torch.bool:
            if rows.numel() != w.size(0):
                raise ValueError(f"boolean row mask covers {rows.numel()} rows, the matrix has {w.size(0)}")
        else:
            rows = rows.long()
        w = w[rows]
    if w.size(0) == 0:
        raise ValueError("I(W) of an empty set of rows is undefined")
    if not torch.isfinite(w).all():
        raise ValueError("the embedding matrix holds non-finite values")
    return w


def log_partition(weight: ArrayLike, rows: Optional[ArrayLike] = None) -> torch.Tensor:
    """log Z(a) for each eigenvector ``a`` of W^T W (float64, shape (d,)), in the order of
    ``torch.linalg.eigh`` (ascending eigenvalues). ``rows`` (indices or a boolean mask)
    restricts W to a group of rows, eigenvectors included."""
    w = _as_float64_matrix(weight, rows)
    _, eigvecs = torch.linalg.eigh(w.t() @ w)  # columns are unit eigenvectors
    return torch.logsumexp(w @ eigvecs, dim=0)


def isotropy(weight: ArrayLike, rows: Optional[ArrayLike] = None) -> float:
    """I(W) = min_a Z(a) / max_a Z(a) over the eigenvectors of W^T W.

    ``weight``: (N, d) embedding matrix (torch tensor or numpy array; any float dtype, any
    device). ``rows``: optional indices or boolean mask of a token group; the group's I(W)
    uses only its rows (for the eigenvectors as well as for Z).
    """
    log_z = log_partition(weight, rows)
    return float(torch.exp(log_z.min() - log_z.max()))
