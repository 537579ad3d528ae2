"""The benchmarks' metrics: paired errors, energy and Fréchet distances, mixture
components."""

import math
import pathlib
import sys

import numpy as np
import pytest


BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import _metrics as metrics  # noqa: E402


def test_paired_rmse_and_median():
    exact = np.zeros((4, 2))
    samples = np.array([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    # Row distances 5, 0, 1, 2.
    assert metrics.paired_rmse(samples, exact) == pytest.approx(np.sqrt(30 / 4))
    assert metrics.median_paired_error(samples, exact) == pytest.approx(1.5)
    # Pairing matters: the same rows in another order are far from the exact ones.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 3))
    assert metrics.paired_rmse(x, x) == 0.0
    assert metrics.paired_rmse(x[::-1], x) > 1.0
    with pytest.raises(ValueError):
        metrics.paired_rmse(x, x[:10])


def test_energy_distance_is_unbiased_and_detects_shifts():
    rng = np.random.default_rng(1)
    same = [
        metrics.energy_distance(
            rng.standard_normal((300, 2)), rng.standard_normal((300, 2))
        )
        for _ in range(40)
    ]
    shifted = metrics.energy_distance(
        rng.standard_normal((300, 2)), rng.standard_normal((300, 2)) + [0.5, 0.0]
    )
    # Unbiased: the mean over replicates is 0 within its standard error, and single
    # estimates take both signs.
    mean, error = np.mean(same), np.std(same) / np.sqrt(len(same))
    assert abs(mean) < 4 * error
    assert min(same) < 0 < max(same)
    assert shifted > 10 * np.std(same)
    # Population value for 1-d standard normals shifted by 1: X - Y ~ N(1, 2), so
    # 2 E|N(1, 2)| - 2 E|N(0, 2)| with E|N(m, v)| = sqrt(2v/pi) e^{-m²/2v}
    # + m erf(m / sqrt(2v)); the estimate's standard error here is about 0.02.
    x = rng.standard_normal((4000, 1))
    y = rng.standard_normal((4000, 1)) + 1.0
    folded = 2 * np.sqrt(4 / np.pi) * np.exp(-1 / 4) + 2 * math.erf(0.5)
    expected = folded - 2 * np.sqrt(4 / np.pi)
    assert metrics.energy_distance(x, y) == pytest.approx(expected, abs=0.08)


def test_frechet_distance():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((400, 5)) @ rng.standard_normal((5, 5))
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    delta = np.array([1.0, -2.0, 0.5, 0.0, 3.0])
    assert metrics.frechet_distance(a, a + delta) == pytest.approx(
        np.sum(delta**2), rel=1e-8
    )
    # Scaling by 2: tr(S + 4S - 2 * 2S) = tr S.
    centred = a - a.mean(axis=0)
    assert metrics.frechet_distance(centred, 2 * centred) == pytest.approx(
        np.trace(np.cov(a, rowvar=False)), rel=1e-8
    )


def test_right_component_share():
    mixture = {
        "weights": [0.5, 0.5],
        "means": [[-3.0, 0.0], [3.0, 0.0]],
        "covs": [np.eye(2).tolist(), np.diag([0.1, 1.0]).tolist()],
    }
    exact = np.array([[-3.0, 0.0], [3.0, 0.0], [-2.5, 1.0], [2.5, -1.0]])
    assert list(metrics.assign_components(exact, mixture)) == [0, 1, 0, 1]
    assert metrics.right_component_share(exact, exact, mixture) == 1.0
    wrong = exact.copy()
    wrong[:2] = wrong[1::-1]
    assert metrics.right_component_share(wrong, exact, mixture) == 0.5
    # By posterior, not by distance: the narrow component loses a point near it.
    near_narrow = np.array([[1.2, 0.0]])
    assert metrics.assign_components(near_narrow, mixture)[0] == 0
