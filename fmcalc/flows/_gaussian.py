import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from .._custom_types import Cond, Scalar, Time, Vector
from .._misc import check_precision, in_unit_interval
from ._base import AbstractFlow, format_array


def _check_vector(name: str, x, dim: int) -> None:
    if jnp.shape(x) != (dim,):
        raise ValueError(
            f"`{name}` must be one example of shape ({dim},) (batch with jax.vmap); "
            f"got shape {jnp.shape(x)}."
        )


def _check_times(x, **times):
    """`x`, once every time is checked to be a scalar in `[0, 1]` (at run time for
    traced times)."""
    for name, t in times.items():
        if jnp.ndim(t) != 0:
            raise ValueError(
                f"Time `{name}` must be a scalar per example (batch with jax.vmap); "
                f"got shape {jnp.shape(t)}."
            )
        x = in_unit_interval(name, t, x)
    return x


def _root(lam, t):
    """`√c_t` with `c_t = (1 - t)² λ + t²`, elementwise. Where `λ = 0` it is `t`
    itself (times are `≥ 0`): `√(t²)` would have a NaN derivative at `t = 0`, and
    `t²` underflows for tiny `t` in float32. The inner `where` keeps the unused
    branch's gradient finite."""
    positive = lam > 0
    c_t = (1 - t) ** 2 * lam + t**2
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, c_t, 1)), t)


class Gaussian(AbstractFlow):
    """The probability flow of Gaussian data `x0 ~ N(mean, cov)`, in closed form.

    With `cov = Q diag(λ) Qᵀ`, every marginal `x_t ~ N(m_t, C_t)` has
    `m_t = (1 - t) mean` and `C_t = (1 - t)² cov + t² I`, which share the eigenvectors
    `Q`, with eigenvalues `c_t = (1 - t)² λ + t²`. Hence

    - `v(x, t) = -mean + Q diag((t - (1 - t) λ) / c_t) Qᵀ (x - m_t)`,
    - `F(x, s, t) = m_t + Q diag(√(c_t / c_s)) Qᵀ (x - m_s)`,
    - `V(x, s, t) = -mean + Q diag(g) Qᵀ (x - m_s)` with
      `g = (λ (t + s - 2) + t + s) / (√c_s (√c_t + √c_s))`.

    The last form is `(F - x) / (t - s)` with the division cancelled analytically, so
    it is exact at and near `t = s` in float32 (the naive quotient loses all precision
    there) and `V(x, t, t) = v(x, t)` holds identically.

    A point mass (`cov = 0`) or any singular `cov` is allowed: then `c_0 = 0` in the
    null directions, so the velocity at `t = 0` and every map *from* `s = 0` are
    undefined; evaluating them raises an error (under `jit` as well). Eigenvalues
    below the rounding of `cov` are zero; in those directions `√c_t = t` exactly,
    so maps *to* `t = 0` and their derivatives in `t` are finite there.

    All methods work per example, under `jit`, `vmap`, `jvp` and `grad`, in float32
    and float64 (the computation runs in the dtype of `x`; 16-bit floats are
    refused). Times outside `[0, 1]` are an error (under `jit` too, through
    `eqx.error_if`).
    """

    mean: Float[Array, " dim"]
    eigvals: Float[Array, " dim"]
    eigvecs: Float[Array, "dim dim"]
    singular: bool = eqx.field(static=True)

    # Shapes are checked in the body, which names what is wrong.
    def __repr__(self) -> str:
        cov = (self.eigvecs * self.eigvals[None, :]) @ self.eigvecs.T
        return f"Gaussian(mean={format_array(self.mean)}, cov={format_array(cov)})"

    def __init__(self, mean: Float[ArrayLike, " _"], cov: Float[ArrayLike, "_ _"]):
        """**Arguments:**

        - `mean`: the data mean, shape `(dim,)`.
        - `cov`: the data covariance, shape `(dim, dim)`, symmetric positive
          semi-definite. `jnp.zeros((dim, dim))` gives a point mass.
        """
        mean = jnp.asarray(mean)
        cov = jnp.asarray(cov)
        if mean.ndim != 1:
            raise ValueError(f"`mean` must have shape (dim,); got shape {mean.shape}.")
        dim = mean.shape[0]
        if cov.shape != (dim, dim):
            raise ValueError(
                f"`cov` must have shape ({dim}, {dim}) to match `mean`; got shape "
                f"{cov.shape}."
            )
        for name, a in (("mean", mean), ("cov", cov)):
            if not jnp.issubdtype(a.dtype, jnp.floating):
                raise TypeError(f"`{name}` must be a floating array; got {a.dtype}.")
        cov_np = np.asarray(cov, dtype=np.float64)
        if not np.all(np.isfinite(cov_np)) or not np.all(np.isfinite(np.asarray(mean))):
            raise ValueError("`mean` and `cov` must be finite.")
        scale = max(1.0, float(np.max(np.abs(cov_np))))
        asym = float(np.max(np.abs(cov_np - cov_np.T)))
        tol = 100 * float(jnp.finfo(cov.dtype).eps) * scale
        if asym > tol:
            raise ValueError(
                f"`cov` must be symmetric; max |cov - cov.T| = {asym:.3g} exceeds "
                f"{tol:.3g}."
            )
        lam, q = np.linalg.eigh((cov_np + cov_np.T) / 2)
        if lam[0] < -tol:
            raise ValueError(
                f"`cov` must be positive semi-definite; its smallest eigenvalue is "
                f"{lam[0]:.3g}."
            )
        # Rounding `cov` to its dtype moves eigenvalues by ~eps * scale: below that
        # an eigenvalue is numerically zero.
        lam = np.where(lam <= 10 * float(jnp.finfo(cov.dtype).eps) * scale, 0.0, lam)
        self.mean = mean
        self.eigvals = jnp.asarray(lam, dtype=cov.dtype)
        self.eigvecs = jnp.asarray(q, dtype=cov.dtype)
        self.singular = bool(lam[0] == 0)

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    def _params(self, x):
        dtype = x.dtype
        return (
            self.mean.astype(dtype),
            self.eigvals.astype(dtype),
            self.eigvecs.astype(dtype),
        )

    def _check(self, x, cond, **times):
        """`x`, checked with the times (see `_check_times`)."""
        _check_vector("x", x, self.dim)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"`x` must be a floating array; got dtype {x.dtype}.")
        check_precision(x)
        if cond is not None:
            raise TypeError(
                f"`Gaussian` is unconditional; got cond={cond!r}. Use "
                "`GaussianMixture(..., labels=...)` for class-conditional flows."
            )
        return _check_times(x, **times)

    def _guard(self, x, t, name: str):
        """Error (also under jit) where a singular covariance makes `c_t = 0`."""
        if not self.singular:
            return x
        return eqx.error_if(
            x,
            t <= 0,
            f"Gaussian with singular covariance: undefined at {name} = 0, where the "
            "data distribution has no density in its null directions (a point mass "
            "maps every x_s to one point, so no map starts from s = 0).",
        )

    # Quotients by `c = √c · √c` divide by each root in turn, so no product of two
    # small roots underflows before the division.

    def velocity(self, x: Vector, t: Time, *, cond: Cond = None) -> Vector:
        x = self._guard(self._check(x, cond, t=t), t, "t")
        mean, lam, q = self._params(x)
        t = jnp.asarray(t, x.dtype)
        root_t = _root(lam, t)
        y = q.T @ (x - (1 - t) * mean)
        return -mean + q @ ((t - (1 - t) * lam) / root_t / root_t * y)

    def flow_map(self, x: Vector, s: Time, t: Time, *, cond: Cond = None) -> Vector:
        x = self._guard(self._check(x, cond, s=s, t=t), s, "s")
        mean, lam, q = self._params(x)
        s, t = jnp.asarray(s, x.dtype), jnp.asarray(t, x.dtype)
        y = q.T @ (x - (1 - s) * mean)
        return (1 - t) * mean + q @ (_root(lam, t) / _root(lam, s) * y)

    def average_velocity(
        self, x: Vector, s: Time, t: Time, *, cond: Cond = None
    ) -> Vector:
        x = self._guard(self._check(x, cond, s=s, t=t), s, "s")
        mean, lam, q = self._params(x)
        s, t = jnp.asarray(s, x.dtype), jnp.asarray(t, x.dtype)
        root_s = _root(lam, s)
        g = (lam * (t + s - 2) + t + s) / (_root(lam, t) + root_s) / root_s
        y = q.T @ (x - (1 - s) * mean)
        return -mean + q @ (g * y)

    def log_prob(self, x: Vector, t: Time = 0.0, *, cond: Cond = None) -> Scalar:
        """The exact log-density `log p_t(x)` of the marginal `x_t ~ N(m_t, C_t)`;
        at `t = 0` (the default) the data's `log N(x; mean, cov)`.

        **Arguments:**

        - `x`: one example, shape `(dim,)`.
        - `t`: the time, a scalar.
        - `cond`: must be `None`.

        **Returns:** `log p_t(x)`, a scalar. An error at `t = 0` for a singular
        `cov`, which has no density there.
        """
        x = self._guard(self._check(x, cond, t=t), t, "t")
        mean, lam, q = self._params(x)
        t = jnp.asarray(t, x.dtype)
        root = _root(lam, t)
        z = q.T @ (x - (1 - t) * mean) / root
        return -0.5 * (self.dim * math.log(2 * math.pi) + z @ z) - jnp.sum(
            jnp.log(root)
        )

    def sample(
        self, key: PRNGKeyArray, n: int, *, cond: Cond = None
    ) -> Float[Array, "n dim"]:
        if cond is not None:
            raise TypeError(f"`Gaussian` is unconditional; got cond={cond!r}.")
        z = jax.random.normal(key, (n, self.dim), dtype=self.mean.dtype)
        return (
            self.mean[None, :] + (z * jnp.sqrt(self.eigvals)[None, :]) @ self.eigvecs.T
        )
