"""I(W) and IsoScore against references written independently of fairseq_agg.isotropy.

I(W) (the default): min and max of Z over both signs of every eigenvector of W^T W. The
references take their eigenvectors from numpy (another LAPACK call, with its own signs), and
evaluate Z in plain float64 or in mpmath's arbitrary precision. The older variant
(``signs="as_returned"``) uses the eigenvectors torch.linalg.eigh returns with their signs, so
its references take those. IsoScore is checked against the ``isoscore`` package.
"""

import math

import numpy as np
import pytest
import torch

from fairseq_agg.isotropy import isoscore, isotropy, isotropy_as_returned_signs, log_partition


def _numpy_eigvecs(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, dtype=np.float64)
    return np.linalg.eigh(w.T @ w)[1]


def _torch_eigvecs(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, dtype=np.float64)
    return torch.linalg.eigh(torch.from_numpy(w.T @ w))[1].numpy()


def brute_force_both_signs(w: np.ndarray) -> float:
    """The both-signs definition in plain float64 (fine while exp does not overflow)."""
    w = np.asarray(w, dtype=np.float64)
    proj = w @ _numpy_eigvecs(w)
    z = np.concatenate([np.exp(proj).sum(axis=0), np.exp(-proj).sum(axis=0)])
    return float(z.min() / z.max())


def mpmath_both_signs(w: np.ndarray, dps: int = 50) -> float:
    """The both-signs definition in arbitrary precision: no overflow whatever the projections."""
    import mpmath

    w = np.asarray(w, dtype=np.float64)
    proj = w @ _numpy_eigvecs(w)
    with mpmath.workdps(dps):
        zs = []
        for j in range(proj.shape[1]):
            for sign in (1, -1):
                zs.append(mpmath.fsum(mpmath.exp(mpmath.mpf(sign * float(x))) for x in proj[:, j]))
        return float(min(zs) / max(zs))


def direct_as_returned(w: np.ndarray) -> float:
    """The as-returned-signs variant, naively in float64."""
    w = np.asarray(w, dtype=np.float64)
    z = np.exp(w @ _torch_eigvecs(w)).sum(axis=0)
    return float(z.min() / z.max())


def narrow_cone(n=400, d=16, scale=3.0, noise=0.05, seed=0):
    rng = np.random.default_rng(seed)
    common = rng.normal(size=d)
    common *= scale / np.linalg.norm(common)
    return common + noise * rng.normal(size=(n, d))


def with_flipped_eigenvectors(monkeypatch, flips):
    """torch.linalg.eigh returning its eigenvectors with the given column signs."""
    real = torch.linalg.eigh

    def flipped(a, *args, **kw):
        values, vectors = real(a, *args, **kw)
        return values, vectors * torch.as_tensor(flips, dtype=vectors.dtype)

    monkeypatch.setattr(torch.linalg, "eigh", flipped)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [(50, 8), (1000, 32), (300, 64)])
def test_random_matrices_match_the_both_signs_brute_force(seed, shape):
    rng = np.random.default_rng(seed)
    n, d = shape
    w = rng.normal(scale=d ** -0.5, size=shape)
    got = isotropy(torch.from_numpy(w).float())  # float32 input is promoted internally
    want = brute_force_both_signs(w.astype(np.float32))
    assert 0.0 < got <= 1.0
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert isotropy(w) == pytest.approx(brute_force_both_signs(w), rel=1e-9, abs=1e-12)  # numpy input
    # the older variant: its own reference, and never below the both-signs value
    assert isotropy_as_returned_signs(w) == pytest.approx(direct_as_returned(w), rel=1e-9, abs=1e-12)
    assert isotropy(w, signs="as_returned") >= isotropy(w) - 1e-15


@pytest.mark.parametrize("seed", [0, 1])
def test_narrow_cones_match_the_both_signs_brute_force(seed):
    cone = narrow_cone(seed=seed)
    got = isotropy(cone)
    assert got < 0.05
    assert got == pytest.approx(brute_force_both_signs(cone), rel=1e-9)
    assert got == pytest.approx(mpmath_both_signs(cone), rel=1e-9)


def test_invariant_to_the_sign_of_every_eigenvector_and_to_negating_w(monkeypatch):
    rng = np.random.default_rng(11)
    matrices = [narrow_cone(n=300, d=8, scale=2.0, noise=0.3, seed=4), rng.normal(scale=0.4, size=(200, 8))]
    baseline = [isotropy(w) for w in matrices]
    as_returned = [isotropy_as_returned_signs(w) for w in matrices]
    for w, want in zip(matrices, baseline):
        assert isotropy(-w) == pytest.approx(want, rel=1e-12)
    moved = False
    for trial in range(6):
        flips = np.ones(8)
        flips[trial] = -1.0  # one eigenvector at a time ...
        if trial >= 3:
            flips = rng.choice([-1.0, 1.0], size=8)  # ... and random sets of them
        with monkeypatch.context() as m:
            with_flipped_eigenvectors(m, flips)
            for w, want, old in zip(matrices, baseline, as_returned):
                assert isotropy(w) == pytest.approx(want, rel=1e-12)
                moved |= not math.isclose(isotropy_as_returned_signs(w), old, rel_tol=1e-9)
    assert moved, "the as-returned variant should depend on the signs (else this test proves nothing)"


def test_the_as_returned_variant_is_the_both_signs_value_or_more():
    """Over all 2^d sign choices of a small matrix, the smallest as-returned value equals the
    both-signs value when its extremes lie on different eigenvectors."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(60, 3)) * np.array([1.0, 0.6, 0.3]) + np.array([0.2, 0.0, 0.0])
    vecs = _numpy_eigvecs(w)
    values = []
    for mask in range(8):
        signs = np.array([-1.0 if mask >> j & 1 else 1.0 for j in range(3)])
        z = np.exp(w @ (vecs * signs)).sum(axis=0)
        values.append(z.min() / z.max())
    both = isotropy(w)
    assert min(values) >= both - 1e-12
    log_z = log_partition(w).numpy().reshape(2, 3)  # row 0: +a_j, row 1: -a_j
    argmin, argmax = np.unravel_index(log_z.argmin(), log_z.shape), np.unravel_index(log_z.argmax(), log_z.shape)
    if argmin[1] != argmax[1]:
        assert min(values) == pytest.approx(both, rel=1e-9)


def test_finite_and_correct_where_float32_exp_overflows():
    # Row norms around 120: exp(w . a) overflows float32 (limit ~88.7) along the cone axis.
    w = narrow_cone(n=500, d=32, scale=120.0, noise=2.0, seed=3)
    w32 = torch.from_numpy(w).float()
    _, vecs = torch.linalg.eigh(w32.double().t() @ w32.double())
    naive = torch.exp(w32 @ vecs.float()).sum(dim=0)
    assert not torch.isfinite(naive).all(), "the test matrix must overflow the naive float32 sum"
    got = isotropy(w32)
    assert math.isfinite(got) and 0.0 <= got <= 1.0
    assert got == pytest.approx(mpmath_both_signs(w32.double().numpy(), dps=80), rel=1e-9, abs=1e-300)


def test_moderate_overflow_gives_a_value_inside_float64_range():
    # Projections big enough to overflow float32 but with I(W) still representable.
    rng = np.random.default_rng(5)
    w = rng.normal(size=(200, 4)) * np.array([60.0, 40.0, 30.0, 20.0])
    w[:5, 0] += 100.0  # a few rows far out along the first axis
    w32 = torch.from_numpy(w).float()
    got = isotropy(w32)
    assert 0.0 < got < 1.0
    assert got == pytest.approx(mpmath_both_signs(w32.double().numpy(), dps=60), rel=1e-9)


def test_group_rows_use_only_that_group():
    rng = np.random.default_rng(7)
    w = np.concatenate([rng.normal(scale=0.3, size=(300, 8)), narrow_cone(n=100, d=8)])
    idx = np.arange(300, 400)
    mask = np.zeros(400, dtype=bool)
    mask[idx] = True
    by_idx = isotropy(w, rows=torch.from_numpy(idx))
    assert by_idx == pytest.approx(brute_force_both_signs(w[idx]), rel=1e-9)
    assert isotropy(w, rows=torch.from_numpy(mask)) == pytest.approx(by_idx, rel=1e-12)
    assert isotropy(w, rows=np.arange(300)) == pytest.approx(brute_force_both_signs(w[:300]), rel=1e-9)
    assert isoscore(w, rows=idx) == pytest.approx(isoscore(w[idx]), rel=1e-12)


def test_bad_inputs():
    with pytest.raises(ValueError):
        isotropy(torch.zeros(3))
    with pytest.raises(ValueError):
        isotropy(torch.ones(4, 2), rows=torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError):
        isotropy(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="signs must be one of both, as_returned"):
        isotropy(torch.ones(4, 2), signs="lapack")
    assert math.isnan(isoscore(torch.ones(1, 3)))


# -- IsoScore --------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda: np.random.default_rng(0).normal(size=(500, 16)),
    lambda: np.random.default_rng(1).normal(size=(2000, 64)) * np.linspace(0.1, 2.0, 64),
    lambda: narrow_cone(n=400, d=16, scale=3.0, noise=0.05, seed=2),
    lambda: narrow_cone(n=300, d=32, scale=1.0, noise=0.5, seed=5) @ np.diag(np.linspace(1, 10, 32)),
], ids=["isotropic", "scaled axes", "narrow cone", "anisotropic cone"])
def test_isoscore_matches_the_isoscore_package(make):
    """The package (2.0.1) takes sqrt(d) of an integer tensor, which torch computes in float32:
    its constants carry float32 rounding (relative 1e-7), ours are float64."""
    from IsoScore import IsoScore as package  # a test dependency (setup.py's "test" extra)

    points = make()
    want = float(package.IsoScore(points.copy()))
    got = isoscore(points)
    assert 0.0 <= got <= 1.0
    assert got == pytest.approx(want, rel=1e-6, abs=1e-8)
    w32 = torch.from_numpy(points).float()
    assert isoscore(w32) == pytest.approx(float(package.IsoScore(w32.double().numpy())), rel=1e-6, abs=1e-8)


def test_isoscore_extremes():
    rng = np.random.default_rng(0)
    line = np.outer(rng.normal(size=300), rng.normal(size=8))  # all rows on one line
    assert isoscore(line) == pytest.approx(0.0, abs=1e-9)
    assert isoscore(rng.normal(size=(100000, 4))) > 0.99
