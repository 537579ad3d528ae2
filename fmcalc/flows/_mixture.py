import math

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from .._batch import NULL_LABEL
from .._custom_types import Cond, Label, Scalar, Time, Vector
from .._misc import check_precision
from ._base import AbstractFlow, format_array
from ._gaussian import _check_times, _check_vector


def _check_inputs(x, dim: int, **times):
    """`x`, checked with the times (see `_check_times`)."""
    _check_vector("x", x, dim)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"`x` must be a floating array; got dtype {x.dtype}.")
    check_precision(x)
    return _check_times(x, **times)


def _check_floating(**arrays) -> None:
    for name, a in arrays.items():
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise TypeError(f"`{name}` must be a floating array; got {a.dtype}.")
        if not np.all(np.isfinite(np.asarray(a))):
            raise ValueError(f"`{name}` must be finite.")


def _rescaled_field(r, state, args):
    """`d(x, W)/dr = ((t - s) v, v)` at `τ = s + r (t - s)`."""
    velocity, s, t = args
    x, _ = state
    v = velocity(x, s + r * (t - s))
    return (t - s) * v, v


class _RescaledSolve(eqx.Module):
    """One ODE solve giving both `F(x, s, t)` and `V(x, s, t)`.

    The ODE runs on the rescaled time `r ∈ [0, 1]`, `τ = s + r (t - s)`, with state
    `(x, W)`, `dx/dr = (t - s) v(x, τ)`, `dW/dr = v(x, τ)`, `W(0) = 0`. Then
    `F = x(1)` and `V = W(1)` with no division by `t - s`, so `V(x, t, t) = v(x, t)`
    holds to round-off and `V` is as accurate near `t = s` as anywhere else.

    With `steps=None` the solve is adaptive Dopri8 (diffrax); with `steps=n` it is
    `n` classical Runge-Kutta (RK4) steps in a `lax.scan`, a smooth function of
    `(x, s, t)` whose derivatives of every order are those of the scheme.
    """

    rtol: float | None = eqx.field(static=True)
    atol: float | None = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)
    steps: int | None = eqx.field(static=True)
    adjoint: diffrax.AbstractAdjoint | None

    def __init__(self, rtol, atol, max_steps, adjoint, steps=None):
        for name, tol in (("rtol", rtol), ("atol", atol)):
            if tol is not None and not tol > 0:
                raise ValueError(f"`{name}` must be positive or None; got {tol!r}.")
        if not (isinstance(max_steps, int) and max_steps > 0):
            raise ValueError(f"`max_steps` must be a positive int; got {max_steps!r}.")
        if steps is not None:
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                raise ValueError(
                    f"`steps` must be a positive int (fixed RK4 steps) or None "
                    f"(adaptive Dopri8); got {steps!r}."
                )
            given = [
                name
                for name, value in (
                    ("rtol", rtol),
                    ("atol", atol),
                    ("adjoint", adjoint),
                )
                if value is not None
            ]
            if given:
                raise ValueError(
                    f"`steps={steps}` asks for a fixed-step solve, which has no "
                    f"{', '.join(f'`{g}`' for g in given)}; pass either `steps` or "
                    "the adaptive solve's options."
                )
        elif adjoint is None:
            # Both modes: the identities need `jax.jvp` (Lagrangian, Eulerian) and
            # losses that backpropagate through a flow need `jax.grad`. On CPU it
            # costs about what the jvp-only `ForwardMode` does.
            adjoint = diffrax.DirectAdjoint()
        if adjoint is not None and not isinstance(adjoint, diffrax.AbstractAdjoint):
            raise TypeError(
                f"`adjoint` must be a `diffrax.AbstractAdjoint`; got {adjoint!r}."
            )
        self.rtol = None if rtol is None else float(rtol)
        self.atol = None if atol is None else float(atol)
        self.max_steps = max_steps
        self.steps = steps
        self.adjoint = adjoint

    @property
    def options(self) -> dict:
        """The keyword arguments that build this solve again."""
        if self.steps is not None:
            return {"steps": self.steps}
        return {
            "rtol": self.rtol,
            "atol": self.atol,
            "max_steps": self.max_steps,
            "adjoint": self.adjoint,
        }

    def __call__(self, velocity, x, s, t) -> tuple[Array, Array]:
        dtype = x.dtype
        args = (velocity, jnp.asarray(s, dtype), jnp.asarray(t, dtype))
        y0 = (x, jnp.zeros_like(x))
        if self.steps is not None:
            return _rk4(args, y0, self.steps)
        assert self.adjoint is not None  # set with the adaptive solve's options
        # Reference accuracy in float64; float32 cannot resolve much below 1e-6.
        default = 1e-10 if dtype == jnp.float64 else 1e-6
        controller = diffrax.PIDController(
            rtol=default if self.rtol is None else self.rtol,
            atol=default if self.atol is None else self.atol,
        )
        solution = diffrax.diffeqsolve(
            diffrax.ODETerm(_rescaled_field),
            diffrax.Dopri8(),
            t0=jnp.zeros((), dtype),
            t1=jnp.ones((), dtype),
            dt0=None,
            y0=y0,
            args=args,
            stepsize_controller=controller,
            adjoint=self.adjoint,
            max_steps=self.max_steps,
        )
        assert solution.ys is not None  # SaveAt(t1=True), the default
        flow, average = solution.ys
        return flow[0], average[0]


def _rk4(args, y0, steps: int) -> tuple[Array, Array]:
    """`steps` classical Runge-Kutta steps of `_rescaled_field` over `r ∈ [0, 1]`."""
    h = 1.0 / steps

    def axpy(y, k, c):
        return jax.tree.map(lambda a, b: a + c * b, y, k)

    def step(y, r):
        k1 = _rescaled_field(r, y, args)
        k2 = _rescaled_field(r + h / 2, axpy(y, k1, h / 2), args)
        k3 = _rescaled_field(r + h / 2, axpy(y, k2, h / 2), args)
        k4 = _rescaled_field(r + h, axpy(y, k3, h), args)
        y = jax.tree.map(
            lambda a, b1, b2, b3, b4: a + h / 6 * (b1 + 2 * b2 + 2 * b3 + b4),
            y,
            k1,
            k2,
            k3,
            k4,
        )
        return y, None

    dtype = y0[0].dtype
    grid = jnp.arange(steps, dtype=dtype) * jnp.asarray(h, dtype)
    (flow, average), _ = jax.lax.scan(step, y0, grid)
    return flow, average


class GaussianMixture(AbstractFlow):
    """The probability flow of a mixture of full-covariance Gaussians.

    Data `x0 ~ Σ_k w_k N(mu_k, Sigma_k)`. Given component `k`, the marginal is
    `x_t ~ N(m_k(t), C_k(t))` with `m_k(t) = (1 - t) mu_k` and
    `C_k(t) = (1 - t)² Sigma_k + t² I`, and the conditional velocity is affine in `x`:

    `v_k(x, t) = -mu_k + (t I - (1 - t) Sigma_k) C_k(t)⁻¹ (x - m_k(t))`,

    computed in each component's eigenbasis `Sigma_k = Q_k diag(λ_k) Q_kᵀ` as in
    [`fmcalc.flows.Gaussian`][]. The exact marginal velocity is the posterior average

    `v(x, t) = Σ_k π_k(x, t) v_k(x, t)`,
    `π_k ∝ w_k N(x; m_k(t), C_k(t))` (a softmax of log-densities, so it is stable
    far in the tails).

    The flow map `F(x, s, t)` and average velocity `V(x, s, t)` come from one
    adaptive ODE solve (Dopri8; fixed RK4 steps with `steps=`) in rescaled time,
    which integrates `V` directly, so
    `F = x + (t - s) V` holds by construction and `V(x, t, t) = v(x, t)` to round-off.

    **Class-conditional mixtures.** With `labels` (the class of each component),
    `cond=c` (an integer, possibly traced under `vmap`) restricts every method to the
    components of class `c`, with weights renormalised within the class;
    `cond=None` is the whole mixture. [`fmcalc.flows.GaussianMixture.guided_velocity`][]
    gives the classifier-free-guided velocity exactly.

    Covariances must be positive definite, which keeps the velocity regular on all of
    `[0, 1]`; for point masses use [`fmcalc.flows.PointCloud`][].

    All methods work per example, under `jit`, `vmap`, `jvp` and `grad`, in float32 and
    float64 (the computation runs in the dtype of `x`). A vmapped solve steps every
    lane until the slowest one finishes.
    """

    weights: Float[Array, " k"]
    means: Float[Array, "k dim"]
    eigvals: Float[Array, "k dim"]
    eigvecs: Float[Array, "k dim dim"]
    labels: Int[Array, " k"] | None
    classes: tuple[int, ...] | None = eqx.field(static=True)
    solver: _RescaledSolve

    def __repr__(self) -> str:
        covs = jnp.einsum("kij,kj,klj->kil", self.eigvecs, self.eigvals, self.eigvecs)
        labels = "" if self.labels is None else f", labels={format_array(self.labels)}"
        return (
            f"GaussianMixture(weights={format_array(self.weights)}, "
            f"means={format_array(self.means)}, covs={format_array(covs)}{labels})"
        )

    def __init__(
        self,
        weights: Float[ArrayLike, " _k"],
        means: Float[ArrayLike, "_k _dim"],
        covs: Float[ArrayLike, "_k _dim _dim"],
        *,
        labels: Int[ArrayLike, " _k"] | None = None,
        rtol: float | None = None,
        atol: float | None = None,
        max_steps: int = 4096,
        adjoint: diffrax.AbstractAdjoint | None = None,
        steps: int | None = None,
    ):
        """**Arguments:**

        - `weights`: mixture weights, shape `(k,)`, positive and summing to 1.
        - `means`: component means, shape `(k, dim)`.
        - `covs`: component covariances, shape `(k, dim, dim)`, symmetric positive
          definite.
        - `labels`: optional integer class of each component, shape `(k,)`; enables
          `cond=`.
        - `rtol`, `atol`: tolerances of the adaptive Dopri8 solve behind `flow_map`
          and `average_velocity`. `None` (default) picks by the dtype of `x`:
          `1e-10` in float64 (identities then hold to ~1e-9), `1e-6` in float32.
        - `max_steps`: the most steps one solve may take (an error beyond).
        - `adjoint`: how diffrax differentiates the solve. `None` (default) is
          `diffrax.DirectAdjoint()`, which supports both `jax.jvp` and `jax.grad`;
          `diffrax.ForwardMode()` (jvp only) and
          `diffrax.RecursiveCheckpointAdjoint()` (grad only) are the single-mode
          alternatives.
        - `steps`: `None` (default) for the adaptive solve above; an int `n` for `n`
          fixed classical Runge-Kutta (RK4) steps instead (then pass no `rtol`,
          `atol` or `adjoint`). Its error falls as `n⁻⁴`, from a size set by how
          sharply the mixture's components separate near the data end
          (`tests/test_mixture.py` measures the order on a broad and on a narrow
          mixture); it is a smooth function of `(x, s, t)`, so finite differences
          of it converge at their own order, and its derivatives of every order
          compile in about half the time of the adaptive solve's.
        """
        weights = jnp.asarray(weights)
        means = jnp.asarray(means)
        covs = jnp.asarray(covs)
        if means.ndim != 2:
            raise ValueError(
                f"`means` must have shape (k, dim); got shape {means.shape}."
            )
        k, dim = means.shape
        if weights.shape != (k,):
            raise ValueError(
                f"`weights` must have shape ({k},), one per component of `means`; "
                f"got shape {weights.shape}."
            )
        if covs.shape != (k, dim, dim):
            raise ValueError(
                f"`covs` must have shape ({k}, {dim}, {dim}) to match `means`; got "
                f"shape {covs.shape}."
            )
        _check_floating(weights=weights, means=means, covs=covs)
        weights_np = np.asarray(weights, dtype=np.float64)
        if np.any(weights_np <= 0):
            raise ValueError(f"`weights` must be positive; got {weights_np}.")
        total = float(np.sum(weights_np))
        sum_tol = float(np.sqrt(jnp.finfo(weights.dtype).eps))
        if abs(total - 1) > sum_tol:
            raise ValueError(
                f"`weights` must sum to 1 (within {sum_tol:.1g}); they sum to "
                f"{total!r}."
            )
        covs_np = np.asarray(covs, dtype=np.float64)
        scale = max(1.0, float(np.max(np.abs(covs_np))))
        tol = 100 * float(jnp.finfo(covs.dtype).eps) * scale
        asym = np.max(np.abs(covs_np - np.swapaxes(covs_np, 1, 2)), axis=(1, 2))
        if np.any(asym > tol):
            j = int(np.argmax(asym))
            raise ValueError(
                f"`covs` must be symmetric; max |covs[{j}] - covs[{j}].T| = "
                f"{asym[j]:.3g} exceeds {tol:.3g}."
            )
        lam, q = np.linalg.eigh((covs_np + np.swapaxes(covs_np, 1, 2)) / 2)
        if np.any(lam[:, 0] <= tol):
            j = int(np.argmin(lam[:, 0]))
            raise ValueError(
                f"`covs` must be positive definite; the smallest eigenvalue of "
                f"covs[{j}] is {lam[j, 0]:.3g}. (For point masses use `PointCloud`.)"
            )
        dtype = means.dtype
        if labels is None:
            self.labels = None
            self.classes = None
        else:
            labels = jnp.asarray(labels)
            if labels.shape != (k,) or not jnp.issubdtype(labels.dtype, jnp.integer):
                raise ValueError(
                    f"`labels` must be an integer array of shape ({k},), the class of "
                    f"each component; got {labels.dtype} of shape {labels.shape}."
                )
            if np.any(np.asarray(labels) < 0):
                raise ValueError(
                    f"`labels` must be class labels >= 0 (a negative label, such as "
                    f"fmcalc.NULL_LABEL = {NULL_LABEL}, means 'no label' and could "
                    f"never select its component); got {np.asarray(labels).tolist()}."
                )
            self.labels = labels
            self.classes = tuple(int(c) for c in np.unique(np.asarray(labels)))
        self.weights = jnp.asarray(weights_np / total, dtype=dtype)
        self.means = means
        self.eigvals = jnp.asarray(lam, dtype=dtype)
        self.eigvecs = jnp.asarray(q, dtype=dtype)
        self.solver = _RescaledSolve(rtol, atol, max_steps, adjoint, steps)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _log_weights(self, cond, dtype):
        """Log-weights of the components `cond` selects (`-inf` for the others)."""
        log_weights = jnp.log(self.weights.astype(dtype))
        if cond is None:
            return log_weights
        if self.labels is None:
            raise TypeError(
                f"This `GaussianMixture` has no `labels`, so it is unconditional; got "
                f"cond={cond!r}. Pass `labels=` (the class of each component) to "
                "condition on a class."
            )
        cond = jnp.asarray(cond)
        if cond.shape != () or not jnp.issubdtype(cond.dtype, jnp.integer):
            raise TypeError(
                "`cond` must be one integer class label per example (batch with "
                f"jax.vmap); got {cond.dtype} of shape {cond.shape}."
            )
        # `NULL_LABEL` means "no label" (e.g. dropped for guidance training).
        unlabelled = cond == NULL_LABEL
        in_class = (self.labels == cond) | unlabelled
        log_weights = jnp.where(in_class, log_weights, -jnp.inf)
        return eqx.error_if(
            log_weights,
            ~jnp.any(in_class),
            f"`cond` is not a class of this mixture; its classes are {self.classes} "
            f"(or fmcalc.NULL_LABEL = {NULL_LABEL} for none).",
        )

    def _components(self, x, t):
        """Per-component log-densities of `x_t` (up to a shared constant) and
        conditional velocities `v_k(x, t)`."""
        dtype = x.dtype
        t = jnp.asarray(t, dtype)
        means = self.means.astype(dtype)
        lam = self.eigvals.astype(dtype)
        q = self.eigvecs.astype(dtype)
        c_t = (1 - t) ** 2 * lam + t**2
        y = jnp.einsum("kji,kj->ki", q, x[None, :] - (1 - t) * means)
        log_density = -0.5 * jnp.sum(jnp.log(c_t) + y**2 / c_t, axis=1)
        velocities = -means + jnp.einsum("kij,kj->ki", q, (t - (1 - t) * lam) / c_t * y)
        return log_density, velocities

    def _velocity(self, log_weights, x, t):
        log_density, velocities = self._components(x, t)
        return jax.nn.softmax(log_weights + log_density) @ velocities

    def velocity(self, x: Vector, t: Time, *, cond: Cond = None) -> Vector:
        """The exact marginal velocity `v(x, t) = Σ_k π_k(x, t) v_k(x, t)` (see the
        class docstring).

        **Arguments:**

        - `x`: one example, shape `(dim,)`.
        - `t`: the time, a scalar.
        - `cond`: `None`, or an integer class label (needs `labels`).

        **Returns:** `v(x, t)`, shaped like `x`.
        """
        x = _check_inputs(x, self.dim, t=t)
        return self._velocity(self._log_weights(cond, x.dtype), x, t)

    def log_prob(self, x: Vector, t: Time = 0.0, *, cond: Cond = None) -> Scalar:
        """The exact log-density `log p_t(x) = log Σ_k w_k N(x; m_k(t), C_k(t))` of
        the marginal at time `t`; at `t = 0` (the default) the data's log-density.

        **Arguments:**

        - `x`: one example, shape `(dim,)`.
        - `t`: the time, a scalar.
        - `cond`: `None`, or an integer class label (needs `labels`): the density
          of that class's components, weights renormalised within the class.

        **Returns:** `log p_t(x)`, a scalar.
        """
        x = _check_inputs(x, self.dim, t=t)
        log_density, _ = self._components(x, t)
        log_weights = self._log_weights(cond, x.dtype)
        # Renormalised within the class that `cond` selects.
        normaliser = jax.nn.logsumexp(log_weights) + 0.5 * self.dim * math.log(
            2 * math.pi
        )
        return jax.nn.logsumexp(log_weights + log_density) - normaliser

    def guided_velocity(
        self, x: Vector, t: Time, cond: Label, scale: Float[ArrayLike, ""]
    ) -> Vector:
        """The classifier-free-guided velocity, exactly.

        `v_w(x, t | c) = v(x, t) + w (v(x, t | c) - v(x, t))`: `w = 1` is the
        conditional velocity, `w = 0` the unconditional one, `w > 1` extrapolates.
        (Papers writing `(1 + w') v(x|c) - w' v(x)` use `w = 1 + w'`.)

        **Arguments:**

        - `x`: one example, shape `(dim,)`.
        - `t`: the time, a scalar.
        - `cond`: the integer class label `c` (needs `labels`).
        - `scale`: the guidance scale `w`, a scalar.

        **Returns:** `v_w(x, t | c)`, shaped like `x`.
        """
        x = _check_inputs(x, self.dim, t=t)
        if cond is None:
            raise TypeError("`guided_velocity` needs a class label `cond`; got None.")
        log_density, velocities = self._components(x, t)
        unconditional = jax.nn.softmax(self._log_weights(None, x.dtype) + log_density)
        conditional = jax.nn.softmax(self._log_weights(cond, x.dtype) + log_density)
        scale = jnp.asarray(scale, x.dtype)
        return (unconditional + scale * (conditional - unconditional)) @ velocities

    def flow_map(self, x: Vector, s: Time, t: Time, *, cond: Cond = None) -> Vector:
        """The flow map `F(x, s, t)`, from an adaptive Dopri8 solve of
        `dx/dτ = v(x, τ)` from `s` to `t` (either direction).

        **Arguments:**

        - `x`: one example at time `s`, shape `(dim,)`.
        - `s`: the source time, a scalar.
        - `t`: the target time, a scalar.
        - `cond`: `None`, or an integer class label (needs `labels`).

        **Returns:** `F(x, s, t)`, shaped like `x`.
        """
        return self._solve(x, s, t, cond)[0]

    def average_velocity(
        self, x: Vector, s: Time, t: Time, *, cond: Cond = None
    ) -> Vector:
        """The average velocity `V(x, s, t)`, with `F(x, s, t) = x + (t - s) V` and
        `V(x, t, t) = v(x, t)`, integrated directly (no division by `t - s`).

        Arguments as for `flow_map`. **Returns:** `V(x, s, t)`, shaped like `x`.
        """
        return self._solve(x, s, t, cond)[1]

    def _solve(self, x, s, t, cond):
        x = _check_inputs(x, self.dim, s=s, t=t)
        log_weights = self._log_weights(cond, x.dtype)
        return self.solver(eqx.Partial(self._velocity, log_weights), x, s, t)

    def sample(
        self, key: PRNGKeyArray, n: int, *, cond: Cond = None
    ) -> Float[Array, "n dim"]:
        """`n` data samples: a component drawn by weight (within class `cond` if
        given), then a Gaussian sample from it.

        **Arguments:**

        - `key`: a PRNG key.
        - `n`: the number of samples (static).
        - `cond`: `None`, or an integer class label (needs `labels`).

        **Returns:** an array of shape `(n, dim)`.
        """
        dtype = self.means.dtype
        component_key, normal_key = jax.random.split(key)
        logits = self._log_weights(cond, dtype)
        k = jax.random.categorical(component_key, logits, shape=(n,))
        z = jax.random.normal(normal_key, (n, self.dim), dtype=dtype)
        root = self.eigvecs[k] * jnp.sqrt(self.eigvals[k])[:, None, :]
        return self.means[k] + jnp.einsum("nij,nj->ni", root, z)


class PointCloud(AbstractFlow):
    """The probability flow of the empirical distribution on `n` points (a training
    set), exactly.

    With data uniform on `p_1, ..., p_n`, the posterior over points given `x_t = x` is
    `π_i ∝ exp(-‖x - (1 - t) p_i‖² / (2 t²))` (a softmax), the denoiser is
    `x̂(x, t) = E[x0 | x_t = x] = Σ_i π_i p_i`, and

    `v(x, t) = (x - x̂(x, t)) / t`.

    This is singular at `t = 0`, where `x_0` is one of the points and the noise it
    came from is unknown: the velocity at `t = 0` and any map starting at `s = 0`
    raise an error (under `jit` as well).

    **Maps towards `t = 0`.** As `t → 0` the posterior collapses onto one point `p`
    and the path becomes the straight line `x_t = p + t v` with a finite velocity
    `v = (x_t - p) / t`, but evaluating `v` at `t = 0` itself is `0 / 0`. So a map
    towards data stops its solve at `t_m = max(t, min(s, t_min))` and continues as
    the straight line there, `F(x, s, t) = x_m + (t - t_m) v(x_m, t_m)` with
    `x_m = F(x, s, t_m)` (the two pieces join with matching derivative). This is exact
    once the posterior has collapsed at `t_m`, i.e. for points farther apart than about
    `10 t_min`; then `F(x, 1, 0)` lands on a data point to round-off. Every map with
    `t ≥ t_min`, or with `t > s`, is a plain solve.

    Near the data end, maps are only as well-conditioned as the data allow: the
    Jacobian determinant of `F(., s, t)` is `p_s(x) / p_t(F)`, so maps *into* regions
    of exponentially small density at small times (points off the flow, or between
    data points) amplify the solver's error by as much, and maps up from `s` near 0
    amplify it by about `1 / s`.

    `F` and `V` come from the same rescaled solve as
    [`fmcalc.flows.GaussianMixture`][] (Dopri8, `V` integrated directly).
    All methods work per example, under `jit`, `vmap`, `jvp` and `grad`, in float32
    and float64 (the computation runs in the dtype of `x`).
    """

    points: Float[Array, "n dim"]
    t_min: float = eqx.field(static=True)
    solver: _RescaledSolve

    def __repr__(self) -> str:
        return f"PointCloud(points={format_array(self.points)}, t_min={self.t_min:g})"

    def __init__(
        self,
        points: Float[ArrayLike, "_n _dim"],
        *,
        t_min: float = 1e-4,
        rtol: float | None = None,
        atol: float | None = None,
        max_steps: int = 4096,
        adjoint: diffrax.AbstractAdjoint | None = None,
        steps: int | None = None,
    ):
        """**Arguments:**

        - `points`: the data points, shape `(n, dim)`.
        - `t_min`: maps towards data continue as straight lines below this time (see
          the class docstring).
        - `rtol`, `atol`: tolerances of the adaptive Dopri8 solve behind `flow_map`
          and `average_velocity`. `None` (default) picks by the dtype of `x`:
          `1e-10` in float64 (identities then hold to ~1e-9), `1e-6` in float32.
        - `max_steps`: the most steps one solve may take (an error beyond).
        - `adjoint`: how diffrax differentiates the solve. `None` (default) is
          `diffrax.DirectAdjoint()`, which supports both `jax.jvp` and `jax.grad`;
          `diffrax.ForwardMode()` (jvp only) and
          `diffrax.RecursiveCheckpointAdjoint()` (grad only) are the single-mode
          alternatives.
        - `steps`: fixed RK4 steps instead of the adaptive solve, as in
          [`fmcalc.flows.GaussianMixture`][].
        """
        points = jnp.asarray(points)
        if points.ndim != 2 or points.shape[0] == 0:
            raise ValueError(
                f"`points` must have shape (n, dim) with n ≥ 1; got shape "
                f"{points.shape}."
            )
        _check_floating(points=points)
        if not 0 < t_min < 1:
            raise ValueError(f"`t_min` must lie in (0, 1); got {t_min!r}.")
        self.points = points
        self.t_min = float(t_min)
        self.solver = _RescaledSolve(rtol, atol, max_steps, adjoint, steps)

    @property
    def dim(self) -> int:
        return self.points.shape[1]

    def _check(self, x, cond, **times):
        """`x`, checked with the times (see `_check_times`)."""
        if cond is not None:
            raise TypeError(
                f"`PointCloud` is unconditional; got cond={cond!r}. Use "
                "`GaussianMixture(..., labels=...)` for class-conditional flows."
            )
        return _check_inputs(x, self.dim, **times)

    def _guard(self, x, t, name: str):
        """Error (also under jit) at the singular time `0`."""
        return eqx.error_if(
            x,
            t <= 0,
            f"PointCloud: undefined at {name} = 0, where x is one of the data points "
            "and the velocity (x - E[x0 | x_t = x]) / t is 0 / 0 (no velocity at "
            "t = 0, and no map starts from s = 0).",
        )

    def _velocity(self, x, t):
        t = jnp.asarray(t, x.dtype)
        points = self.points.astype(x.dtype)
        distances = jnp.sum((x[None, :] - (1 - t) * points) ** 2, axis=1)
        # Logits measured from the nearest point, which gets logit 0. A point whose
        # weight would be below the dtype's smallest normal number gets -inf, in
        # value and derivative alike: for tiny `t` (1e-20 in float32, where `t²`
        # underflows) `gap / t²` would be inf, and its derivative inf times a zero
        # weight, NaN.
        gaps = distances - jax.lax.stop_gradient(jnp.min(distances))
        far = gaps > -2 * math.log(jnp.finfo(x.dtype).tiny) * t * t
        logits = jnp.where(far, -jnp.inf, -jnp.where(far, 0, gaps) / t / t / 2)
        return (x - jax.nn.softmax(logits) @ points) / t

    def velocity(self, x: Vector, t: Time, *, cond: Cond = None) -> Vector:
        """The exact marginal velocity `v(x, t) = (x - x̂(x, t)) / t` (see the class
        docstring); an error at `t = 0`.

        **Arguments:**

        - `x`: one example, shape `(dim,)`.
        - `t`: the time, a scalar.
        - `cond`: must be `None`.

        **Returns:** `v(x, t)`, shaped like `x`.
        """
        x = self._check(x, cond, t=t)
        return self._velocity(self._guard(x, t, "t"), t)

    def flow_map(self, x: Vector, s: Time, t: Time, *, cond: Cond = None) -> Vector:
        """The flow map `F(x, s, t)`: an adaptive Dopri8 solve, continued as a straight
        line below `t_min` towards data (see the class docstring).

        **Arguments:**

        - `x`: one example at time `s`, shape `(dim,)`.
        - `s`: the source time, a scalar (`s > 0`).
        - `t`: the target time, a scalar.
        - `cond`: must be `None`.

        **Returns:** `F(x, s, t)`, shaped like `x`.
        """
        return self._solve(x, s, t, cond)[0]

    def average_velocity(
        self, x: Vector, s: Time, t: Time, *, cond: Cond = None
    ) -> Vector:
        """The average velocity `V(x, s, t)`, with `F(x, s, t) = x + (t - s) V` and
        `V(x, t, t) = v(x, t)`, integrated directly (no division by `t - s`).

        Arguments as for `flow_map`. **Returns:** `V(x, s, t)`, shaped like `x`.
        """
        return self._solve(x, s, t, cond)[1]

    def _solve(self, x, s, t, cond):
        x = self._guard(self._check(x, cond, s=s, t=t), s, "s")
        s = jnp.asarray(s, x.dtype)
        t = jnp.asarray(t, x.dtype)
        t_m = jnp.maximum(t, jnp.minimum(s, self.t_min))
        x_m, average = self.solver(self._velocity, x, s, t_m)
        v_m = self._velocity(x_m, t_m)
        # V over [s, t] is the time-weighted mix of V over [s, t_m] and v_m over
        # [t_m, t]; both pieces run in the same direction, so the weight lies in
        # [0, 1] and stays well-conditioned as t -> s.
        same = t == s
        weight = jnp.where(same, 1, (t_m - s) / jnp.where(same, 1, t - s))
        return (
            x_m + (t - t_m) * v_m,
            weight * average + (1 - weight) * v_m,
        )

    def sample(
        self, key: PRNGKeyArray, n: int, *, cond: Cond = None
    ) -> Float[Array, "n dim"]:
        """`n` data samples: points drawn uniformly with replacement.

        **Arguments:**

        - `key`: a PRNG key.
        - `n`: the number of samples (static).
        - `cond`: must be `None`.

        **Returns:** an array of shape `(n, dim)`.
        """
        if cond is not None:
            raise TypeError(f"`PointCloud` is unconditional; got cond={cond!r}.")
        return self.points[jax.random.randint(key, (n,), 0, self.points.shape[0])]
