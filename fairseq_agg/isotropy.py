"""Isotropy of an embedding matrix: I(W) (Arora et al. 2016; Mu and Viswanath 2018; the AGG
paper, eq. 3) and IsoScore (Rudman et al. 2022).

    I(W) = min_a Z(a) / max_a Z(a),   Z(a) = sum_k exp(w_k . a),

with ``a`` running over unit vectors. Like Mu and Viswanath, the minimum and maximum are taken
over a finite set of directions built from the eigenvectors of W^T W: by default over **both
signs of every eigenvector**, {+a_1, -a_1, ..., +a_d, -a_d}. An eigenvector's sign is arbitrary
(LAPACK returns either), while Z(a) != Z(-a); the set of both signs does not depend on that
choice, so neither does I(W), and I(-W) = I(W). It is also the closer approximation of the
definition: both signs are unit vectors, so min and max over them are closer to the minimum and
maximum over all unit vectors.

``signs="as_returned"`` keeps the older variant, min and max over the d eigenvectors with the
signs ``torch.linalg.eigh`` happens to return, which the common implementations of this measure
use. Its value changes when an eigenvector's sign flips (a perturbation of the weights far below
their own size can do that). The two relate simply: the as-returned value is at least the
both-signs value, whatever the signs (the both-signs min and max run over a superset), and the
both-signs value is the smallest as-returned value over all 2^d sign choices unless its minimum
and maximum are the two signs of one eigenvector (a narrow cone: Z is largest along the cone's
axis and smallest against it), where it can be smaller still.

``exp(w_k . a)`` overflows float32 as soon as a projection exceeds about 88 (trained output
embeddings get there), and the ratio of two huge sums loses everything. So log Z is computed
with ``logsumexp`` in float64 and I(W) = exp(min log Z - max log Z).

IsoScore (Rudman, Gillman, Rayne and Eickhoff, ACL Findings 2022; the ``isoscore`` package) is
computed from the covariance of the rows instead: the variances along the principal axes,
rescaled to norm sqrt(d), their distance delta from the all-ones vector, normalised by
sqrt(2 (d - sqrt d)); then k = (d - delta^2 (d - sqrt d))^2 / d^2 and IsoScore = (d k - 1) / (d - 1).
It lies in [0, 1]: 1 when the rows spread equally in every direction, 0 when they lie on a line.
Unlike I(W) it ignores the common mean of the rows (a covariance is centred).

Needs torch only (numpy arrays are accepted), no fairseq.
"""

import math
from typing import Optional, Union

import numpy as np
import torch

__all__ = ["SIGNS", "log_partition", "isotropy", "isotropy_as_returned_signs", "isoscore"]

ArrayLike = Union[torch.Tensor, np.ndarray]

# "both": min and max of Z over +a and -a for every eigenvector a (the default, sign-independent);
# "as_returned": over the eigenvectors with the signs torch.linalg.eigh returns.
SIGNS = ("both", "as_returned")


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
        raise ValueError("isotropy of an empty set of rows is undefined")
    if not torch.isfinite(w).all():
        raise ValueError("the embedding matrix holds non-finite values")
    return w


def _check_signs(signs: str) -> None:
    if signs not in SIGNS:
        raise ValueError(f"signs must be one of {', '.join(SIGNS)}, got {signs!r}")


def log_partition(weight: ArrayLike, rows: Optional[ArrayLike] = None, signs: str = "both") -> torch.Tensor:
    """log Z over the directions I(W) uses (float64): with ``signs="both"`` shape (2 d,), log Z(a_j)
    for the eigenvectors a_j of W^T W in the order of ``torch.linalg.eigh`` (ascending
    eigenvalues), then log Z(-a_j) in the same order; with ``signs="as_returned"`` shape (d,),
    log Z(a_j) only. ``rows`` (indices or a boolean mask) restricts W to a group of rows,
    eigenvectors included."""
    _check_signs(signs)
    w = _as_float64_matrix(weight, rows)
    _, eigvecs = torch.linalg.eigh(w.t() @ w)  # columns are unit eigenvectors
    proj = w @ eigvecs
    if signs == "as_returned":
        return torch.logsumexp(proj, dim=0)
    return torch.cat([torch.logsumexp(proj, dim=0), torch.logsumexp(-proj, dim=0)])


def isotropy(weight: ArrayLike, rows: Optional[ArrayLike] = None, signs: str = "both") -> float:
    """I(W) = min Z(a) / max Z(a), over both signs of every eigenvector of W^T W (default) or,
    with ``signs="as_returned"``, over the eigenvectors with the signs LAPACK returned.

    ``weight``: (N, d) embedding matrix (torch tensor or numpy array; any float dtype, any
    device). ``rows``: optional indices or boolean mask of a token group; the group's I(W)
    uses only its rows (for the eigenvectors as well as for Z).
    """
    log_z = log_partition(weight, rows, signs)
    return float(torch.exp(log_z.min() - log_z.max()))


def isotropy_as_returned_signs(weight: ArrayLike, rows: Optional[ArrayLike] = None) -> float:
    """The older, sign-dependent I(W): min and max of Z over the eigenvectors with the signs
    ``torch.linalg.eigh`` returned (see the module's docstring)."""
    return isotropy(weight, rows, signs="as_returned")


def isoscore(weight: ArrayLike, rows: Optional[ArrayLike] = None) -> float:
    """IsoScore of the rows of ``weight`` (or of the ``rows`` given), in float64; the value of
    ``IsoScore.IsoScore(points)`` of the ``isoscore`` package. NaN for fewer than two rows (no
    covariance); a matrix with one column scores 1."""
    w = _as_float64_matrix(weight, rows)
    n_rows, d = w.shape
    if n_rows < 2:
        return float("nan")
    if d == 1:
        return 1.0
    centred = w - w.mean(dim=0, keepdim=True)
    # variances along the principal axes: eigenvalues of the covariance (symmetric, PSD)
    variances = torch.linalg.eigvalsh(centred.t() @ centred / (n_rows - 1)).clamp(min=0.0)
    norm = torch.linalg.vector_norm(variances)
    if norm == 0:
        return float("nan")  # all rows equal: no direction at all
    normalised = variances * math.sqrt(d) / norm
    defect = float(torch.linalg.vector_norm(normalised - 1.0)) / math.sqrt(2 * (d - math.sqrt(d)))
    k = (d - defect ** 2 * (d - math.sqrt(d))) ** 2 / d ** 2
    return float((d * k - 1) / (d - 1))
