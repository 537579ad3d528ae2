"""Log-likelihoods: the change of variables through a flow map to noise, in a few
jumps, and the probability-flow ODE reference."""

import abc
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import ArrayLike, Float, PRNGKeyArray

from .._custom_types import Cond, Scalar, Time, Vector
from .._misc import call, check_example, time_grid
from ._lookahead import jump


# Pyright reads `AbstractClassVar` as a `ClassVar` only when imported so, in the
# module that uses it (equinox's docs; a re-export loses it).
if TYPE_CHECKING:
    from typing import ClassVar as AbstractClassVar
else:
    from equinox import AbstractClassVar


def _standard_normal_log_prob(z: Vector) -> Scalar:
    return -0.5 * (z @ z + z.shape[0] * math.log(2 * math.pi))


class AbstractLogDet(eqx.Module):
    """How [`fmcalc.apps.log_likelihood`][] computes `log |det ∂f/∂x|` of one jump
    `f = F(·, s, t)`."""

    @abc.abstractmethod
    def __call__(
        self, fn: Callable[[Vector], Vector], x: Vector, key: PRNGKeyArray | None
    ) -> Scalar:
        """`log |det ∂fn/∂x|` at `x`; `key` is `None` for a deterministic strategy."""

    needs_key: AbstractClassVar[bool]


class ExactLogDet(AbstractLogDet):
    """The exact Jacobian (`jax.jacfwd`, one forward-mode pass per dimension) and its
    log-determinant by LU: for small dimensions.

    **Arguments:** none.
    """

    needs_key: ClassVar[bool] = False

    def __call__(
        self, fn: Callable[[Vector], Vector], x: Vector, key: PRNGKeyArray | None
    ) -> Scalar:
        return jnp.linalg.slogdet(jax.jacfwd(fn)(x))[1]


class HutchinsonLogDet(AbstractLogDet):
    """A stochastic estimate for large dimensions, from products with the Jacobian
    only: `log |det J| = tr log(JᵀJ) / 2`, with the trace by Hutchinson's estimator
    `E[zᵀ A z] = tr A` over Rademacher probes `z` (Hutchinson 1989), and each
    `zᵀ log(JᵀJ) z` by `lanczos_steps` steps of Lanczos quadrature on `JᵀJ`
    (stochastic Lanczos quadrature, Ubaru, Chen and Saad 2017).

    Each probe costs `lanczos_steps` products `JᵀJ v` (a JVP and a VJP each). With
    `lanczos_steps ≥ dim` the quadrature is exact for each probe and only Hutchinson's
    variance remains; fewer steps suffice when the Jacobian's singular values are
    few or clustered, as for short jumps, whose Jacobian is near the identity.

    **Arguments:**

    - `probes`: the number of probe vectors (the estimate's standard error falls as
      `1 / √probes`).
    - `lanczos_steps`: Lanczos steps per probe (capped at the dimension).
    """

    probes: int = eqx.field(static=True, default=8)
    lanczos_steps: int = eqx.field(static=True, default=16)
    needs_key: ClassVar[bool] = True

    def __check_init__(self):
        for name in ("probes", "lanczos_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int; got {value!r}.")

    def __call__(
        self, fn: Callable[[Vector], Vector], x: Vector, key: PRNGKeyArray | None
    ) -> Scalar:
        assert key is not None  # `log_likelihood` checks `needs_key`
        _, forward = jax.linearize(fn, x)
        backward = jax.linear_transpose(forward, x)

        def gram(v):
            (out,) = backward(forward(v))
            return out

        steps = min(self.lanczos_steps, x.shape[0])
        probes = jax.random.rademacher(key, (self.probes, x.shape[0]), x.dtype)
        estimates = jax.vmap(lambda z: _lanczos_log_form(gram, z, steps))(probes)
        return 0.5 * jnp.mean(estimates)


def _lanczos_log_form(matvec, z, steps: int):
    """`zᵀ log(M) z` for a symmetric positive definite `M` given by `matvec`: `steps`
    Lanczos steps from `z` (fully re-orthogonalised), then Gauss quadrature with the
    eigenpairs `(θ_k, u_k)` of the tridiagonal matrix: `‖z‖² Σ_k u_k[0]² log θ_k`."""
    dtype = z.dtype
    norm = jnp.linalg.norm(z)
    q = z / norm
    basis = [q]
    alphas, betas = [], []
    previous, beta = jnp.zeros_like(z), jnp.zeros((), dtype)
    for j in range(steps):
        w = matvec(q)
        alpha = q @ w
        w = w - alpha * q - beta * previous
        stacked = jnp.stack(basis)
        w = w - stacked.T @ (stacked @ w)
        alphas.append(alpha)
        if j == steps - 1:
            break
        beta = jnp.linalg.norm(w)
        # A Krylov space exhausted early (z spans an invariant subspace): the rest of
        # the tridiagonal matrix is a zero block whose eigenvectors have no weight on
        # z, so zeroing the next vector keeps the quadrature exact.
        done = beta <= 100 * jnp.finfo(dtype).eps * (jnp.abs(alpha) + beta)
        beta = jnp.where(done, 0, beta)
        previous, q = q, jnp.where(done, 0, w / jnp.where(done, 1, beta))
        betas.append(beta)
        basis.append(q)
    tridiagonal = jnp.diag(jnp.stack(alphas))
    if betas:
        off = jnp.stack(betas)
        tridiagonal = tridiagonal + jnp.diag(off, 1) + jnp.diag(off, -1)
    theta, vectors = jnp.linalg.eigh(tridiagonal)
    tiny = jnp.finfo(dtype).tiny
    return norm**2 * jnp.sum(vectors[0] ** 2 * jnp.log(jnp.maximum(theta, tiny)))


def log_likelihood(
    model: Callable[..., Vector],
    x0: Vector,
    *,
    steps: int = 1,
    grid: Float[ArrayLike, " _"] | None = None,
    logdet: AbstractLogDet = ExactLogDet(),
    key: PRNGKeyArray | None = None,
    cond: Cond = None,
) -> Scalar:
    """`log p0(x0)` by the change of variables through the flow map to noise, in a
    few jumps.

    Along `0 = t_0 < t_1 < ... < t_K = 1`, `x_{i+1} = F(x_i, t_i, t_{i+1})` from
    `x_0 = x0` (as [`fmcalc.invert`][]), and

    `log p0(x0) = log N(x_K; 0, I) + Σ_i log |det ∂F(x_i, t_i, t_{i+1}) / ∂x_i|`.

    For an exact map this is exact for every grid (one jump suffices); for a learned
    map it is the log-density of the distribution the map pushes noise to as far as
    the map is invertible, and its error against the truth falls as the map's does
    (more jumps help a map that is more accurate over short intervals). Few-step
    likelihoods with flow maps: Rehman et al. 2025, "FALCON: Few-step accurate
    likelihoods for continuous flows"; Ai et al. 2026, "Joint distillation for fast
    likelihood evaluation and sampling in flow-based models".

    **Arguments:**

    - `model`: the average velocity, called per example as `model(x, s, t, cond=cond)`
      (a learned map must be trained for `t > s` too, e.g. with times from
      [`fmcalc.UniformSquare`][]).
    - `x0`: one data example, shape `(dim,)`; batch with `jax.vmap`.
    - `steps`, `grid`: the grid from `0` to `1`, as in [`fmcalc.invert`][].
    - `logdet`: [`fmcalc.apps.ExactLogDet`][] (default) or
      [`fmcalc.apps.HutchinsonLogDet`][].
    - `key`: a PRNG key, needed by `HutchinsonLogDet` (each jump folds in its index).
    - `cond`: conditioning passed on to every model call as `cond=` (when not
      `None`).

    **Returns:** the log-density, a scalar.
    """
    check_example("x0", x0)
    if not isinstance(logdet, AbstractLogDet):
        raise TypeError(
            "`logdet` must be `fmcalc.apps.ExactLogDet()` or "
            f"`fmcalc.apps.HutchinsonLogDet(...)`; got {logdet!r}."
        )
    if logdet.needs_key and key is None:
        raise ValueError(f"`{type(logdet).__name__}` draws probes: pass `key=`.")
    times = time_grid(steps, grid, "invert", x0.dtype)
    x, total = x0, jnp.zeros((), x0.dtype)
    for i in range(times.shape[0] - 1):
        s, t = times[i], times[i + 1]
        fn = eqx.Partial(jump, model, s=s, t=t, cond=cond)
        jump_key = None if key is None else jax.random.fold_in(key, i)
        total = total + logdet(fn, x, jump_key)
        x = fn(x)
    return _standard_normal_log_prob(x) + total


def augmented_field(
    t: Time,
    state: tuple[Vector, Scalar],
    args: tuple[Callable[..., Vector], Cond],
) -> tuple[Vector, Scalar]:
    """The vector field of the probability-flow ODE augmented with its log-density,

    `d(x, ℓ)/dt = (v(x, t), ∇·v(x, t))`,

    with the divergence exact (the trace of the Jacobian, built column by column in
    forward mode: `dim` Jacobian-vector products). Integrated from `t = 0` to `1` it
    gives `ℓ(1) - ℓ(0) = log p0(x0) - log p1(x(1))`: it is what
    [`fmcalc.apps.log_likelihood_ode`][] solves, in diffrax's convention
    `vector_field(t, y, args)` for `diffrax.ODETerm`.

    **Arguments:**

    - `t`: the time, a scalar.
    - `state`: `(x, ℓ)`, one example of shape `(dim,)` and the running integral of
      the divergence (which the field does not depend on).
    - `args`: `(velocity, cond)`: the velocity, called per example as
      `velocity(x, t)`, or `velocity(x, t, cond=cond)` when `cond` is not `None`.

    **Returns:** `(v(x, t), ∇·v(x, t))`.

    **Example:**

    ```python
    flow = fmcalc.flows.Gaussian(jnp.zeros(2), jnp.eye(2))
    v, divergence = fmcalc.apps.augmented_field(
        0.5, (jnp.ones(2), jnp.zeros(())), (flow.velocity, None)
    )
    ```
    """
    velocity, cond = args
    x, _ = state
    v, tangent = jax.linearize(lambda y: call(velocity, y, t, cond=cond), x)
    columns = jax.vmap(tangent)(jnp.eye(x.shape[0], dtype=x.dtype))
    return v, jnp.trace(columns)


def log_likelihood_ode(
    velocity: Callable[..., Vector],
    x0: Vector,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    max_steps: int = 4096,
    cond: Cond = None,
) -> Scalar:
    """The reference log-likelihood: `log p0(x0)` by integrating the
    probability-flow ODE from data to noise with the exact divergence,

    `log p0(x0) = log N(x(1); 0, I) + ∫_0^1 ∇·v(x(t), t) dt`, `dx/dt = v(x, t)`,

    in one adaptive solve (diffrax's `Tsit5`) of `x` and the integral together
    (Chen et al. 2018, "Neural ordinary differential equations"; Song et al. 2021,
    "Score-based generative modeling through stochastic differential equations").
    Each step evaluates the velocity and its full Jacobian (`dim` forward-mode
    passes), which is why it is the expensive baseline.

    **Arguments:**

    - `velocity`: the velocity, called per example as `velocity(x, t)` (or with
      `cond=`): an analytic flow's `flow.velocity`, or a model's own diagonal
      [`fmcalc.model_velocity`][]`(model)`.
    - `x0`: one data example, shape `(dim,)`; batch with `jax.vmap`.
    - `rtol`, `atol`: tolerances of the step-size controller. `None` picks by dtype:
      `1e-10` in float64, `1e-6` in float32.
    - `max_steps`: the most steps the solve may take (an error beyond).
    - `cond`: conditioning passed on to `velocity` as `cond=` (when not `None`).

    **Returns:** the log-density, a scalar.
    """
    check_example("x0", x0)
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if tol is not None and not tol > 0:
            raise ValueError(f"`{name}` must be positive or None; got {tol!r}.")
    dtype = x0.dtype
    default = 1e-10 if dtype == jnp.float64 else 1e-6
    solution = diffrax.diffeqsolve(
        diffrax.ODETerm(augmented_field),  # pyright: ignore[reportArgumentType]
        diffrax.Tsit5(),
        t0=jnp.zeros((), dtype),
        t1=jnp.ones((), dtype),
        dt0=None,
        y0=(x0, jnp.zeros((), dtype)),
        args=(velocity, cond),
        stepsize_controller=diffrax.PIDController(
            rtol=default if rtol is None else rtol,
            atol=default if atol is None else atol,
        ),
        max_steps=max_steps,
    )
    assert solution.ys is not None  # SaveAt(t1=True), the default
    x1, integral = solution.ys[0][0], solution.ys[1][0]
    return _standard_normal_log_prob(x1) + integral
