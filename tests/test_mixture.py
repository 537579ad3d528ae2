"""Gaussian mixtures and point clouds: exact velocities, and flow maps from an ODE
solve that satisfy every flow-map identity to the solver's accuracy.

Solves dominate the run time through compilation (a few seconds per jitted solve),
so the solve-based checks use fixed flows and a few module-level jitted functions
that take the flow as an argument; the cheap velocity checks run under hypothesis.
"""

import functools

import diffrax
import equinox as eqx
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmcalc.flows import Gaussian, GaussianMixture, PointCloud


BATCH = 16
TOL = {jnp.float64: 1e-8, jnp.float32: 1e-4}
"""Absolute tolerance of the solve-based identities (|x| ~ 5)."""


def mixture_parameters(seed: int, k: int, dim: int):
    """Weights in [0.5, 1.5] normalised, means ~ N(0, 4 I), covariance eigenvalues
    log-uniform in [0.05, 1] with random eigenvectors (numpy, float64)."""
    rng = np.random.default_rng(seed)
    weights = rng.uniform(0.5, 1.5, k)
    means = 2 * rng.standard_normal((k, dim))
    q, _ = np.linalg.qr(rng.standard_normal((k, dim, dim)))
    lam = np.exp(rng.uniform(np.log(0.05), 0.0, (k, dim)))
    covs = (q * lam[:, None, :]) @ np.swapaxes(q, 1, 2)
    return weights / weights.sum(), means, (covs + np.swapaxes(covs, 1, 2)) / 2


def random_mixture(seed: int, k: int, dim: int, dtype=jnp.float64, **kwargs):
    weights, means, covs = mixture_parameters(seed, k, dim)
    return GaussianMixture(
        jnp.asarray(weights, dtype),
        jnp.asarray(means, dtype),
        jnp.asarray(covs, dtype),
        **kwargs,
    )


def random_cloud(seed: int, n: int, dim: int, **kwargs) -> PointCloud:
    rng = np.random.default_rng(seed)
    return PointCloud(jnp.asarray(1.5 * rng.standard_normal((n, dim))), **kwargs)


@eqx.filter_jit
def flow_map_jvp(flow, x, s, t, dx, ds, dt):
    """Batched `(F, dF)` along the tangent `(dx, ds, dt)`; its primal is the flow map,
    so one compiled solve serves both."""
    return jax.vmap(lambda *a: jax.jvp(flow.flow_map, a[:3], a[3:]))(
        x, s, t, dx, ds, dt
    )


def flow_map(flow, x, s, t):
    zero = jnp.zeros_like(s)
    return flow_map_jvp(flow, x, s, t, jnp.zeros_like(x), zero, zero)[0]


@eqx.filter_jit
def average_velocity(flow, x, s, t, cond=None):
    """Batched `V`; `cond` is `None` or one label per row."""
    return jax.vmap(lambda x, s, t, c: flow.average_velocity(x, s, t, cond=c))(
        x, s, t, cond
    )


@eqx.filter_jit
def velocity(flow, x, t):
    return jax.vmap(flow.velocity)(x, t)


def velocity_at(flow, x, t, cond=None):
    """One example, jitted (eager dispatch would compile every op per shape); times
    and labels become arrays so that new values do not recompile."""
    cond = None if cond is None else jnp.asarray(cond)
    return _velocity_at(flow, x, jnp.asarray(t), cond)


@eqx.filter_jit
def _velocity_at(flow, x, t, cond):
    return flow.velocity(x, t, cond=cond)


def on_flow(flow, n: int, dtype, seed: int = 0):
    """Points `x_s` on the flow and times `s, u, t`; the first rows pin edge times."""
    k_data, k_noise, k_times = jax.random.split(jax.random.key(seed), 3)
    x0 = flow.sample(k_data, n).astype(dtype)
    eps = jax.random.normal(k_noise, x0.shape, dtype)
    s, u, t = jax.random.uniform(k_times, (3, n), dtype)
    s = s.at[:4].set(jnp.array([0.0, 1.0, 1.0, 0.3], dtype))
    t = t.at[:4].set(jnp.array([1.0, 0.0, 1.0, 0.3 + 1e-9], dtype))
    x = (1 - s)[:, None] * x0 + s[:, None] * eps
    return x, s, u, t


def identity_residuals(flow, x, s, u, t, reference=None) -> dict[str, float]:
    """Max absolute residual of each flow-map identity over the batch."""
    zero, one = jnp.zeros_like(s), jnp.ones_like(s)
    F, dF_dt = flow_map_jvp(flow, x, s, t, jnp.zeros_like(x), zero, one)
    V = average_velocity(flow, x, s, t)
    v_s = velocity(flow, x, s)
    residuals = {
        "semigroup": flow_map(flow, flow_map(flow, x, s, u), u, t) - F,
        "inverse": flow_map(flow, F, t, s) - x,
        "boundary": flow_map(flow, x, t, t) - x,
        "diagonal": average_velocity(flow, x, s, s) - v_s,
        "parameterisation": x + (t - s)[:, None] * V - F,
        "lagrangian": dF_dt - velocity(flow, F, t),
        "eulerian": flow_map_jvp(flow, x, s, t, v_s, one, zero)[1],
    }
    if reference is not None:
        V_reference = average_velocity(reference, x, s, t)
        # The reference's F = x + (t - s) V holds to round-off by construction
        # ("parameterisation" checks it on the same code), so one compiled solve of
        # the reference suffices.
        residuals["F vs reference"] = x + (t - s)[:, None] * V_reference - F
        residuals["V vs reference"] = V_reference - V
    return {name: float(jnp.max(jnp.abs(r))) for name, r in residuals.items()}


IDENTITIES = (
    "semigroup",
    "inverse",
    "boundary",
    "diagonal",
    "parameterisation",
    "lagrangian",
    "eulerian",
)


@functools.cache
def mixture_case(dim: int):
    """A K = 4 mixture and its identity residuals (against a 1e-12 solve), computed
    once per dimension for all the tests that read them."""
    flow = random_mixture(0, 4, dim)
    reference = random_mixture(0, 4, dim, rtol=1e-12, atol=1e-12)
    x, s, u, t = on_flow(flow, BATCH, jnp.float64)
    return flow, identity_residuals(flow, x, s, u, t, reference)


@pytest.mark.slow
@pytest.mark.parametrize("dim", [2, 8])
@pytest.mark.parametrize("name", IDENTITIES + ("F vs reference", "V vs reference"))
def test_identities_float64(dim, name):
    _, residuals = mixture_case(dim)
    assert residuals[name] <= TOL[jnp.float64], residuals


@pytest.mark.slow
@pytest.mark.parametrize("dim", [2, 8])
def test_exact_identities_float64(dim):
    """`F(x, t, t) = x` exactly; `V(x, t, t) = v` and `F = x + (t - s) V` to
    round-off, since `V` is integrated directly."""
    _, residuals = mixture_case(dim)
    assert residuals["boundary"] == 0.0
    assert residuals["diagonal"] <= 1e-13
    assert residuals["parameterisation"] <= 1e-13


@pytest.mark.slow
def test_identities_float32():
    flow = random_mixture(0, 4, 2, jnp.float32)
    x, s, u, t = on_flow(flow, BATCH, jnp.float32)
    residuals = identity_residuals(flow, x, s, u, t)
    assert max(residuals.values()) <= TOL[jnp.float32], residuals
    assert flow_map(flow, x, s, t).dtype == jnp.float32


@pytest.mark.slow
def test_pushforward_of_noise_has_data_mean():
    """4096 noise samples pushed from 1 to 0 have the data mean (5 standard errors)."""
    flow, _ = mixture_case(2)
    n = 4096
    eps = jax.random.normal(jax.random.key(1), (n // BATCH, BATCH, flow.dim))
    one, zero = jnp.ones(BATCH), jnp.zeros(BATCH)
    # In batches of the fixture's shape, so the compiled solve is reused.
    x0 = jnp.concatenate([flow_map(flow, e, one, zero) for e in eps])
    weights = np.asarray(flow.weights)[:, None]
    means = np.asarray(flow.means)
    mean = np.sum(weights * means, axis=0)
    within = np.einsum("k,kd->d", weights[:, 0], np.asarray(flow.eigvals))
    between = np.sum(weights * (means - mean) ** 2, axis=0)
    standard_error = np.sqrt((within + between) / n)
    np.testing.assert_array_less(np.abs(np.mean(x0, axis=0) - mean), 5 * standard_error)


@pytest.mark.slow
def test_reverse_mode_matches_forward_mode():
    """The default adjoint supports `jax.grad` as well as `jax.jvp`: the gradient of
    `Σ F²` matches its directional derivatives from the forward-mode solve."""
    flow = random_mixture(0, 4, 2)
    x, s, _, t = on_flow(flow, BATCH, jnp.float64)

    def loss(x, s, t):
        return jnp.sum(flow.flow_map(x, s, t) ** 2)

    gx, gs, gt = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1, 2))))(x, s, t)
    dx = jax.random.normal(jax.random.key(3), x.shape)
    ds, dt = -0.5 * jnp.ones_like(s), 1.3 * jnp.ones_like(t)
    F, dF = flow_map_jvp(flow, x, s, t, dx, ds, dt)
    np.testing.assert_allclose(
        jnp.sum(gx * dx, axis=1) + gs * ds + gt * dt,
        2 * jnp.sum(F * dF, axis=1),
        rtol=1e-8,
        atol=1e-8,
    )


@hypothesis.given(seed=st.integers(0, 2**32 - 1), dim=st.integers(1, 4))
def test_single_component_velocity_is_gaussian(seed, dim):
    _, means, covs = mixture_parameters(seed, 1, dim)
    mixture = GaussianMixture(jnp.ones(1), jnp.asarray(means), jnp.asarray(covs))
    gaussian = Gaussian(jnp.asarray(means[0]), jnp.asarray(covs[0]))
    rng = np.random.default_rng(seed)
    x = jnp.asarray(3 * rng.standard_normal(dim))
    for t in (0.0, 1e-3, rng.uniform(), 1.0):
        np.testing.assert_allclose(
            velocity_at(mixture, x, t), velocity_at(gaussian, x, t), atol=1e-12
        )


@pytest.mark.slow
def test_single_component_maps_are_gaussian():
    _, means, covs = mixture_parameters(3, 1, 2)
    mixture = GaussianMixture(jnp.ones(1), jnp.asarray(means), jnp.asarray(covs))
    gaussian = Gaussian(jnp.asarray(means[0]), jnp.asarray(covs[0]))
    x, s, _, t = on_flow(mixture, BATCH, jnp.float64)
    F = flow_map(mixture, x, s, t)
    V = average_velocity(mixture, x, s, t)
    np.testing.assert_allclose(F, jax.vmap(gaussian.flow_map)(x, s, t), atol=1e-9)
    np.testing.assert_allclose(
        V, jax.vmap(gaussian.average_velocity)(x, s, t), atol=1e-9
    )


LABELS = np.array([0, 1, 0, 2, 1])


def labelled_mixture(seed: int, dim: int) -> GaussianMixture:
    return random_mixture(seed, len(LABELS), dim, labels=jnp.asarray(LABELS))


def restricted(seed: int, dim: int, label: int) -> GaussianMixture:
    """`labelled_mixture(seed, dim)` restricted to one class, weights renormalised."""
    weights, means, covs = mixture_parameters(seed, len(LABELS), dim)
    keep = LABELS == label
    return GaussianMixture(
        jnp.asarray(weights[keep] / weights[keep].sum()),
        jnp.asarray(means[keep]),
        jnp.asarray(covs[keep]),
    )


@pytest.mark.slow
@hypothesis.given(
    seed=st.integers(0, 2**32 - 1), dim=st.integers(1, 4), label=st.integers(0, 2)
)
def test_conditional_velocity_is_restricted_mixture(seed, dim, label):
    rng = np.random.default_rng(seed)
    x, t = jnp.asarray(3 * rng.standard_normal(dim)), rng.uniform()
    np.testing.assert_allclose(
        velocity_at(labelled_mixture(seed, dim), x, t, label),
        velocity_at(restricted(seed, dim, label), x, t),
        atol=1e-12,
    )


@eqx.filter_jit
def guided_at(flow, x, t, cond, scale):
    return flow.guided_velocity(x, t, cond, scale)


@pytest.mark.slow
@hypothesis.given(seed=st.integers(0, 2**32 - 1), dim=st.integers(1, 4))
def test_guided_velocity_is_linear_in_scale(seed, dim):
    mixture = labelled_mixture(seed, dim)
    rng = np.random.default_rng(seed)
    x, t, label = jnp.asarray(3 * rng.standard_normal(dim)), rng.uniform(), 1
    label, t = jnp.asarray(label), jnp.asarray(t)
    unconditional = velocity_at(mixture, x, t)
    conditional = velocity_at(mixture, x, t, label)
    for scale in (0.0, 1.0, 2.5, -0.5):
        np.testing.assert_allclose(
            guided_at(mixture, x, t, label, jnp.asarray(scale)),
            unconditional + scale * (conditional - unconditional),
            atol=1e-12,
        )


@pytest.mark.slow
def test_conditional_maps_and_samples_use_the_class():
    """Traced labels under vmap select the class's components in the solve and in
    sampling."""
    mixture = labelled_mixture(1, 2)
    labels = jnp.array([0, 1, 1, 0])
    x, s, _, t = on_flow(mixture, 4, jnp.float64, seed=2)
    V = average_velocity(mixture, x, s, t, labels)
    for label in (0, 1):
        V_class = average_velocity(restricted(1, 2, label), x, s, t)
        np.testing.assert_allclose(
            V[labels == label], V_class[labels == label], atol=1e-8
        )
    samples = mixture.sample(jax.random.key(0), 4096, cond=2)
    only = restricted(1, 2, 2)
    standard_error = np.sqrt(np.max(np.asarray(only.eigvals)) / 4096)
    np.testing.assert_array_less(
        np.abs(np.mean(samples, axis=0) - only.means[0]), 5 * standard_error
    )


def brute_force_velocity(points, x, t):
    """`(x - Σ_i π_i p_i) / t` with the posterior normalised by hand in float64."""
    points, x = np.asarray(points, np.float64), np.asarray(x, np.float64)
    log_weights = -np.sum((x - (1 - t) * points) ** 2, axis=1) / (2 * t**2)
    weights = np.exp(log_weights - log_weights.max())
    weights /= weights.sum()
    return (x - weights @ points) / t


@pytest.mark.slow
@hypothesis.given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 6),
    dim=st.integers(1, 4),
    t=st.floats(0.01, 1.0),
)
def test_point_cloud_velocity_is_posterior_formula(seed, n, dim, t):
    cloud = random_cloud(seed, n, dim)
    x = jnp.asarray(2 * np.random.default_rng(seed).standard_normal(dim))
    np.testing.assert_allclose(
        velocity_at(cloud, x, t),
        brute_force_velocity(cloud.points, x, t),
        rtol=1e-10,
        atol=1e-10,
    )


@hypothesis.given(seed=st.integers(0, 2**32 - 1), t=st.floats(0.1, 1.0))
def test_point_cloud_is_mixture_of_tiny_gaussians(seed, t):
    n, dim, variance = 5, 3, 1e-10
    cloud = random_cloud(seed, n, dim)
    mixture = GaussianMixture(
        jnp.full(n, 1 / n),
        cloud.points,
        jnp.broadcast_to(variance * jnp.eye(dim), (n, dim, dim)),
    )
    x = jnp.asarray(2 * np.random.default_rng(seed).standard_normal(dim))
    np.testing.assert_allclose(
        velocity_at(cloud, x, t), velocity_at(mixture, x, t), atol=1e-5
    )


@pytest.mark.slow
def test_point_cloud_identities_and_data_end():
    """Identities away from the data end, and maps towards `t = 0` that cross the
    straight-line zone below `t_min` land on data points."""
    cloud = random_cloud(0, 6, 2)
    n = BATCH
    k_data, k_noise, k_times = jax.random.split(jax.random.key(0), 3)
    eps = jax.random.normal(k_noise, (n, 2))
    s, u, t = jax.random.uniform(k_times, (3, n), minval=0.05)
    s = s.at[0].set(1.0)
    # On the flow: a point off it at small s sits where p_s is exponentially small,
    # and the map back there (the inverse) amplifies solver error by as much (the
    # Jacobian determinant of F(., s, t) is p_s(x) / p_t(F)).
    x = (1 - s)[:, None] * cloud.sample(k_data, n) + s[:, None] * eps
    residuals = identity_residuals(cloud, x, s, u, t)
    assert max(residuals.values()) <= TOL[jnp.float64], residuals

    one, zero = jnp.ones(n), jnp.zeros(n)
    x0 = flow_map(cloud, eps, one, zero)
    gaps = x0[:, None, :] - cloud.points[None, :, :]
    distance = jnp.min(jnp.linalg.norm(gaps, axis=-1), axis=1)
    assert float(jnp.max(distance)) <= 1e-12
    # Explicit dtypes: a weakly typed time would recompile every solve.
    below = jnp.full(n, 0.5 * cloud.t_min, jnp.float64)
    via_straight_zone = flow_map(cloud, flow_map(cloud, eps, one, below), below, zero)
    np.testing.assert_allclose(via_straight_zone, x0, atol=1e-12)
    through = identity_residuals(cloud, eps, one, below, 0.4 * below)
    # Mapping back up from t ~ 1e-5 amplifies the solver's error by ~1/t (paths fan
    # out from the points), so the inverse is not checked there.
    del through["inverse"]
    assert max(through.values()) <= TOL[jnp.float64], through

    samples = cloud.sample(jax.random.key(1), 32)
    assert jnp.all(
        jnp.any(jnp.all(samples[:, None, :] == cloud.points[None, :, :], -1), -1)
    )


def test_point_cloud_singular_at_data_end():
    cloud = random_cloud(0, 3, 2)
    x = jnp.zeros(2)
    with pytest.raises(Exception, match="undefined at t = 0"):
        eqx.filter_jit(cloud.velocity)(x, jnp.asarray(0.0))
    with pytest.raises(Exception, match="undefined at s = 0"):
        eqx.filter_jit(cloud.flow_map)(x, jnp.asarray(0.0), jnp.asarray(0.5))


@pytest.mark.slow
def test_fixed_steps_converge_at_fourth_order_and_agree_with_the_adaptive_solve():
    """`steps=n` (RK4): `F` and its derivative along `(dx, ds, dt)` match a tight
    adaptive solve, with errors that fall about 16x per doubling of `n`, on the
    test suite's mixture and on the kit's narrow one (the harder of the two)."""
    from fmcalc.testing import asymmetric_mixture

    cases = {
        "random": lambda **kw: random_mixture(1, 4, 2, **kw),
        "narrow": lambda **kw: asymmetric_mixture(**kw),
    }
    for name, make in cases.items():
        reference = make(rtol=1e-13, atol=1e-13)
        x, s, _, t = on_flow(reference, BATCH, jnp.float64)
        dx, ds, dt = jnp.ones_like(x), jnp.ones_like(s), -jnp.ones_like(t)
        F0, dF0 = flow_map_jvp(reference, x, s, t, dx, ds, dt)
        errors = []
        for steps in (128, 256, 512):
            F, dF = flow_map_jvp(make(steps=steps), x, s, t, dx, ds, dt)
            errors.append(
                max(float(jnp.max(jnp.abs(F - F0))), float(jnp.max(jnp.abs(dF - dF0))))
            )
        orders = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
        assert np.all(orders > 3.5), (name, errors)
        if name == "random":
            assert errors[1] < 1e-8, errors


def test_fixed_steps_refuse_the_adaptive_options():
    weights, means, covs = map(jnp.asarray, mixture_parameters(0, 4, 2))
    for bad in (0, -3, True):
        with pytest.raises(
            ValueError, match=rf"`steps` must be a positive int.*{bad!r}"
        ):
            GaussianMixture(weights, means, covs, steps=bad)
    with pytest.raises(ValueError, match=r"`steps=64`.*has no `rtol`, `adjoint`"):
        GaussianMixture(
            weights, means, covs, steps=64, rtol=1e-8, adjoint=diffrax.DirectAdjoint()
        )
    with pytest.raises(ValueError, match=r"`steps=8`.*has no `atol`"):
        PointCloud(means, steps=8, atol=1e-6)


def test_bad_inputs_raise_clear_errors():
    weights, means, covs = map(jnp.asarray, mixture_parameters(0, 4, 2))
    mixture = GaussianMixture(weights, means, covs)
    with pytest.raises(ValueError, match=r"`weights` must have shape \(4,\)"):
        GaussianMixture(weights[:3] / jnp.sum(weights[:3]), means, covs)
    with pytest.raises(ValueError, match=r"`covs` must have shape \(4, 2, 2\)"):
        GaussianMixture(weights, means, covs[:, :1, :1])
    with pytest.raises(ValueError, match="must sum to 1"):
        GaussianMixture(0.9 * weights, means, covs)
    with pytest.raises(ValueError, match="must be positive"):
        GaussianMixture(jnp.array([1.5, -0.5, 0.5, -0.5]), means, covs)
    with pytest.raises(ValueError, match="must be symmetric"):
        GaussianMixture(weights, means, covs.at[0, 0, 1].add(0.1))
    with pytest.raises(ValueError, match="positive definite"):
        GaussianMixture(weights, means, covs.at[1].set(jnp.diag(jnp.array([1.0, 0]))))
    with pytest.raises(ValueError, match=r"`labels` must be an integer array"):
        GaussianMixture(weights, means, covs, labels=jnp.array([0, 1]))
    with pytest.raises(ValueError, match=r"`x` must be one example of shape \(2,\)"):
        mixture.velocity(jnp.zeros(3), 0.5)
    with pytest.raises(TypeError, match="has no `labels`"):
        mixture.velocity(jnp.zeros(2), 0.5, cond=1)
    labelled = labelled_mixture(0, 2)
    with pytest.raises(TypeError, match="integer class label"):
        labelled.velocity(jnp.zeros(2), 0.5, cond=1.0)
    with pytest.raises(Exception, match=r"not a class of this mixture.*\(0, 1, 2\)"):
        jax.jit(lambda c: labelled.velocity(jnp.zeros(2), 0.5, cond=c))(7)
    with pytest.raises(TypeError, match="`PointCloud` is unconditional"):
        random_cloud(0, 3, 2).velocity(jnp.zeros(2), 0.5, cond=0)
    with pytest.raises(ValueError, match="`points` must have shape"):
        PointCloud(jnp.zeros((0, 2)))


def test_log_prob_is_the_marginal_density():
    """`log_prob(x, t)` is the log of `Σ_k w_k N(x; (1 - t) mu_k, C_k(t))`, and
    with `cond` the density of that class alone."""
    weights, means, covs = mixture_parameters(4, len(LABELS), 2)
    mixture = labelled_mixture(4, 2)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((8, 2)))

    def reference(x, t, keep):
        w = weights[keep] / weights[keep].sum()
        total = 0.0
        for w_k, mu, cov in zip(w, means[keep], covs[keep], strict=True):
            c_t = (1 - t) ** 2 * cov + t**2 * np.eye(2)
            y = x - (1 - t) * mu
            quadratic = np.einsum("ni,ij,nj->n", y, np.linalg.inv(c_t), y)
            total = total + w_k * np.exp(-0.5 * quadratic) / np.sqrt(
                np.linalg.det(2 * np.pi * c_t)
            )
        return np.log(total)

    everything = np.ones(len(LABELS), bool)
    for t in (0.0, 0.4, 1.0):
        got = jax.vmap(mixture.log_prob, in_axes=(0, None))(x, t)
        np.testing.assert_allclose(got, reference(np.asarray(x), t, everything))
    got = jax.vmap(lambda x: mixture.log_prob(x, 0.2, cond=jnp.asarray(1)))(x)
    np.testing.assert_allclose(got, reference(np.asarray(x), 0.2, LABELS == 1))
