"""`fmcalc.apps` against exact answers: with an analytic flow's exact map, the few-step
likelihood is the closed-form log-density, the round trip is the identity, and every
steering strategy has a case whose answer is known (no tilt, a constant reward, and
the closed-form tilted distribution)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import without_runtime_typechecks

import fmcalc
from fmcalc import apps
from fmcalc.flows import Gaussian, GaussianMixture, PointCloud


def full_gaussian(dim: int = 3, seed: int = 0) -> Gaussian:
    """A float64 Gaussian whose covariance has eigenvalues 0.05 to 2 along random
    axes (so no Jacobian along the flow is diagonal)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    cov = (q * np.geomspace(0.05, 2.0, dim)) @ q.T
    return Gaussian(jnp.asarray(rng.standard_normal(dim)), jnp.asarray(cov + cov.T) / 2)


def two_modes() -> GaussianMixture:
    """Two correlated 2-d components far apart: a look-ahead can pick the wrong one."""
    return GaussianMixture(
        jnp.asarray([0.3, 0.7]),
        jnp.asarray([[-2.0, 0.0], [2.0, 1.0]]),
        jnp.asarray([[[0.3, 0.1], [0.1, 0.2]], [[0.5, -0.2], [-0.2, 0.3]]]),
    )


GAUSSIAN = full_gaussian()
MIXTURE = two_modes()
# A 2-d Gaussian for the steering tests: the tilt moves its mean by about one standard
# deviation, so a wrong strategy is visible at a few thousand samples.
STEERED = Gaussian(jnp.asarray([1.0, -0.5]), jnp.asarray([[1.0, 0.6], [0.6, 0.8]]))
REWARD = apps.QuadraticReward(jnp.eye(2), jnp.asarray([-1.0, 1.0]))
# `A = 0`: a constant reward, of the same structure as REWARD (so no recompilation).
CONSTANT = apps.QuadraticReward(jnp.zeros((2, 2)), jnp.asarray([-1.0, 1.0]))


@eqx.filter_jit
def _each(fn, x):
    return jax.vmap(fn)(x)


def each(fn):
    """`jax.vmap(fn)` compiled as one program (quicker than op by op); a flow's
    method is a pytree, so flows of one structure share the program."""
    return lambda x: _each(fn, x)


def covariance(flow: Gaussian):
    return (flow.eigvecs * flow.eigvals[None, :]) @ flow.eigvecs.T


def data(flow, n: int, seed: int = 0):
    return flow.sample(jax.random.key(seed), n)


def log_likelihoods(flow, x, **kwargs):
    return each(lambda x: apps.log_likelihood(flow, x, **kwargs))(x)


# Likelihood


@pytest.mark.parametrize(
    "grid", [{"steps": 1}, {"steps": 3}, {"grid": jnp.asarray([0.0, 0.1, 0.7, 1.0])}]
)
def test_likelihood_of_the_exact_map_is_the_gaussian_log_density(grid):
    x = data(GAUSSIAN, 8)
    got = log_likelihoods(GAUSSIAN, x, **grid)
    expected = each(GAUSSIAN.log_prob)(x)
    assert jnp.max(jnp.abs(got - expected)) <= 1e-8


@pytest.mark.slow
def test_likelihood_of_the_exact_map_is_the_mixture_log_density():
    x = data(MIXTURE, 3)
    got = log_likelihoods(MIXTURE, x)
    assert jnp.max(jnp.abs(got - each(MIXTURE.log_prob)(x))) <= 1e-6


@pytest.mark.slow
def test_ode_likelihood_is_the_log_density():
    x = data(GAUSSIAN, 2)
    got = each(lambda x: apps.log_likelihood_ode(GAUSSIAN.velocity, x))(x)
    assert jnp.max(jnp.abs(got - each(GAUSSIAN.log_prob)(x))) <= 1e-8


@pytest.mark.slow
def test_hutchinson_is_exact_on_a_diagonal_jacobian_and_unbiased_otherwise():
    """Rademacher probes give `zᵀ D z = tr D` exactly for a diagonal `D`, so one
    probe is exact on an axis-aligned Gaussian; otherwise the mean over probes
    approaches the exact log-determinant as `1 / √probes`."""
    diagonal = Gaussian(jnp.asarray([0.5, -1.0]), jnp.diag(jnp.asarray([0.05, 3.0])))
    x = data(diagonal, 4)
    one_probe = apps.HutchinsonLogDet(probes=1, lanczos_steps=2)
    got = log_likelihoods(diagonal, x, logdet=one_probe, key=jax.random.key(0))
    assert jnp.max(jnp.abs(got - each(diagonal.log_prob)(x))) <= 1e-8

    rotated = jnp.asarray(covariance(GAUSSIAN))
    exact = jnp.linalg.slogdet(rotated)[1]
    many = apps.HutchinsonLogDet(probes=4096, lanczos_steps=3)
    first, second = (
        many(lambda x: rotated @ x, GAUSSIAN.mean, jax.random.key(k)) for k in (1, 2)
    )
    assert first != second  # a genuinely stochastic case
    assert jnp.abs(first - exact) <= 0.05 and jnp.abs(second - exact) <= 0.05


# Inverse maps


@pytest.mark.slow
def test_round_trip_of_the_exact_map_is_the_identity():
    x = data(GAUSSIAN, 8)
    error = each(lambda x: apps.round_trip_error(GAUSSIAN, x, steps=3))(x)
    assert jnp.max(jnp.abs(error)) <= 1e-8
    x = data(MIXTURE, 3)
    error = each(lambda x: apps.round_trip_error(MIXTURE, x))(x)
    assert jnp.max(jnp.abs(error)) <= 1e-6


def test_slerp_and_interpolation():
    a, b = jnp.asarray([3.0, 0.0, 0.0]), jnp.asarray([0.0, 3.0, 0.0])
    assert jnp.allclose(apps.slerp(a, b, 0.0), a)
    assert jnp.allclose(apps.slerp(a, b, 1.0), b)
    middle = apps.slerp(a, b, 0.5)
    assert jnp.allclose(jnp.linalg.norm(middle), 3.0)  # a straight line: 3 / √2
    assert jnp.allclose(middle, jnp.asarray([1.0, 1.0, 0.0]) * 3 / jnp.sqrt(2))
    assert jnp.allclose(apps.slerp(a, a, 0.3), a)  # the linear fallback at θ = 0
    x_a, x_b = data(GAUSSIAN, 2)
    path = apps.interpolation(GAUSSIAN, x_a, x_b, jnp.asarray([0.0, 0.5, 1.0]))
    assert path.shape == (3, 3)
    assert jnp.max(jnp.abs(path[0] - x_a)) <= 1e-8
    assert jnp.max(jnp.abs(path[-1] - x_b)) <= 1e-8


# Exact targets


@pytest.mark.slow
def test_tilt_is_the_density_times_the_exponentiated_reward():
    """`log tilt(x) - log p(x) - λ r(x)` is the constant `-log Z`, and `λ = 0` is no
    tilt."""
    x = data(MIXTURE, 16)
    for strength in (0.5, 3.0):
        tilted = apps.tilt(MIXTURE, REWARD, strength)
        gap = (
            each(tilted.log_prob)(x)
            - each(MIXTURE.log_prob)(x)
            - strength * each(REWARD)(x)
        )
        assert jnp.ptp(gap) <= 1e-10
    same = apps.tilt(MIXTURE, REWARD, 0.0)
    assert jnp.allclose(each(same.log_prob)(x), each(MIXTURE.log_prob)(x))
    tilted = apps.tilt(GAUSSIAN, apps.QuadraticReward(jnp.eye(3), jnp.zeros(3)), 1.0)
    precision = jnp.linalg.inv(covariance(GAUSSIAN)) + jnp.eye(3)
    assert jnp.allclose(covariance(tilted), jnp.linalg.inv(precision))
    assert jnp.allclose(
        tilted.mean,
        jnp.linalg.solve(
            precision, jnp.linalg.solve(covariance(GAUSSIAN), GAUSSIAN.mean)
        ),
    )


def posterior(flow: Gaussian, x, t):
    """Mean and covariance of `x0 | x_t = x` by conditioning the joint Gaussian of
    `(x0, x_t)`, with numpy."""
    mean, cov = np.asarray(flow.mean), np.asarray(covariance(flow))
    dim = mean.shape[0]
    cross = (1 - t) * cov
    marginal = (1 - t) ** 2 * cov + t**2 * np.eye(dim)
    gain = cross @ np.linalg.inv(marginal)
    return mean + gain @ (np.asarray(x) - (1 - t) * mean), cov - gain @ cross.T


@pytest.mark.slow
def test_expected_reward_and_lookaheads_against_the_posterior():
    reward = apps.QuadraticReward(
        jnp.asarray([[1.0, 0.5, 0.0], [0.0, 2.0, 1.0]]), jnp.ones(3)
    )
    a, c = np.asarray(reward.matrix), np.asarray(reward.center)
    x, t = data(GAUSSIAN, 1)[0] * 0.6 + 0.3, 0.6
    mean, cov = posterior(GAUSSIAN, x, t)
    gap = a @ (mean - c)
    exact = -0.5 * (gap @ gap + np.trace(a @ cov @ a.T))
    assert np.isclose(apps.expected_reward(GAUSSIAN, reward, x, t), exact)
    assert np.isclose(apps.expected_reward(GAUSSIAN, reward, x, 0.0), reward(x))
    tweedie = apps.TweedieLookahead()(GAUSSIAN, x, t)
    np.testing.assert_allclose(tweedie, mean, atol=1e-10)
    # The flow-map look-ahead lands where the ODE does, in any number of jumps.
    for steps in (1, 3):
        ahead = apps.FlowMapLookahead(steps)(GAUSSIAN, x, t)
        np.testing.assert_allclose(ahead, GAUSSIAN.flow_map(x, t, 0.0), atol=1e-10)
    assert jnp.array_equal(apps.NoLookahead()(GAUSSIAN, x, t), x)
    for lookahead in (apps.FlowMapLookahead(), apps.TweedieLookahead()):
        np.testing.assert_allclose(lookahead(GAUSSIAN, x, 0.0), x, atol=1e-12)
    # On a mixture at t = 1 the posterior is the prior.
    prior = sum(
        w * -0.5 * (jnp.sum((m - REWARD.center) ** 2) + jnp.sum(lam))
        for w, m, lam in zip(
            MIXTURE.weights, MIXTURE.means, MIXTURE.eigvals, strict=True
        )
    )
    assert jnp.isclose(apps.expected_reward(MIXTURE, REWARD, jnp.zeros(2), 1.0), prior)


# Steering

N = 1000  # particles in every steering test: one compilation per look-ahead


@eqx.filter_jit
def steer_all(reward, strength, lookahead, noise, key):
    keys = jax.random.split(key, noise.shape[0])
    return jax.vmap(
        lambda e, k: apps.steer(
            STEERED, reward, e, key=k, strength=strength, lookahead=lookahead
        )
    )(noise, keys)


def noise(n: int = N, seed: int = 0):
    return jax.random.normal(jax.random.key(seed), (n, 2))


def sample(flow, noise, steps):
    return each(lambda e: fmcalc.sample(flow, e, steps=steps))(noise)


def tilted_reward(target: Gaussian) -> float:
    """`E[r(x)]` under the tilted Gaussian, for `REWARD` (`A = I`)."""
    gap = target.mean - REWARD.center
    return float(-0.5 * (gap @ gap + jnp.sum(target.eigvals)))


def close_to(samples, weights, target: Gaussian, ess=None, sigmas=4.0) -> bool:
    """The weighted mean and mean reward within `sigmas` standard errors of the
    target's, the errors from the effective sample size."""
    ess = 1 / jnp.sum(weights**2) if ess is None else ess
    mean = weights @ samples
    error = jnp.sqrt(jnp.diag(covariance(target)) / ess)
    rewards = each(REWARD)(samples)
    reward_error = jnp.sqrt(weights @ (rewards - weights @ rewards) ** 2 / ess)
    return bool(
        jnp.all(jnp.abs(mean - target.mean) <= sigmas * error)
        and jnp.abs(weights @ rewards - tilted_reward(target)) <= sigmas * reward_error
    )


def three_modes() -> GaussianMixture:
    """Three narrow components; a reward centred between them puts particles near
    the basin boundaries, where the map's Jacobian is large."""
    return GaussianMixture(
        jnp.asarray([0.5, 0.3, 0.2]),
        jnp.asarray([[-2.0, 0.0], [2.0, 0.5], [0.0, 2.5]]),
        jnp.asarray([[[0.1, 0.0], [0.0, 0.1]]] * 3),
    )


@pytest.mark.slow
def test_steering_moves_are_bounded_near_basin_boundaries():
    """Unlimited moves throw particles far from every mode at a large strength;
    the default trust region keeps every particle near one."""
    flow = three_modes()
    centre = apps.QuadraticReward(jnp.eye(2), jnp.zeros(2))

    @eqx.filter_jit
    def run(max_drift, noise, key):
        keys = jax.random.split(key, noise.shape[0])
        return jax.vmap(
            lambda e, k: apps.steer(
                flow, centre, e, key=k, strength=25.0, max_drift=max_drift
            )
        )(noise, keys)

    def farthest(x):
        gaps = jnp.linalg.norm(x[:, None, :] - flow.means[None], axis=-1)
        return float(jnp.max(jnp.min(gaps, axis=1)))

    eps, key = noise(400), jax.random.key(1)
    assert farthest(run(None, eps, key)) > 5.0
    assert farthest(run(3.0, eps, key)) < 2.5


@pytest.mark.slow
def test_steering_without_tilt_or_with_a_constant_reward():
    eps, key = noise(), jax.random.key(1)
    untilted = each(
        lambda e: apps.steer(
            STEERED, REWARD, e, key=key, strength=0.0, langevin_steps=0
        )
    )(eps[:8])
    assert jnp.max(jnp.abs(untilted - sample(STEERED, eps[:8], 4))) <= 1e-12
    # With Langevin moves: a constant reward at any strength is no tilt at all.
    zero, five = jnp.asarray(0.0), jnp.asarray(5.0)
    for lookahead in (
        apps.FlowMapLookahead(),
        apps.TweedieLookahead(),
        apps.NoLookahead(),
    ):
        plain = steer_all(REWARD, zero, lookahead, eps, key)
        constant = steer_all(CONSTANT, five, lookahead, eps, key)
        assert jnp.array_equal(plain, constant)


@pytest.mark.slow
def test_flow_map_steering_reaches_the_tilted_distribution():
    """With the exact map the flow-map look-ahead is exact (up to the Langevin
    discretisation); Tweedie's look-ahead with the same moves is not."""
    target, strength = apps.tilt(STEERED, REWARD, 2.0), jnp.asarray(2.0)
    eps, key = noise(seed=2), jax.random.key(2)
    uniform = jnp.full(N, 1 / N)
    steered = steer_all(REWARD, strength, apps.FlowMapLookahead(), eps, key)
    assert close_to(steered, uniform, target)
    blurred = steer_all(REWARD, strength, apps.TweedieLookahead(), eps, key)
    assert not close_to(blurred, uniform, target)


@pytest.mark.slow
def test_importance_sampling():
    eps = noise(seed=3)
    for reward, strength in ((REWARD, 0.0), (CONSTANT, 3.0)):
        particles = apps.importance_sample(
            STEERED, reward, eps, strength=strength, steps=2
        )
        assert jnp.max(jnp.abs(particles.samples - sample(STEERED, eps, 2))) <= 1e-12
        assert jnp.allclose(particles.weights, 1 / N)
        assert jnp.allclose(particles.ess, N)
    target = apps.tilt(STEERED, REWARD, 1.0)
    particles = apps.importance_sample(STEERED, REWARD, eps, strength=1.0)
    assert particles.ess[0] < N / 2
    assert close_to(particles.samples, particles.weights, target)


@pytest.mark.slow
def test_smc():
    eps, key = noise(seed=4), jax.random.key(5)
    for renoise in (False, True):
        plain = apps.smc(STEERED, REWARD, eps, key=key, strength=0.0, renoise=renoise)
        constant = apps.smc(
            STEERED, CONSTANT, eps, key=key, strength=3.0, renoise=renoise
        )
        assert jnp.array_equal(plain.samples, constant.samples)
        assert jnp.allclose(plain.weights, 1 / N)
        assert jnp.allclose(plain.ess, N)
    # Without resampling or re-noising, the look-ahead scores telescope to
    # importance sampling's weights, whatever the look-ahead.
    drawn = apps.importance_sample(STEERED, REWARD, eps, strength=1.0, steps=4)
    for lookahead in (apps.FlowMapLookahead(), apps.TweedieLookahead()):
        particles = apps.smc(
            STEERED,
            REWARD,
            eps,
            key=key,
            strength=1.0,
            lookahead=lookahead,
            renoise=False,
            resample_below=0.0,
        )
        assert jnp.max(jnp.abs(particles.samples - drawn.samples)) <= 1e-12
        assert jnp.max(jnp.abs(particles.weights - drawn.weights)) <= 1e-12
    # With both: consistent, with an error set by the smallest effective sample
    # size along the way (resampled duplicates are not independent).
    target = apps.tilt(STEERED, REWARD, 1.0)
    particles = apps.smc(STEERED, REWARD, eps, key=key, strength=1.0)
    ess = jnp.minimum(jnp.min(particles.ess), 1 / jnp.sum(particles.weights**2))
    assert close_to(particles.samples, particles.weights, target, ess=ess)
    resampled = apps.resample(particles, key=jax.random.key(6))
    assert close_to(resampled, jnp.full(N, 1 / N), target, ess=ess)


@pytest.mark.slow
def test_steering_takes_a_grid_instead_of_steps():
    """`grid=` alone (no `steps=`) gives what the same uniform grid's steps do."""
    eps, key = noise(16, seed=7), jax.random.key(8)
    grid = jnp.linspace(1.0, 0.0, 5)
    by_grid = apps.smc(STEERED, REWARD, eps, key=key, strength=1.0, grid=grid)
    by_steps = apps.smc(STEERED, REWARD, eps, key=key, strength=1.0, steps=4)
    assert jnp.array_equal(by_grid.samples, by_steps.samples)
    two = jnp.linspace(1.0, 0.0, 3)
    drawn = apps.importance_sample(STEERED, REWARD, eps, strength=1.0, grid=two)
    again = apps.importance_sample(STEERED, REWARD, eps, strength=1.0, steps=2)
    assert jnp.array_equal(drawn.samples, again.samples)
    one = apps.steer(STEERED, REWARD, eps[0], key=key, strength=1.0, grid=grid,
                     langevin_steps=2)  # fmt: skip
    same = apps.steer(STEERED, REWARD, eps[0], key=key, strength=1.0, langevin_steps=2)
    assert jnp.array_equal(one, same)


def test_slerp_of_a_zero_vector_fails_under_jit():
    with pytest.raises(Exception, match="needs two nonzero vectors"):
        jax.jit(apps.slerp)(jnp.zeros(2), jnp.ones(2), 0.5).block_until_ready()


def test_resample_copies_by_weight():
    samples = jnp.arange(8.0).reshape(4, 2)
    even = apps.Particles(samples, jnp.zeros(4), jnp.ones(1), jnp.zeros(()))
    drawn = apps.resample(even, key=jax.random.key(0))
    assert jnp.array_equal(jnp.sort(drawn[:, 0]), samples[:, 0])
    one = apps.Particles(
        samples, jnp.asarray([-jnp.inf, 0.0, -jnp.inf, -jnp.inf]), jnp.ones(1),
        jnp.zeros(()),
    )  # fmt: skip
    assert jnp.array_equal(
        apps.resample(one, 6, key=jax.random.key(0)), jnp.tile(samples[1], (6, 1))
    )


# Bad inputs


X = jnp.zeros(2)
KEY = jax.random.key(0)
BAD = {
    "batched x0": (
        lambda: apps.log_likelihood(STEERED, jnp.zeros((4, 2))),
        ValueError,
        r"`x0` must be one example of shape \(dim,\).*got shape \(4, 2\)",
    ),
    "logdet not a strategy": (
        lambda: apps.log_likelihood(STEERED, X, logdet="exact"),
        TypeError,
        "`logdet` must be `fmcalc.apps.ExactLogDet\\(\\)`.*got 'exact'",
    ),
    "Hutchinson without key": (
        lambda: apps.log_likelihood(STEERED, X, logdet=apps.HutchinsonLogDet()),
        ValueError,
        "`HutchinsonLogDet` draws probes: pass `key=`",
    ),
    "no probes": (
        lambda: apps.HutchinsonLogDet(probes=0),
        ValueError,
        "`probes` must be a positive int; got 0",
    ),
    "grid running backwards": (
        lambda: apps.log_likelihood(STEERED, X, grid=jnp.asarray([1.0, 0.0])),
        ValueError,
        "`grid` must run from t = 0 to t = 1",
    ),
    "negative ODE tolerance": (
        lambda: apps.log_likelihood_ode(STEERED.velocity, X, rtol=-1e-6),
        ValueError,
        "`rtol` must be positive or None; got -1e-06",
    ),
    "no look-ahead steps": (
        lambda: apps.FlowMapLookahead(0),
        ValueError,
        "`steps` must be at least 1; got steps=0",
    ),
    "fractional look-ahead steps": (
        lambda: apps.FlowMapLookahead(1.5),
        TypeError,
        "`steps` must be an int; got 1.5",
    ),
    "vector strength": (
        lambda: apps.steer(
            STEERED, REWARD, X, key=jax.random.key(0), strength=jnp.ones(2)
        ),
        ValueError,
        r"`strength` must be a scalar; got shape \(2,\)",
    ),
    "lookahead not a strategy": (
        lambda: apps.steer(
            STEERED, REWARD, X, key=jax.random.key(0), strength=1.0, lookahead="tweedie"
        ),
        TypeError,
        "`lookahead` must be a look-ahead .*got 'tweedie'",
    ),
    "negative Langevin steps": (
        lambda: apps.steer(
            STEERED, REWARD, X, key=jax.random.key(0), strength=1.0, langevin_steps=-1
        ),
        ValueError,
        "`langevin_steps` must be ≥ 0; got -1",
    ),
    "zero step size": (
        lambda: apps.steer(
            STEERED, REWARD, X, key=jax.random.key(0), strength=1.0, step_size=0.0
        ),
        ValueError,
        "`step_size` must be positive; got 0.0",
    ),
    "one particle as a vector": (
        lambda: apps.importance_sample(STEERED, REWARD, X, strength=1.0),
        ValueError,
        r"`noise` must be a batch of particles of shape \(n, dim\); got shape \(2,\)",
    ),
    "resampling threshold above 1": (
        lambda: apps.smc(
            STEERED,
            REWARD,
            jnp.zeros((4, 2)),
            key=jax.random.key(0),
            strength=1.0,
            resample_below=2.0,
        ),
        ValueError,
        r"`resample_below` must lie in \[0, 1\]; got 2.0",
    ),
    "the key first, as before": (
        lambda: apps.resample(  # pyright: ignore
            jax.random.key(0),
            apps.Particles(jnp.zeros((4, 2)), jnp.zeros(4), jnp.ones(1), jnp.zeros(())),
        ),
        TypeError,
        r"takes the particles first and the key as `key=`",
    ),
    "no samples": (
        lambda: apps.resample(
            apps.Particles(jnp.zeros((4, 2)), jnp.zeros(4), jnp.ones(1), jnp.zeros(())),
            0,
            key=jax.random.key(0),
        ),
        ValueError,
        "`n` must be a positive int or None; got 0",
    ),
    "reward of the wrong shape": (
        lambda: apps.QuadraticReward(jnp.eye(3), jnp.zeros(2)),
        ValueError,
        r"`matrix` must have shape \(m, 2\) to match `center`; got shape \(3, 3\)",
    ),
    "reward of another dimension": (
        lambda: apps.tilt(GAUSSIAN, REWARD, 1.0),
        ValueError,
        r"centre has shape \(2,\); the flow's data have dimension 3",
    ),
    "tilt of a point cloud": (
        lambda: apps.tilt(PointCloud(jnp.zeros((3, 2))), REWARD, 1.0),
        TypeError,
        "need a `fmcalc.flows.Gaussian` or `fmcalc.flows.GaussianMixture`; got "
        "PointCloud",
    ),
    "infinite strength": (
        lambda: apps.tilt(STEERED, REWARD, float("inf")),
        ValueError,
        "`strength` must be finite; got inf",
    ),
    "tilt without normaliser": (
        lambda: apps.tilt(STEERED, REWARD, -10.0),
        ValueError,
        r"`strength` = -10.0 makes exp.*must be greater than -0.66",
    ),
    "slerp of different shapes": (
        lambda: apps.slerp(jnp.ones(2), jnp.ones(3), 0.5),
        ValueError,
        r"`a` and `b` differ in shape: \(2,\) and \(3,\)",
    ),
    "vector reward, importance sampling": (
        lambda: apps.importance_sample(STEERED, lambda x: x, noise(4), strength=1.0),
        ValueError,
        r"`reward` must return a scalar per example; on one example of shape "
        r"\(2,\) it returned \(2,\)",
    ),
    "vector reward, SMC": (
        lambda: apps.smc(STEERED, lambda x: 2 * x, noise(4), key=KEY, strength=1.0),
        ValueError,
        r"`reward` must return a scalar per example",
    ),
    "reward of the wrong dimension, steering": (
        lambda: apps.steer(
            STEERED, lambda x: jnp.sum(x * jnp.ones(3)), X, key=KEY, strength=1.0
        ),
        ValueError,
        r"`reward` must take one example of shape \(2,\); calling it on one failed",
    ),
    "a zero trust region": (
        lambda: apps.steer(STEERED, REWARD, X, key=KEY, strength=1.0, max_drift=0.0),
        ValueError,
        r"`max_drift` must be positive, or None for no limit; got 0\.0",
    ),
    "NaN strength, steering": (
        lambda: apps.steer(STEERED, REWARD, X, key=KEY, strength=float("nan")),
        ValueError,
        "`strength` must be finite; got nan",
    ),
    "infinite strength, SMC": (
        lambda: apps.smc(STEERED, REWARD, noise(4), key=KEY, strength=float("inf")),
        ValueError,
        "`strength` must be finite; got inf",
    ),
    "expected reward after the noise end": (
        lambda: apps.expected_reward(STEERED, REWARD, X, 1.5),
        ValueError,
        r"Time `t` must lie in \[0, 1\].*got \[1.5\]",
    ),
    "slerp of a zero vector": (
        lambda: apps.slerp(jnp.zeros(2), jnp.ones(2), 0.5),
        ValueError,
        r"needs two nonzero vectors.*\|a\| = 0",
    ),
    "interpolation weights as a matrix": (
        lambda: apps.interpolation(STEERED, X, X, jnp.zeros((2, 2))),
        ValueError,
        r"`weights` must have shape \(n,\); got shape \(2, 2\)",
    ),
}


@pytest.mark.parametrize("case", BAD, ids=str)
def test_bad_inputs_raise_clear_errors(case):
    make, error, message = BAD[case]
    with without_runtime_typechecks(), pytest.raises(error, match=message):
        make()


@pytest.mark.slow
def test_the_normaliser_estimates_agree_with_the_closed_form():
    """`log Z = log E[exp(λ r)]`: the closed form equals a large Monte Carlo mean
    over exact samples; importance sampling and sequential Monte Carlo estimate it
    within four standard errors (the estimates' own spread over the weights); SMC
    without resampling or re-noising is importance sampling, estimate included."""
    for flow in (STEERED, MIXTURE):
        x = data(flow, 400_000, seed=7)
        mean = jnp.mean(jnp.exp(1.0 * each(REWARD)(x)))
        assert apps.log_normalizer(flow, REWARD, 1.0) == pytest.approx(
            float(jnp.log(mean)), abs=5e-3
        )
    assert apps.log_normalizer(STEERED, REWARD, 0.0) == pytest.approx(0.0, abs=1e-12)
    exact = apps.log_normalizer(STEERED, REWARD, 1.0)
    eps, key = noise(seed=8), jax.random.key(9)
    drawn = apps.importance_sample(STEERED, REWARD, eps, strength=1.0, steps=4)
    w = jnp.exp(drawn.log_weights - jnp.max(drawn.log_weights))
    error = jnp.std(w) / jnp.mean(w) / jnp.sqrt(N)  # of the estimate of log Z
    assert abs(float(drawn.log_normalizer) - exact) <= 4 * float(error)
    same = apps.smc(
        STEERED, REWARD, eps, key=key, strength=1.0, renoise=False,
        resample_below=0.0,
    )  # fmt: skip
    assert abs(float(same.log_normalizer - drawn.log_normalizer)) <= 1e-12
    particles = apps.smc(STEERED, REWARD, eps, key=key, strength=1.0)
    assert jnp.min(particles.ess) < N / 2  # it resampled along the way
    assert abs(float(particles.log_normalizer) - exact) <= 4 * float(error)


def test_every_key_is_a_keyword():
    """One convention across the namespace: a PRNG key is the keyword `key=`."""
    import inspect

    with_key = []
    for name in apps.__all__ if hasattr(apps, "__all__") else dir(apps):
        value = getattr(apps, name)
        if name.startswith("_") or not inspect.isfunction(value):
            continue
        parameters = inspect.signature(value).parameters
        if "key" in parameters:
            with_key.append(name)
            assert parameters["key"].kind is inspect.Parameter.KEYWORD_ONLY, name
    assert {"steer", "smc", "resample"} <= set(with_key)
