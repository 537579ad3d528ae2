"""Quadratic rewards, the exactly tilted Gaussian mixtures they make, and the exact
posterior expectation of a reward that look-aheads estimate."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from .._custom_types import Scalar, Time, Vector
from .._misc import check_example, in_unit_interval
from ..flows import Gaussian, GaussianMixture


class QuadraticReward(eqx.Module):
    """The reward `r(x) = -‖A (x - c)‖² / 2`: highest at the centre `c`, falling off
    along the rows of `A`.

    Tilting a Gaussian mixture by `exp(λ r)` gives a Gaussian mixture again, in closed
    form ([`fmcalc.apps.tilt`][]), so every steering strategy can be measured against
    the exact answer.

    **Arguments:**

    - `matrix`: `A`, shape `(m, dim)` (any `m`; `A = a I` weighs every direction
      alike, a single row rewards one direction only).
    - `center`: `c`, shape `(dim,)`.
    """

    matrix: Float[Array, "m dim"]
    center: Float[Array, " dim"]

    def __init__(self, matrix: Float[ArrayLike, "_ _"], center: Float[ArrayLike, " _"]):
        matrix, center = jnp.asarray(matrix), jnp.asarray(center)
        if center.ndim != 1:
            raise ValueError(
                f"`center` must have shape (dim,); got shape {center.shape}."
            )
        if matrix.ndim != 2 or matrix.shape[1] != center.shape[0]:
            raise ValueError(
                f"`matrix` must have shape (m, {center.shape[0]}) to match `center`; "
                f"got shape {matrix.shape}."
            )
        for name, a in (("matrix", matrix), ("center", center)):
            if not jnp.issubdtype(a.dtype, jnp.floating):
                raise TypeError(f"`{name}` must be a floating array; got {a.dtype}.")
        self.matrix = matrix
        self.center = center

    def __call__(self, x: Vector) -> Scalar:
        """`r(x)` for one example `x` of shape `(dim,)`."""
        y = self.matrix.astype(x.dtype) @ (x - self.center.astype(x.dtype))
        return -0.5 * (y @ y)


def _components(flow: Gaussian | GaussianMixture):
    """Weights, means, eigenvalues and eigenvectors of every component."""
    if isinstance(flow, Gaussian):
        return (
            jnp.ones(1, flow.mean.dtype),
            flow.mean[None],
            flow.eigvals[None],
            flow.eigvecs[None],
        )
    if isinstance(flow, GaussianMixture):
        return flow.weights, flow.means, flow.eigvals, flow.eigvecs
    raise TypeError(
        "The exact tilt and posterior need a `fmcalc.flows.Gaussian` or "
        f"`fmcalc.flows.GaussianMixture`; got {type(flow).__name__}."
    )


def _check_reward(reward, dim: int) -> None:
    if not isinstance(reward, QuadraticReward):
        raise TypeError(
            "The exact tilt and posterior are closed-form for a "
            f"`fmcalc.apps.QuadraticReward`; got {type(reward).__name__}."
        )
    if reward.center.shape != (dim,):
        raise ValueError(
            f"The reward's centre has shape {reward.center.shape}; the flow's data "
            f"have dimension {dim}."
        )


def _tilted(flow, reward, strength):
    """The tilted components in float64: unnormalised log-weights
    `log(w_k E_k[exp(λ r)])`, means and covariances, and the flow's dtype."""
    weights, means, eigvals, eigvecs = _components(flow)
    _check_reward(reward, means.shape[1])
    strength = float(strength)
    if not np.isfinite(strength):
        raise ValueError(f"`strength` must be finite; got {strength}.")
    dtype = means.dtype
    lam = np.asarray(eigvals, np.float64)
    q = np.asarray(eigvecs, np.float64)
    a = np.asarray(reward.matrix, np.float64)
    c = np.asarray(reward.center, np.float64)
    dim = means.shape[1]
    m = strength * a.T @ a
    identity = np.eye(dim)
    # `Sigma⁻¹ + λ AᵀA` is positive definite iff `1 + λ μ > 0` for the largest
    # eigenvalue `μ` of `Sigma^½ AᵀA Sigma^½`, for every component.
    roots = [q[k] * np.sqrt(lam[k]) for k in range(means.shape[0])]
    largest = max(float(np.linalg.eigvalsh(r.T @ a.T @ a @ r)[-1]) for r in roots)
    if 1 + strength * largest <= 0:
        raise ValueError(
            f"`strength` = {strength} makes exp(λ r) grow faster than the "
            "distribution decays, so the tilted distribution has no normaliser "
            f"(Sigma⁻¹ + λ AᵀA is not positive definite); `strength` must be "
            f"greater than {-1 / largest:.6g} for this flow and reward."
        )
    new_weights, new_means, new_covs = [], [], []
    for k in range(means.shape[0]):
        sigma = (q[k] * lam[k]) @ q[k].T
        mean = np.asarray(means[k], np.float64)
        solve = np.linalg.solve(identity + sigma @ m, identity)
        cov = sigma @ np.linalg.solve(identity + m @ sigma, identity)
        new_covs.append((cov + cov.T) / 2)
        new_means.append(solve @ (mean + sigma @ m @ c))
        gap = mean - c
        new_weights.append(
            np.log(float(weights[k]))
            - 0.5 * np.linalg.slogdet(identity + sigma @ m)[1]
            - 0.5 * gap @ m @ solve @ gap
        )
    return np.asarray(new_weights), new_means, new_covs, dtype


def log_normalizer(
    flow: Gaussian | GaussianMixture, reward: QuadraticReward, strength: float
) -> float:
    """The exact `log Z`, `Z = E_p[exp(λ r(x))]`, of a Gaussian (mixture) `p` and a
    quadratic reward: `log Σ_k w_k E_k[exp(λ r)]` with the components' closed forms
    of [`fmcalc.apps.tilt`][]. What
    [`fmcalc.apps.Particles`][]`.log_normalizer` estimates.

    **Arguments:** as [`fmcalc.apps.tilt`][].

    **Returns:** a Python float.
    """
    log_w = _tilted(flow, reward, strength)[0]
    top = float(np.max(log_w))
    return top + float(np.log(np.sum(np.exp(log_w - top))))


def tilt(
    flow: Gaussian | GaussianMixture,
    reward: QuadraticReward,
    strength: float,
) -> Gaussian | GaussianMixture:
    """The tilted distribution `p(x) exp(λ r(x)) / Z` of a Gaussian (mixture) `p` and
    a quadratic reward, exactly: the same kind of flow, so its exact velocity, flow
    map, samples and log-density are there to measure steering against.

    With `r(x) = -‖A (x - c)‖² / 2`, `M = λ AᵀA`, each component `w_k N(mu_k, Sigma_k)`
    becomes `w'_k N(mu'_k, Sigma'_k)` with

    - `Sigma'_k = (Sigma_k⁻¹ + M)⁻¹ = Sigma_k (I + M Sigma_k)⁻¹`,
    - `mu'_k = (I + Sigma_k M)⁻¹ (mu_k + Sigma_k M c)`,
    - `w'_k ∝ w_k E_k[exp(λ r)] = w_k det(I + Sigma_k M)^(-1/2)
      exp(-(mu_k - c)ᵀ M (I + Sigma_k M)⁻¹ (mu_k - c) / 2)`.

    Computed in float64 with numpy (so `strength` is a concrete number) and returned
    in the flow's dtype; a mixture keeps its labels and solver options. Tilted weights
    below the dtype's smallest normal number are raised to it, so that every
    component stays valid.

    **Arguments:**

    - `flow`: a [`fmcalc.flows.Gaussian`][] or [`fmcalc.flows.GaussianMixture`][].
    - `reward`: a [`fmcalc.apps.QuadraticReward`][].
    - `strength`: `λ`; `0` returns the same distribution. A negative `λ` pushes mass
      away from `c` and is allowed while every tilted covariance stays positive
      definite.

    **Returns:** a flow of the same kind as `flow`.
    """
    log_w, new_means, new_covs, dtype = _tilted(flow, reward, strength)
    if isinstance(flow, Gaussian):
        return Gaussian(
            jnp.asarray(new_means[0], dtype), jnp.asarray(new_covs[0], dtype)
        )
    w = np.exp(log_w - log_w.max())
    w = np.maximum(w / w.sum(), float(jnp.finfo(dtype).tiny))
    solver = flow.solver
    return GaussianMixture(
        jnp.asarray(w / w.sum(), dtype),
        jnp.asarray(np.stack(new_means), dtype),
        jnp.asarray(np.stack(new_covs), dtype),
        labels=flow.labels,
        **solver.options,
    )


def expected_reward(
    flow: Gaussian | GaussianMixture,
    reward: QuadraticReward,
    x: Vector,
    t: Time,
) -> Scalar:
    """The exact posterior expectation `E[r(x0) | x_t = x]` of a quadratic reward under
    a Gaussian (mixture), the quantity a look-ahead's `r(x̂0(x_t, t))` stands in for.

    Given `x_t = (1 - t) x0 + t eps` and component `k`, `x0` is Gaussian with
    covariance `S_k = Q_k diag(λ_k t² / c_t) Q_kᵀ` and mean
    `m_k = mu_k + Q_k diag((1 - t) λ_k / c_t) Q_kᵀ (x - (1 - t) mu_k)`
    (`c_t = (1 - t)² λ_k + t²`, eigenvalues `λ_k` and eigenvectors `Q_k` of
    `Sigma_k`); components are weighted by their posterior probability, and
    `E_k[r] = -(‖A (m_k - c)‖² + tr(A S_k Aᵀ)) / 2`.

    The difference `r(x̂0(x, t)) - E[r(x0) | x_t = x]` is a look-ahead's bias as a
    reward estimate. A flow-map look-ahead is one outcome, so it misses the
    posterior's spread (the trace term) and, on a mixture, may pick the wrong
    component; Tweedie's mean misses the spread as well and sits between components.

    **Arguments:**

    - `flow`: a [`fmcalc.flows.Gaussian`][] or [`fmcalc.flows.GaussianMixture`][]
      (unconditional).
    - `reward`: a [`fmcalc.apps.QuadraticReward`][].
    - `x`: one state `x_t`, shape `(dim,)`; batch with `jax.vmap`.
    - `t`: its time, a scalar in `[0, 1]`.

    **Returns:** `E[r(x0) | x_t = x]`, a scalar.
    """
    weights, means, eigvals, eigvecs = _components(flow)
    _check_reward(reward, means.shape[1])
    check_example("x", x)
    if jnp.ndim(t) != 0:
        raise ValueError(f"`t` must be a scalar time; got shape {jnp.shape(t)}.")
    x = in_unit_interval("t", t, x)
    dtype = x.dtype
    t = jnp.asarray(t, dtype)
    means, lam, q = means.astype(dtype), eigvals.astype(dtype), eigvecs.astype(dtype)
    a = reward.matrix.astype(dtype)
    c_t = (1 - t) ** 2 * lam + t**2
    y = jnp.einsum("kji,kj->ki", q, x[None, :] - (1 - t) * means)
    log_density = -0.5 * jnp.sum(jnp.log(c_t) + y**2 / c_t, axis=1)
    posterior = jax.nn.softmax(jnp.log(weights.astype(dtype)) + log_density)
    mean = means + jnp.einsum("kij,kj->ki", q, (1 - t) * lam / c_t * y)
    spread = jnp.einsum(
        "kj,kj->k",
        lam * t**2 / c_t,
        jnp.sum(jnp.einsum("ij,kjl->kil", a, q) ** 2, axis=1),
    )
    gap = jnp.einsum("ij,kj->ki", a, mean - reward.center.astype(dtype)[None, :])
    return posterior @ (-0.5 * (jnp.sum(gap**2, axis=1) + spread))
