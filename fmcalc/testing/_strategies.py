"""Hypothesis strategies for property tests of flow maps.

Every array is built with numpy from one drawn seed instead of element by element, so
its shape depends only on the dimension (fix it with `dim=`), and its dtype is an
argument: jitted checks hit their compilation cache across examples. A failing
example prints as the flow's own repr, its parameters rounded.

Property tests of JAX models want different settings from hypothesis's defaults:
compiling makes the first example slow (no deadline), every new shape recompiles
(shrinking a dimension pays a compilation per candidate, which can take minutes),
and each example is costly (a bounded count). [`fmcalc.testing.PROFILE`][] is a
settings profile with these choices, registered when `fmcalc.testing` is imported:

```python
import hypothesis
import fmcalc.testing

hypothesis.settings.load_profile(fmcalc.testing.PROFILE)  # e.g. in conftest.py
```

or, per test, `@fmcalc.testing.property_settings(max_examples=10)`.
"""

import math
from collections.abc import Callable

import hypothesis
import hypothesis.strategies as st
import numpy as np
from jaxtyping import Float

from ..flows import Gaussian, GaussianMixture


PROFILE = "fmcalc"
"""The name of the hypothesis settings profile for property tests of JAX models:
no deadline (the first example compiles), no shrinking (a smaller dimension means a
new compilation per candidate; the strategies draw arrays from seeds, so a shrunk
example is not simpler anyway), 25 examples, and the failing example's blob
printed so it can be replayed with `@hypothesis.reproduce_failure`. Registered on
import of `fmcalc.testing`; load it with `hypothesis.settings.load_profile(PROFILE)`."""

_PROFILE_SETTINGS = hypothesis.settings(
    deadline=None,
    max_examples=25,
    phases=(
        hypothesis.Phase.explicit,
        hypothesis.Phase.reuse,
        hypothesis.Phase.generate,
    ),
    suppress_health_check=(hypothesis.HealthCheck.too_slow,),
    print_blob=True,
)
hypothesis.settings.register_profile(PROFILE, _PROFILE_SETTINGS)


def property_settings(**overrides) -> Callable[[Callable], Callable]:
    """The settings of [`fmcalc.testing.PROFILE`][] with `overrides`, as a
    decorator for one test.

    **Arguments:**

    - `overrides`: any `hypothesis.settings` options, e.g. `max_examples=10`.

    **Returns:** a `hypothesis.settings` object.

    **Example:**

    ```python
    @fmcalc.testing.property_settings(max_examples=5)
    @hypothesis.given(fmcalc.testing.gaussians(dim=3))
    def test_my_model(flow):
        ...
    ```
    """
    return hypothesis.settings(_PROFILE_SETTINGS, **overrides)


EDGE_TIMES: tuple[float, ...] = (0.0, 1e-6, 1e-3, 1 - 1e-3, 1 - 1e-6, 1.0)
"""Times at and next to the data end (`t = 0`) and the noise end (`t = 1`), where
closed forms divide by small numbers; [`fmcalc.testing.times`][] draws them often."""


def dimensions(min_dim: int = 1, max_dim: int = 16) -> st.SearchStrategy[int]:
    """Data dimensions `dim` with `min_dim <= dim <= max_dim`.

    **Arguments:**

    - `min_dim`: the smallest dimension, at least 1.
    - `max_dim`: the largest dimension. Each distinct dimension compiles jitted code
      once, so a narrow range keeps a test fast.

    **Returns:** a strategy of Python `int`s.

    **Example:**

    ```python
    @hypothesis.given(fmcalc.testing.dimensions(max_dim=4))
    def test_shape(dim):
        ...
    ```
    """
    if min_dim < 1 or max_dim < min_dim:
        raise ValueError(
            f"Need 1 <= min_dim <= max_dim; got min_dim={min_dim}, max_dim={max_dim}."
        )
    return st.integers(min_dim, max_dim)


def seeds() -> st.SearchStrategy[int]:
    """Seeds for `numpy.random.default_rng` or `jax.random.key`.

    **Arguments:** none.

    **Returns:** a strategy of Python `int`s in `[0, 2³² - 1]`.

    **Example:**

    ```python
    @hypothesis.given(fmcalc.testing.seeds())
    def test_batch(seed):
        x = jax.random.normal(jax.random.key(seed), (64, 3))
    ```
    """
    return st.integers(0, 2**32 - 1)


def means(
    dim: int, scale: float = 2.0, *, dtype: type[np.floating] = np.float64
) -> st.SearchStrategy[Float[np.ndarray, " dim"]]:
    """Mean vectors `scale · z` with `z ~ N(0, I_dim)` drawn from a seed.

    **Arguments:**

    - `dim`: the dimension.
    - `scale`: the standard deviation of each entry; the default 2 with covariance
      eigenvalues up to 2 keeps samples at `|x| ~ O(5)`, the range the tolerances of
      [`fmcalc.testing.tolerance`][] are set for.
    - `dtype`: a numpy floating dtype.

    **Returns:** a strategy of numpy arrays of shape `(dim,)`.

    **Example:**

    ```python
    @hypothesis.given(fmcalc.testing.means(3))
    def test_mean(mean):
        assert mean.shape == (3,)
    ```
    """
    if dim < 1:
        raise ValueError(f"`dim` must be at least 1; got {dim}.")

    def build(seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        return (scale * rng.standard_normal(dim)).astype(dtype)

    return seeds().map(build)


def _random_orthogonal(rng: np.random.Generator, dim: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    # Fixing the signs of R's diagonal makes Q Haar-distributed, not biased by QR.
    return q * np.sign(np.diag(r))


def spd_covariances(
    dim: int,
    min_eigenvalue: float = 1e-3,
    max_eigenvalue: float = 2.0,
    *,
    dtype: type[np.floating] = np.float64,
) -> st.SearchStrategy[Float[np.ndarray, "dim dim"]]:
    """Symmetric positive-definite matrices `Q diag(λ) Qᵀ` with
    `min_eigenvalue <= λ <= max_eigenvalue`.

    `Q` is a uniformly random orthogonal matrix and the `λ` are log-uniform in the
    range, both drawn from one seed; half of the examples pin the extremes exactly
    (`λ_min = min_eigenvalue`, `λ_max = max_eigenvalue`), which is where conditioning
    is worst. The condition number is at most `max_eigenvalue / min_eigenvalue`.
    Eigenvalues hold up to the rounding of `dtype` (`~eps · max_eigenvalue`).

    **Arguments:**

    - `dim`: the dimension.
    - `min_eigenvalue`: the smallest eigenvalue, `> 0`. The default `1e-3` is the
      smallest for which [`fmcalc.testing.tolerance`][] holds for the Gaussian flow.
    - `max_eigenvalue`: the largest eigenvalue, `>= min_eigenvalue`.
    - `dtype`: a numpy floating dtype.

    **Returns:** a strategy of symmetric numpy arrays of shape `(dim, dim)`.

    **Example:**

    ```python
    @hypothesis.given(fmcalc.testing.spd_covariances(4, min_eigenvalue=0.1))
    def test_cov(cov):
        assert np.linalg.eigvalsh(cov).min() >= 0.1 * (1 - 1e-9)
    ```
    """
    if dim < 1:
        raise ValueError(f"`dim` must be at least 1; got {dim}.")
    if not 0 < min_eigenvalue <= max_eigenvalue:
        raise ValueError(
            "Need 0 < min_eigenvalue <= max_eigenvalue; got "
            f"min_eigenvalue={min_eigenvalue}, max_eigenvalue={max_eigenvalue}."
        )
    low, high = math.log(min_eigenvalue), math.log(max_eigenvalue)

    def build(seed: int, pin_extremes: bool) -> np.ndarray:
        rng = np.random.default_rng(seed)
        q = _random_orthogonal(rng, dim)
        eigenvalues = np.exp(rng.uniform(low, high, size=dim))
        if pin_extremes:
            eigenvalues[0] = min_eigenvalue
            eigenvalues[-1] = max_eigenvalue if dim > 1 else min_eigenvalue
        cov = (q * eigenvalues) @ q.T
        return ((cov + cov.T) / 2).astype(dtype)

    return st.tuples(seeds(), st.booleans()).map(lambda args: build(*args))


def gaussians(
    dim: int | None = None,
    *,
    min_dim: int = 1,
    max_dim: int = 16,
    mean_scale: float = 2.0,
    min_eigenvalue: float = 1e-3,
    max_eigenvalue: float = 2.0,
    dtype: type[np.floating] = np.float64,
) -> st.SearchStrategy[Gaussian]:
    """Analytic Gaussian flows [`fmcalc.flows.Gaussian`][] with random full-rank data
    `N(mean, cov)`.

    The mean comes from [`fmcalc.testing.means`][] and the covariance from
    [`fmcalc.testing.spd_covariances`][].

    **Arguments:**

    - `dim`: a fixed dimension, or `None` to draw it from
      [`fmcalc.testing.dimensions`][]`(min_dim, max_dim)`.
    - `min_dim`, `max_dim`: the range of drawn dimensions.
    - `mean_scale`: the standard deviation of the mean's entries.
    - `min_eigenvalue`, `max_eigenvalue`: the range of the covariance's eigenvalues.
    - `dtype`: the numpy floating dtype of the mean and covariance; the flow then
      computes in the dtype of the `x` it is called with.

    **Returns:** a strategy of `Gaussian` flows.

    **Example:**

    ```python
    @hypothesis.given(fmcalc.testing.gaussians(max_dim=4), fmcalc.testing.seeds())
    def test_my_model_matches(flow, seed):
        ...
    ```
    """
    dims = dimensions(min_dim, max_dim) if dim is None else st.just(dim)

    @st.composite
    def draw_gaussian(draw) -> Gaussian:
        # Drawn inside a composite (not `st.builds`), so that a failing example
        # prints as the flow's own repr, its parameters rounded.
        d = draw(dims)
        mean = draw(means(d, mean_scale, dtype=dtype))
        cov = draw(spd_covariances(d, min_eigenvalue, max_eigenvalue, dtype=dtype))
        return Gaussian(mean, cov)

    return draw_gaussian()


def times(include_edges: bool = True) -> st.SearchStrategy[float]:
    """Times in `[0, 1]` (`t = 0` data, `t = 1` noise).

    **Arguments:**

    - `include_edges`: if `True`, about half of the draws come from
      [`fmcalc.testing.EDGE_TIMES`][] (`0`, `1e-6`, `1e-3`, `1 - 1e-3`, `1 - 1e-6`,
      `1`) and the rest are any floats in `[0, 1]`, subnormal ones included. If
      `False`, times lie in `[1e-6, 1 - 1e-6]`, representable and away from both ends
      in float32 too; use this for flows that are singular at an end (a point mass
      at `t = 0`).

    **Returns:** a strategy of Python `float`s.

    **Example:**

    ```python
    @hypothesis.given(fmcalc.testing.times())
    def test_time(t):
        assert 0 <= t <= 1
    ```
    """
    if not include_edges:
        return st.floats(EDGE_TIMES[1], EDGE_TIMES[-2])
    return st.one_of(st.sampled_from(EDGE_TIMES), st.floats(0.0, 1.0))


def time_pairs(include_edges: bool = True) -> st.SearchStrategy[tuple[float, float]]:
    """Pairs `(s, t)` of source and target times, each from
    [`fmcalc.testing.times`][]`(include_edges)`.

    Either order occurs (maps are defined both ways). Hypothesis deliberately repeats
    values within an example, so `s == t` (where `F(x, t, t) = x` and
    `V(x, t, t) = v(x, t)` are exercised) comes up in a good share of draws.

    **Arguments:**

    - `include_edges`: as for [`fmcalc.testing.times`][].

    **Returns:** a strategy of `(s, t)` tuples of Python `float`s.

    **Example:**

    ```python
    @hypothesis.given(fmcalc.testing.time_pairs())
    def test_inverse(times):
        s, t = times
        ...
    ```
    """
    each = times(include_edges)
    return st.tuples(each, each)


def time_triples(
    include_edges: bool = True,
) -> st.SearchStrategy[tuple[float, float, float]]:
    """Triples `(s, u, t)`: source, intermediate and target times, in the argument
    order of [`fmcalc.testing.semigroup_residual`][].

    Each is from [`fmcalc.testing.times`][]`(include_edges)`; `u` need not lie between
    `s` and `t`, and, as for [`fmcalc.testing.time_pairs`][], two or three of them are
    often equal.

    **Arguments:**

    - `include_edges`: as for [`fmcalc.testing.times`][].

    **Returns:** a strategy of `(s, u, t)` tuples of Python `float`s.

    **Example:**

    ```python
    @hypothesis.given(fmcalc.testing.time_triples())
    def test_semigroup(times):
        s, u, t = times
        ...
    ```
    """
    each = times(include_edges)
    return st.tuples(each, each, each)


def gaussian_mixtures(
    dim: int | None = None,
    *,
    components: int = 3,
    min_dim: int = 1,
    max_dim: int = 4,
    mean_scale: float = 2.0,
    min_eigenvalue: float = 0.05,
    max_eigenvalue: float = 1.0,
    dtype: type[np.floating] = np.float64,
) -> st.SearchStrategy[GaussianMixture]:
    """Analytic Gaussian-mixture flows [`fmcalc.flows.GaussianMixture`][] with
    `components` components: Dirichlet(1) weights, means from
    [`fmcalc.testing.means`][], covariances from
    [`fmcalc.testing.spd_covariances`][].

    Their flow maps come from an ODE solve, so a property test over mixtures is
    slower than one over Gaussians; keep `dim` small and the example count low.

    **Arguments:**

    - `dim`: a fixed dimension, or `None` to draw it from
      [`fmcalc.testing.dimensions`][]`(min_dim, max_dim)`.
    - `components`: the number of components, at least 1.
    - `mean_scale`, `min_eigenvalue`, `max_eigenvalue`: as for
      [`fmcalc.testing.gaussians`][] (broader components by default: narrow ones
      stiffen the solve near `t = 0`).
    - `dtype`: the numpy floating dtype of the parameters.

    **Returns:** a strategy of `GaussianMixture` flows.

    **Example:**

    ```python
    @fmcalc.testing.property_settings(max_examples=5)
    @hypothesis.given(fmcalc.testing.gaussian_mixtures(dim=2))
    def test_semigroup(flow):
        ...
    ```
    """
    if components < 1:
        raise ValueError(f"`components` must be at least 1; got {components}.")
    dims = dimensions(min_dim, max_dim) if dim is None else st.just(dim)

    @st.composite
    def draw_mixture(draw) -> GaussianMixture:
        d = draw(dims)
        seed = draw(seeds())
        weights = np.random.default_rng(seed).dirichlet(np.ones(components))
        mean = means(d, mean_scale, dtype=dtype)
        cov = spd_covariances(d, min_eigenvalue, max_eigenvalue, dtype=dtype)
        return GaussianMixture(
            weights.astype(dtype),
            np.stack([draw(mean) for _ in range(components)]),
            np.stack([draw(cov) for _ in range(components)]),
        )

    return draw_mixture()
