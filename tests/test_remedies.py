"""Post-hoc remedies (issue 7): ``remove_mean`` and ``all_but_the_top`` (Mu & Viswanath 2018)
against a direct numpy SVD transcription, for numpy and torch input."""

import numpy as np
import pytest
import torch

from fairseq_agg.remedies import all_but_the_top, remove_mean


def reference_all_but_the_top(weight: np.ndarray, num_directions: int) -> np.ndarray:
    """Mu & Viswanath, Algorithm 1: centre, PCA (via numpy's SVD), subtract the projections
    on the top D components, one at a time."""
    w = np.asarray(weight, dtype=np.float64)
    centred = w - w.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    result = centred.copy()
    for u in vt[:num_directions]:
        result -= np.outer(centred @ u, u)
    return result


def anisotropic(n=120, d=10, seed=0) -> np.ndarray:
    """Rows in a cone: a common offset and a few dominant directions, as trained embeddings."""
    rng = np.random.default_rng(seed)
    scales = np.array([8.0, 4.0, 2.0] + [1.0] * (d - 3))
    return rng.normal(size=(n, d)) * scales + 3.0


@pytest.mark.parametrize("num_directions", [0, 1, 3, 10])
def test_all_but_the_top_equals_numpy_svd_reference(num_directions):
    w = anisotropic()
    ref = reference_all_but_the_top(w, num_directions)
    ours = all_but_the_top(w, num_directions)
    assert isinstance(ours, np.ndarray) and ours.dtype == np.float64
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-10)
    from_torch = all_but_the_top(torch.from_numpy(w).float(), num_directions)
    assert isinstance(from_torch, torch.Tensor) and from_torch.dtype == torch.float64
    np.testing.assert_allclose(from_torch.numpy(), reference_all_but_the_top(w.astype(np.float32), num_directions),
                               rtol=0, atol=1e-10)
    # What the remedy is for: no mean, and nothing left along the removed directions.
    np.testing.assert_allclose(ours.mean(axis=0), 0, atol=1e-10)
    if num_directions:
        _, _, vt = np.linalg.svd(w - w.mean(axis=0), full_matrices=False)
        np.testing.assert_allclose(ours @ vt[:num_directions].T, 0, atol=1e-9)


def test_remove_mean_equals_numpy():
    w = anisotropic(seed=1)
    np.testing.assert_allclose(remove_mean(w), w - w.mean(axis=0), rtol=0, atol=1e-12)
    t = torch.from_numpy(w).to(torch.float16)
    out = remove_mean(t)
    assert out.dtype == torch.float64
    expected = t.double().numpy() - t.double().numpy().mean(axis=0)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(all_but_the_top(w, 0), remove_mean(w), rtol=0, atol=1e-12)
    assert all_but_the_top(w, np.int64(2)).shape == w.shape  # numpy integers are integers


def test_inputs_are_not_modified():
    w = anisotropic(seed=2)
    copy = w.copy()
    t = torch.from_numpy(copy.copy())
    all_but_the_top(w, 2)
    remove_mean(t)
    np.testing.assert_array_equal(w, copy)
    np.testing.assert_array_equal(t.numpy(), copy)


@pytest.mark.parametrize(
    "num_directions, error, message",
    [
        (-1, ValueError, r"num_directions must lie in \[0, min\(N, d\)\] = \[0, 10\]"),
        (11, ValueError, r"num_directions must lie in \[0, min\(N, d\)\] = \[0, 10\] for an \(120, 10\) matrix, got 11"),
        (2.0, TypeError, "num_directions must be an integer, got 2.0"),
        (True, TypeError, "num_directions must be an integer"),
        ("3", TypeError, "num_directions must be an integer"),
    ],
)
def test_bad_number_of_directions(num_directions, error, message):
    with pytest.raises(error, match=message):
        all_but_the_top(anisotropic(), num_directions)


def test_bad_matrices():
    with pytest.raises(ValueError, match=r"expected an \(N, d\) embedding matrix"):
        remove_mean(np.ones(5))
    with pytest.raises(ValueError, match="non-finite"):
        all_but_the_top(np.array([[1.0, np.nan], [0.0, 1.0]]), 1)
    with pytest.raises(TypeError, match="torch tensor or numpy array"):
        remove_mean([[1.0, 2.0]])
    with pytest.raises(ValueError, match=r"\[0, 3\] for an \(3, 5\) matrix"):
        all_but_the_top(np.ones((3, 5)), 4)  # fewer rows than directions
