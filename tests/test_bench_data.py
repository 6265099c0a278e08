"""The synthetic data of bench/scale.py: its hardness measure (LID) and its
per-label Gaussian fit. Pure numpy: no database."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import scale  # noqa: E402


def scores_in_subspace(intrinsic: int, n: int = 20_000, queries: int = 50, ambient: int = 64) -> np.ndarray:
    """Cosine scores of queries against points spread uniformly over a small
    `intrinsic`-dimensional patch of the unit sphere in `ambient` dimensions."""
    rng = np.random.default_rng(1)
    basis = np.linalg.qr(rng.standard_normal((ambient, intrinsic)))[0].T
    centre = np.ones(ambient) / np.sqrt(ambient)

    def points(count: int) -> np.ndarray:
        x = centre + 0.05 * rng.uniform(-1, 1, size=(count, intrinsic)) @ basis
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    data, probe = points(n), points(queries)
    return probe @ data.T


@pytest.mark.parametrize("intrinsic", [4, 12])
def test_lid_recovers_the_dimension_of_the_data(intrinsic):
    scores = scores_in_subspace(intrinsic)
    lid = scale.local_intrinsic_dimension(scores, k=100)
    assert intrinsic * 0.7 < lid < intrinsic * 1.4
    # Copies of a query (distance 0) are left out, not turned into an infinite or negative estimate.
    with_copies = np.hstack([scores, np.ones((len(scores), 3), dtype=np.float32)])
    assert scale.local_intrinsic_dimension(with_copies, k=103) == pytest.approx(lid, rel=0.05)


def test_the_isotropic_clusters_are_high_dimensional_and_a_label_fit_keeps_the_labels_apart():
    rng = np.random.default_rng(0)
    clustered = scale.clustered_vectors(5_050, 256, 8, rng)
    assert scale.local_intrinsic_dimension(clustered[5_000:] @ clustered[:5_000].T) > 40

    # Two labels on a low-dimensional structure: the fit draws from each label's mean and covariance.
    centres = np.eye(256, dtype=np.float32)[:2]
    spread = np.linalg.qr(rng.standard_normal((256, 3)))[0].T.astype(np.float32)
    real = [centres[i] + 0.2 * rng.standard_normal((400, 3)).astype(np.float32) @ spread for i in (0, 1)]
    fits = scale.fit_per_label(np.vstack(real), ["a"] * 400 + ["b"] * 400 + [])
    assert [(label, rows) for label, rows, *_ in fits] == [("a", 400), ("b", 400)]
    drawn = scale.fitted_vectors(2_000, fits, np.random.default_rng(2))
    assert drawn.shape == (2_000, 256) and np.allclose(np.linalg.norm(drawn, axis=1), 1, atol=1e-5)
    nearer_a = (drawn @ centres[0] > drawn @ centres[1]).mean()
    assert 0.4 < nearer_a < 0.6  # both labels, in proportion to their rows
    # The draws stay in the span of the means and the spread: three dimensions of noise, not 256.
    span = np.linalg.qr(np.vstack([centres, spread]).T)[0]
    residual = drawn - (drawn @ span) @ span.T
    assert np.abs(residual).max() < 1e-4

    # The real set's own LID: its test rows against the others.
    unit = np.vstack(real) / np.linalg.norm(np.vstack(real), axis=1, keepdims=True)
    lid, searched = scale.real_lid(unit, ["train"] * 700 + ["test"] * 100, queries=50)
    assert searched == 700 and 1.5 < lid < 5
