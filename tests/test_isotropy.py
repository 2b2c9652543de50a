"""I(W) against references written independently of fairseq_agg.isotropy.

The eigenvectors are those of torch.linalg.eigh on W^T W in float64 (an eigenvector's sign
is part of the definition's input: Z(a) != Z(-a)); everything after that is recomputed here
with numpy, plain float64 exp, or mpmath.
"""

import math

import numpy as np
import pytest
import torch

from fairseq_agg.isotropy import isotropy, log_partition


def _eigvecs(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, dtype=np.float64)
    _, vecs = torch.linalg.eigh(torch.from_numpy(w.T @ w))
    return vecs.numpy()


def direct_isotropy(w: np.ndarray) -> float:
    """The definition, evaluated naively in float64 (fine while exp does not overflow)."""
    w = np.asarray(w, dtype=np.float64)
    z = np.exp(w @ _eigvecs(w)).sum(axis=0)
    return float(z.min() / z.max())


def mpmath_isotropy(w: np.ndarray, dps: int = 50) -> float:
    """The definition in arbitrary precision: no overflow whatever the projections."""
    import mpmath

    w = np.asarray(w, dtype=np.float64)
    proj = w @ _eigvecs(w)
    with mpmath.workdps(dps):
        zs = [mpmath.fsum(mpmath.exp(mpmath.mpf(float(x))) for x in proj[:, j]) for j in range(proj.shape[1])]
        return float(min(zs) / max(zs))


def shifted_log_z(w: np.ndarray) -> np.ndarray:
    """log Z by the max-shift trick, written out in numpy float64."""
    w = np.asarray(w, dtype=np.float64)
    proj = w @ _eigvecs(w)
    top = proj.max(axis=0)
    return top + np.log(np.exp(proj - top).sum(axis=0))


def narrow_cone(n=400, d=16, scale=3.0, noise=0.05, seed=0):
    rng = np.random.default_rng(seed)
    common = rng.normal(size=d)
    common *= scale / np.linalg.norm(common)
    return common + noise * rng.normal(size=(n, d))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [(50, 8), (1000, 32), (300, 64)])
def test_random_matrices_match_direct_definition(seed, shape):
    rng = np.random.default_rng(seed)
    n, d = shape
    w = rng.normal(scale=d ** -0.5, size=shape)
    got = isotropy(torch.from_numpy(w).float())  # float32 input is promoted internally
    want = direct_isotropy(w.astype(np.float32))
    assert 0.0 < got <= 1.0
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
    # numpy input is accepted too
    assert isotropy(w) == pytest.approx(direct_isotropy(w), rel=1e-9, abs=1e-12)


def test_isotropic_rows_score_high_and_a_narrow_cone_scores_low():
    rng = np.random.default_rng(0)
    # Random Gaussian rows in a small space are close to isotropic.
    iso = isotropy(rng.normal(scale=0.25, size=(20000, 8)))
    cone = narrow_cone()
    degenerate = isotropy(cone)
    assert iso > 0.9
    assert degenerate < 0.05
    assert degenerate == pytest.approx(direct_isotropy(cone), rel=1e-9)
    assert degenerate == pytest.approx(mpmath_isotropy(cone), rel=1e-9)


def test_finite_and_correct_where_float32_exp_overflows():
    # Row norms around 120: exp(w . a) overflows float32 (limit ~88.7) along the cone axis.
    w = narrow_cone(n=500, d=32, scale=120.0, noise=2.0, seed=3)
    w32 = torch.from_numpy(w).float()
    _, vecs = torch.linalg.eigh(w32.double().t() @ w32.double())
    naive = torch.exp(w32 @ vecs.float()).sum(dim=0)
    assert not torch.isfinite(naive).all(), "the test matrix must overflow the naive float32 sum"

    got = isotropy(w32)
    assert math.isfinite(got) and 0.0 <= got <= 1.0
    want = mpmath_isotropy(w32.double().numpy(), dps=80)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-300)
    np.testing.assert_allclose(log_partition(w32).numpy(), shifted_log_z(w32.double().numpy()), rtol=1e-9)


def test_moderate_overflow_gives_a_value_inside_float64_range():
    # Projections big enough to overflow float32 but with I(W) still representable.
    rng = np.random.default_rng(5)
    w = rng.normal(size=(200, 4)) * np.array([60.0, 40.0, 30.0, 20.0])
    w[:5, 0] += 100.0  # a few rows far out along the first axis
    got = isotropy(torch.from_numpy(w).float())
    want = mpmath_isotropy(torch.from_numpy(w).float().double().numpy(), dps=60)
    assert 0.0 < got < 1.0
    assert got == pytest.approx(want, rel=1e-9)


def test_group_rows_use_only_that_group():
    rng = np.random.default_rng(7)
    w = np.concatenate([rng.normal(scale=0.3, size=(300, 8)), narrow_cone(n=100, d=8)])
    idx = np.arange(300, 400)
    mask = np.zeros(400, dtype=bool)
    mask[idx] = True
    by_idx = isotropy(w, rows=torch.from_numpy(idx))
    by_mask = isotropy(w, rows=torch.from_numpy(mask))
    assert by_idx == pytest.approx(direct_isotropy(w[idx]), rel=1e-9)
    assert by_mask == pytest.approx(by_idx, rel=1e-12)
    assert isotropy(w, rows=np.arange(300)) == pytest.approx(direct_isotropy(w[:300]), rel=1e-9)


def test_bad_inputs():
    with pytest.raises(ValueError):
        isotropy(torch.zeros(3))
    with pytest.raises(ValueError):
        isotropy(torch.ones(4, 2), rows=torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError):
        isotropy(torch.tensor([[1.0, float("nan")]]))
