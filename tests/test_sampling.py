"""Samplers against exact flow maps: flow-map sampling and its inverse, consistency
sampling, the adaptive ODE reference and the fixed-step solvers of a velocity (Euler,
Heun, DPM-Solver++(2M)); the Heun flow map of a velocity; and the batched sampler,
against the per-example samplers it dispatches to.

With the exact Gaussian map as the model every sampler has a known answer: any grid
gives `F(eps, 1, 0)` to round-off, and its samples have the data's moments.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import loglog_slope, random_gaussian, without_runtime_typechecks

from fmcalc import testing
from fmcalc._sampling import (
    HeunMap,
    invert,
    model_velocity,
    sample,
    sample_batch,
    sample_consistency,
    sample_dpm2m,
    sample_euler,
    sample_heun,
    sample_ode,
)
from fmcalc.flows import GaussianMixture


DIM = 4
N = 4096
TOL = testing.tolerance(jnp.float64)  # 1e-10
ODE_TOL = 1e-8
"""Adaptive solves at the float64 default tolerance 1e-10 (|x| ~ 5)."""


@pytest.fixture(scope="module")
def flow():
    return random_gaussian(jax.random.key(0), DIM)


@pytest.fixture(scope="module")
def noise():
    return jax.random.normal(jax.random.key(1), (N, DIM))


@pytest.fixture(scope="module")
def exact(flow, noise):
    return jax.vmap(lambda e: flow.flow_map(e, 1.0, 0.0))(noise)


def data_covariance(flow):
    return (flow.eigvecs * flow.eigvals[None, :]) @ flow.eigvecs.T


def moment_errors(samples, mean, cov) -> tuple[float, float]:
    """The largest errors of the sample mean and covariance, in Monte Carlo standard
    errors.

    The standard error of the mean is `sqrt(Σ_ii / n)`; for Gaussian samples the
    sample covariance entry has variance `(Σ_ii Σ_jj + Σ_ij²) / n` (Wishart), which
    gives its standard error.
    """
    samples, mean, cov = np.asarray(samples), np.asarray(mean), np.asarray(cov)
    n = samples.shape[0]
    variances = np.diag(cov)
    mean_z = np.abs(samples.mean(axis=0) - mean) / np.sqrt(variances / n)
    cov_se = np.sqrt((np.outer(variances, variances) + cov**2) / n)
    cov_z = np.abs(np.cov(samples, rowvar=False) - cov) / cov_se
    return float(mean_z.max()), float(cov_z.max())


def assert_data_moments(samples, flow, sigmas=5.0):
    """Mean and covariance within `sigmas` standard errors: with 4 + 10 distinct
    statistics, a correct sampler fails with probability about 14 · 6e-7 ≈ 1e-5
    (the seeds are fixed, so the test is deterministic anyway)."""
    mean_z, cov_z = moment_errors(samples, flow.mean, data_covariance(flow))
    assert mean_z <= sigmas and cov_z <= sigmas, (mean_z, cov_z)


def max_error(a, b) -> float:
    return float(jnp.max(jnp.abs(a - b)))


# Flow-map sampling ---------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 4])
def test_samples_have_data_moments(flow, noise, steps):
    samples = jax.vmap(lambda e: sample(flow, e, steps=steps))(noise)
    assert samples.shape == noise.shape and samples.dtype == noise.dtype
    assert_data_moments(samples, flow)


def test_moment_check_has_power(flow, noise):
    """One Euler step from t = 1 lands every sample on the mean (`v(x, 1) = x - mean`),
    a zero covariance, `sqrt(n / 2) ≈ 45` standard errors off: the moment check must
    reject it."""
    collapsed = jax.vmap(lambda e: sample_euler(flow.velocity, e, steps=1))(noise)
    assert max_error(collapsed, flow.mean[None, :]) <= TOL
    _, cov_z = moment_errors(collapsed, flow.mean, data_covariance(flow))
    assert cov_z > 40


def test_exact_map_gives_the_same_sample_on_every_grid(flow, noise, exact):
    """The semigroup rule: 1, 4 or any uneven number of exact jumps is one jump."""
    uneven = jnp.array([1.0, 0.97, 0.6, 0.55, 0.1, 1e-3, 0.0])
    one = jax.vmap(lambda e: sample(flow, e))(noise)
    four = jax.vmap(lambda e: sample(flow, e, steps=4))(noise)
    grid = jax.vmap(lambda e: sample(flow, e, grid=uneven))(noise)
    assert max_error(one, exact) <= TOL
    assert max_error(four, one) <= TOL
    assert max_error(grid, one) <= TOL


@pytest.mark.slow
@pytest.mark.parametrize(
    ("forward", "backward"),
    [
        ({"steps": 1}, {"steps": 1}),
        ({"steps": 4}, {"steps": 3}),
        ({"grid": jnp.array([1.0, 0.7, 0.2, 0.0])}, {"steps": 5}),
    ],
)
def test_invert_is_the_inverse_of_sample(flow, noise, forward, backward):
    eps = noise[:256]
    x0 = flow.sample(jax.random.key(2), 256)
    encoded = jax.vmap(lambda x: invert(flow, x, **backward))(x0)
    assert max_error(encoded, jax.vmap(lambda x: flow.flow_map(x, 0.0, 1.0))(x0)) <= TOL
    round_trip = jax.vmap(
        lambda e: invert(flow, sample(flow, e, **forward), **backward)
    )
    assert max_error(round_trip(eps), eps) <= TOL
    other_way = jax.vmap(lambda x: sample(flow, invert(flow, x, **backward), **forward))
    assert max_error(other_way(x0), x0) <= TOL


def test_invert_accepts_a_reversed_sampling_grid(flow, noise):
    grid = jnp.array([1.0, 0.4, 0.0])
    x0 = jax.vmap(lambda e: sample(flow, e, grid=grid))(noise[:64])
    back = jax.vmap(lambda x: invert(flow, x, grid=grid[::-1]))(x0)
    assert max_error(back, noise[:64]) <= TOL


def test_sample_under_jit_with_a_traced_grid(flow, noise):
    run = eqx.filter_jit(jax.vmap(lambda e, g: sample(flow, e, grid=g), (0, None)))
    grid = jnp.array([1.0, 0.5, 0.0])
    eager = jax.vmap(lambda e: sample(flow, e, grid=grid))(noise[:32])
    assert max_error(run(noise[:32], grid), eager) <= TOL
    with pytest.raises(RuntimeError, match="strictly decreasing from 1 to 0"):
        run(noise[:32], jnp.array([1.0, 0.3, 0.5, 0.0]))


# Consistency sampling ------------------------------------------------------------

CONSISTENCY_GRID = jnp.array([1.0, 0.8, 0.5, 0.2, 0.0])


def consistency(flow, noise, keys, grid):
    return jax.vmap(lambda e, k: sample_consistency(flow, e, key=k, grid=grid))(
        noise, keys
    )


@pytest.mark.slow
def test_consistency_estimates_are_data_samples(flow, noise, exact):
    """With the exact map every estimate `x̂_i` has the data distribution. The grid
    truncated after `k` jumps returns `x̂_{k-1}` (the re-noising uses
    `fold_in(key, i)`)."""
    keys = jax.random.split(jax.random.key(3), N)
    jumps = CONSISTENCY_GRID.shape[0] - 1
    estimates = [
        consistency(
            flow, noise, keys, jnp.concatenate([CONSISTENCY_GRID[:k], jnp.zeros(1)])
        )
        for k in range(1, jumps + 1)
    ]
    assert max_error(estimates[0], exact) <= TOL
    for estimate in estimates:
        assert_data_moments(estimate, flow)
    # Each re-noising forgets part of the noise: the estimates differ.
    assert max_error(estimates[-1], estimates[0]) > 0.1

    # The output is the last jump, F(x_last, t_last, 0), from the last re-noised point.
    t_last = CONSISTENCY_GRID[-2]
    eps_last = jax.vmap(
        lambda k: jax.random.normal(jax.random.fold_in(k, jumps - 1), (DIM,))
    )(keys)
    x_last = (1 - t_last) * estimates[-2] + t_last * eps_last
    last_jump = jax.vmap(lambda x: flow.flow_map(x, t_last, 0.0))(x_last)
    assert max_error(estimates[-1], last_jump) <= TOL


@pytest.mark.slow
def test_consistency_is_stochastic(flow, noise):
    eps = noise[:64]
    keys = jax.random.split(jax.random.key(4), 64)
    other_keys = jax.random.split(jax.random.key(5), 64)
    first = consistency(flow, eps, keys, CONSISTENCY_GRID)
    assert max_error(consistency(flow, eps, keys, CONSISTENCY_GRID), first) == 0
    assert max_error(consistency(flow, eps, other_keys, CONSISTENCY_GRID), first) > 0.1
    # One jump uses no noise: it is the deterministic F(eps, 1, 0).
    one = consistency(flow, eps, keys, jnp.array([1.0, 0.0]))
    assert (
        max_error(one, consistency(flow, eps, other_keys, jnp.array([1.0, 0.0]))) == 0
    )
    assert max_error(one, jax.vmap(lambda e: sample(flow, e))(eps)) == 0


# ODE and Euler baselines ---------------------------------------------------------


@pytest.mark.parametrize("source", ["flow.velocity", "model_velocity(flow)"])
def test_ode_sample_matches_the_exact_map(flow, noise, exact, source):
    velocity = flow.velocity if source == "flow.velocity" else model_velocity(flow)
    solve = eqx.filter_jit(jax.vmap(lambda e: sample_ode(velocity, e)))
    assert max_error(solve(noise[:64]), exact[:64]) <= ODE_TOL


@pytest.mark.slow
def test_ode_between_any_times_and_forwards(flow, noise):
    x = noise[:16]

    @eqx.filter_jit
    def between(s, t):
        return jax.vmap(lambda e: sample_ode(flow.velocity, e, t1=s, t0=t))(x)

    for s, t in [(0.8, 0.3), (0.0, 1.0), (0.3, 0.9)]:
        expected = jax.vmap(lambda e: flow.flow_map(e, s, t))(x)  # noqa: B023
        assert max_error(between(s, t), expected) <= ODE_TOL


@pytest.mark.slow
def test_float32_samplers_keep_dtype(flow, noise, exact):
    eps = noise[:32].astype(jnp.float32)
    results = {
        "sample": jax.vmap(lambda e: sample(flow, e, steps=3))(eps),
        "ode": eqx.filter_jit(jax.vmap(lambda e: sample_ode(flow.velocity, e)))(eps),
        "invert∘sample": jax.vmap(lambda e: invert(flow, sample(flow, e)))(eps),
    }
    for name, x in results.items():
        assert x.dtype == jnp.float32, name
    assert max_error(results["sample"], exact[:32]) <= 1e-4
    assert max_error(results["ode"], exact[:32]) <= 1e-4
    assert max_error(results["invert∘sample"], eps) <= 1e-4


def test_euler_error_is_first_order(flow, noise, exact):
    """Doubling the steps halves the error: slope -1 in log-log, and 128 steps are
    within ~2e-2 (RMS) of the exact map."""
    eps, target = noise[:256], exact[:256]

    @eqx.filter_jit
    def rms_error(steps):
        x = jax.vmap(lambda e: sample_euler(flow.velocity, e, steps=steps))(eps)
        return jnp.sqrt(jnp.mean(jnp.sum((x - target) ** 2, axis=-1)))

    steps = [32, 64, 128, 256]
    errors = [float(rms_error(k)) for k in steps]
    assert abs(loglog_slope(steps, errors) + 1) <= 0.05, errors
    # First order: halving the step halves the error.
    assert errors[2] / errors[3] == pytest.approx(2.0, rel=0.05), errors
    assert errors[2] <= 0.03, errors


def test_euler_on_the_diagonal_is_euler_on_the_velocity(flow, noise):
    eps = noise[:64]
    a = jax.vmap(lambda e: sample_euler(flow.velocity, e, steps=4))(eps)
    b = jax.vmap(lambda e: sample_euler(model_velocity(flow), e, steps=4))(eps)
    assert max_error(a, b) <= TOL


# Second-order solvers of a velocity -----------------------------------------------


def solver_error(flow, eps, target):
    """The RMS error of a velocity solver's samples against the exact map."""

    @eqx.filter_jit
    def rms_error(solver, steps):
        x = jax.vmap(lambda e: solver(flow.velocity, e, steps=steps))(eps)
        return jnp.sqrt(jnp.mean(jnp.sum((x - target) ** 2, axis=-1)))

    return lambda solver, steps: float(rms_error(solver, steps))


@pytest.mark.parametrize(
    ("solver", "steps"),
    # DPM-Solver++(2M) on the uniform t-grid reaches its order late: its steps next
    # to t = 0 and t = 1 are long in λ = log((1 - t) / t) (errors ~ log K / K²;
    # measured ratios 2.0, 2.7, 3.2, 3.3, 3.5 from 16 -> 32 to 256 -> 512 steps).
    [(sample_heun, 16), (sample_dpm2m, 128)],
    ids=["heun", "dpm2m"],
)
def test_solver_error_is_second_order(flow, noise, exact, solver, steps):
    """Doubling the steps divides the error by about 4. Euler's ratio, about 2, fails
    the check: at 16 -> 32 steps here, at 128 -> 256 in
    `test_euler_error_is_first_order`."""
    error = solver_error(flow, noise[:256], exact[:256])
    ratio = error(solver, steps) / error(solver, 2 * steps)
    assert 3 <= ratio <= 5, ratio
    if steps == 16:
        euler_ratio = error(sample_euler, steps) / error(sample_euler, 2 * steps)
        assert euler_ratio < 2.5, euler_ratio


def test_second_order_solvers_beat_euler_at_equal_nfe(flow, noise, exact):
    """At 16 network evaluations (Heun: two per step) both errors are at least ten
    times smaller than Euler's (measured: 0.140, Heun 0.0077, DPM-Solver++(2M)
    0.011)."""
    nfe = 16
    error = solver_error(flow, noise[:256], exact[:256])
    euler = error(sample_euler, nfe)
    heun = error(sample_heun, nfe // 2)
    dpm2m = error(sample_dpm2m, nfe)
    assert heun <= euler / 10 and dpm2m <= euler / 10, (euler, heun, dpm2m)


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_dpm2m_with_at_most_three_steps_is_euler(flow, noise, steps):
    """One and two steps are first order only (the first and last steps), and the
    second step's ratio `r = h_prev / h` is infinite (`λ_1 = -∞`), so three steps
    are Euler's too; four are not."""
    eps = noise[:64]
    dpm2m = jax.vmap(lambda e: sample_dpm2m(flow.velocity, e, steps=steps))(eps)
    euler = jax.vmap(lambda e: sample_euler(flow.velocity, e, steps=steps))(eps)
    if steps <= 3:
        assert max_error(dpm2m, euler) <= TOL
    else:
        assert max_error(dpm2m, euler) > 1e-3


@pytest.mark.parametrize("solver", [sample_heun, sample_dpm2m], ids=["heun", "dpm2m"])
def test_solver_takes_a_grid_and_passes_cond_on(flow, noise, solver):
    """A grid is the uniform steps it lists; `cond` reaches every velocity call."""

    @eqx.filter_jit
    def run(e):
        uniform = solver(flow.velocity, e, steps=5)
        grid = solver(flow.velocity, e, grid=jnp.linspace(1.0, 0.0, 6))
        scaled = solver(lambda x, t, *, cond: cond * x, e, steps=5, cond=2.0)
        fixed = solver(lambda x, t: 2.0 * x, e, steps=5)
        return uniform, grid, scaled, fixed

    uniform, grid, scaled, fixed = run(noise[0])
    assert max_error(grid, uniform) <= TOL
    assert max_error(scaled, fixed) == 0


def test_dpm2m_gradient_in_the_grid_is_finite(noise):
    """λ is infinite at both ends of the grid; neither value nor gradient sees it."""

    def loss(grid):
        return jnp.sum(sample_dpm2m(lambda x, t: t * x, noise[0], grid=grid))

    grid = jnp.array([1.0, 0.8, 0.5, 0.3, 0.1, 0.0])
    gradient = eqx.filter_jit(jax.grad(loss))(grid)
    assert bool(jnp.all(jnp.isfinite(gradient))), gradient


# Heun's flow map of a velocity ---------------------------------------------------


@pytest.mark.slow
def test_heun_map_is_second_order(flow, noise, exact):
    """Doubling the substeps quarters the error of the one-jump sample; on the
    diagonal the map is the velocity itself."""
    eps, target = noise[:64], exact[:64]

    @eqx.filter_jit
    def rms_error(heun):
        x = jax.vmap(lambda e: sample(heun, e))(eps)
        return jnp.sqrt(jnp.mean(jnp.sum((x - target) ** 2, axis=-1)))

    substeps = [4, 8, 16, 32]
    errors = [float(rms_error(HeunMap(flow.velocity, k))) for k in substeps]
    assert abs(loglog_slope(substeps, errors) + 2) <= 0.1, errors
    heun = HeunMap(flow.velocity, 3)
    t = jnp.asarray(0.4)
    on_diagonal = jax.vmap(lambda e: heun(e, t, t))(eps)
    assert max_error(on_diagonal, jax.vmap(lambda e: flow.velocity(e, t))(eps)) <= TOL


def test_heun_map_passes_cond_on(noise):
    heun = HeunMap(lambda x, t, *, cond: cond * x, 2)
    fixed = HeunMap(lambda x, t: 2.0 * x, 2)
    s, t = jnp.asarray(1.0), jnp.asarray(0.5)
    assert max_error(heun(noise[0], s, t, cond=2.0), fixed(noise[0], s, t)) == 0


# The batched sampler ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["velocity", "from-noise", "to-data", "two-time"])
def test_sample_batch_is_the_per_example_sampler(flow, noise, kind):
    """Each kind dispatches to its sampler, row by row, and the chunk size does not
    change a sample (the re-noising keys are split over the whole batch)."""
    eps = noise[:50]
    key = jax.random.key(3)
    keys = jax.random.split(key, 50)
    grid = jnp.linspace(1.0, 0.0, 4)
    expected = {
        "velocity": jax.vmap(lambda e: sample_euler(model_velocity(flow), e, steps=3)),
        "from-noise": jax.vmap(lambda e: sample(flow, e, steps=3)),
        "two-time": jax.vmap(lambda e: sample(flow, e, steps=3)),
        "to-data": jax.vmap(
            lambda e, k: sample_consistency(flow, e, key=k, grid=grid),
        ),
    }[kind]
    want = expected(eps, keys) if kind == "to-data" else expected(eps)
    whole = sample_batch(flow, eps, steps=3, kind=kind, key=key)
    chunked = sample_batch(flow, np.asarray(eps), steps=3, kind=kind, key=key, chunk=16)
    assert isinstance(whole, np.ndarray) and whole.shape == eps.shape
    assert max_error(whole, want) <= TOL
    assert max_error(chunked, whole) <= TOL


@pytest.mark.parametrize(
    ("solver", "sampler", "steps"),
    [("euler", sample_euler, 8), ("heun", sample_heun, 4), ("dpm2m", sample_dpm2m, 8)],
)
def test_sample_batch_steps_are_network_evaluations(
    flow, noise, solver, sampler, steps
):
    """`steps=8` of `kind="velocity"` is 8 velocity calls: 8 Euler or DPM-Solver++(2M)
    steps, 4 Heun steps."""
    eps = noise[:32]
    want = jax.vmap(lambda e: sampler(model_velocity(flow), e, steps=steps))(eps)
    got = sample_batch(flow, eps, steps=8, kind="velocity", solver=solver)
    assert max_error(got, want) <= TOL


def test_sample_batch_passes_labels_on(noise):
    def model(x, s, t, *, cond):
        return cond * x

    eps, labels = noise[:12], jnp.arange(12) % 3
    want = jax.vmap(lambda e, c: sample(model, e, steps=2, cond=c))(eps, labels)
    got = sample_batch(model, eps, steps=2, kind="two-time", cond=labels, chunk=6)
    assert max_error(got, want) <= TOL


# Mixture: the exact map is itself an ODE solve -------------------------------------


def mixture(labels=None) -> GaussianMixture:
    """K = 4 components in d = 2: means ~ N(0, 4 I), covariance eigenvalues in
    [0.05, 1] with random eigenvectors."""
    rng = np.random.default_rng(7)
    weights = rng.uniform(0.5, 1.5, 4)
    means = 2 * rng.standard_normal((4, 2))
    q, _ = np.linalg.qr(rng.standard_normal((4, 2, 2)))
    lam = np.exp(rng.uniform(np.log(0.05), 0.0, (4, 2)))
    covs = (q * lam[:, None, :]) @ np.swapaxes(q, 1, 2)
    covs = (covs + np.swapaxes(covs, 1, 2)) / 2
    return GaussianMixture(
        jnp.asarray(weights / weights.sum()),
        jnp.asarray(means),
        jnp.asarray(covs),
        labels=labels,
    )


@eqx.filter_jit
def mixture_samples(flow, eps, cond):
    by_map = jax.vmap(lambda e, c: sample(flow, e, cond=c))(eps, cond)
    two_jumps = jax.vmap(lambda e, c: sample(flow, e, steps=2, cond=c))(eps, cond)
    by_ode = jax.vmap(lambda e, c: sample_ode(flow.velocity, e, cond=c))(eps, cond)
    return by_map, two_jumps, by_ode


@pytest.mark.slow
def test_mixture_sample_matches_the_ode():
    flow = mixture(labels=jnp.array([0, 1, 0, 1]))
    eps = jax.random.normal(jax.random.key(8), (16, 2))
    for cond in (None, jnp.array([0, 1] * 8)):
        by_map, two_jumps, by_ode = mixture_samples(flow, eps, cond)
        assert max_error(by_map, by_ode) <= ODE_TOL
        assert max_error(two_jumps, by_map) <= ODE_TOL
    # The class matters: class-1 samples are not the unconditional ones.
    assert max_error(mixture_samples(flow, eps, jnp.ones(16, int))[0], by_map) > 0.1


# Differentiability -----------------------------------------------------------------


def sampled(case, model, eps, grid):
    if case == "sample":
        return sample(model, eps, steps=2)
    if case == "sample(grid)":
        return sample(model, eps, grid=grid)
    if case == "invert":
        return invert(model, eps, steps=2)
    if case == "consistency":
        return sample_consistency(model, eps, key=jax.random.key(9), grid=grid)
    if case == "euler":
        return sample_euler(model_velocity(model), eps, steps=4)
    assert case == "ode"
    return sample_ode(model_velocity(model), eps)


GRID = jnp.array([1.0, 0.6, 0.25, 0.0])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "rtol"),
    [
        ("sample", 1e-7),
        ("sample(grid)", 1e-7),
        ("invert", 1e-7),
        ("consistency", 1e-7),
        ("euler", 1e-7),
        # The adaptive steps move with θ; the gradient does not follow them.
        ("ode", 1e-5),
    ],
)
def test_gradient_matches_finite_difference(flow, noise, case, rtol):
    """The gradient of a loss of the samples with respect to the parameters θ of a
    perturbed model `V* + A x + b + c s + e t`, against a central difference along a
    random direction in θ (and, for a grid, in the interior grid times)."""
    eps = noise[:8]
    model = testing.perturbed(flow, DIM, key=jax.random.key(10), scale=0.1)
    params = ((model.A, model.b, model.c, model.e), GRID[1:-1])

    def loss(params):
        (A, b, c, e), interior = params
        perturbed = testing.AffinePerturbation(flow, A, b, c, e)
        grid = jnp.concatenate([GRID[:1], interior, GRID[-1:]])
        x = jax.vmap(lambda e: sampled(case, perturbed, e, grid))(eps)
        return jnp.mean(jnp.sum(jnp.sin(x) * x, axis=-1))

    grad = eqx.filter_jit(jax.grad(loss))(params)
    leaves = jax.tree.leaves(grad)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    keys = jax.random.split(jax.random.key(11), len(leaves))
    direction = jax.tree.unflatten(
        jax.tree.structure(params),
        [jax.random.normal(k, g.shape) for k, g in zip(keys, leaves, strict=True)],
    )
    if case not in ("sample(grid)", "consistency"):
        direction = (direction[0], jnp.zeros_like(direction[1]))
    h = 1e-5 if case != "ode" else 1e-4
    shifted = eqx.filter_jit(
        lambda h: loss(jax.tree.map(lambda p, d: p + h * d, params, direction))
    )
    difference = (shifted(h) - shifted(-h)) / (2 * h)
    directional = sum(
        jnp.vdot(g, d) for g, d in zip(leaves, jax.tree.leaves(direction), strict=True)
    )
    assert abs(directional - difference) <= rtol * abs(difference), (
        directional,
        difference,
    )


# Bad input -------------------------------------------------------------------------


E = jnp.zeros(DIM)
KEY = jax.random.key(0)
# The hook's TypeCheckError or the sampler's own message; either names the argument.
NAMES_ARGUMENT = "`{0}`|parameter '{0}'"
BAD_CALLS = {
    "grid not monotone": (
        lambda f: sample(f, E, grid=jnp.array([1.0, 0.3, 0.5, 0.0])),
        ValueError,
        r"strictly decreasing; got grid\[1\] = 0.3 and grid\[2\] = 0.5",
        None,
    ),
    "grid repeats a time": (
        lambda f: sample_euler(f.velocity, E, grid=jnp.array([1.0, 0.5, 0.5, 0.0])),
        ValueError,
        r"strictly decreasing; got grid\[1\] = 0.5 and grid\[2\] = 0.5",
        None,
    ),
    "grid outside [0, 1]": (
        lambda f: sample(f, E, grid=jnp.array([1.5, 0.5, 0.0])),
        ValueError,
        r"`grid` times must lie in \[0, 1\].*1\.5",
        None,
    ),
    "grid not ending at 0": (
        lambda f: sample(f, E, grid=jnp.array([1.0, 0.5, 0.1])),
        ValueError,
        r"from t = 1 to t = 0 when used to sample; .*grid\[-1\] = 0\.1",
        None,
    ),
    "grid not starting at 1": (
        lambda f: sample_consistency(f, E, key=KEY, grid=jnp.array([0.9, 0.0])),
        ValueError,
        r"from t = 1 to t = 0 when used to sample; got grid\[0\] = 0\.9",
        None,
    ),
    "sampling grid to invert": (
        lambda f: invert(f, E, grid=jnp.array([1.0, 0.0])),
        ValueError,
        r"from t = 0 to t = 1 when used to invert; got grid\[0\] = 1\.0",
        None,
    ),
    "invert grid not increasing": (
        lambda f: invert(f, E, grid=jnp.array([0.0, 0.6, 0.4, 1.0])),
        ValueError,
        r"strictly increasing; got grid\[1\] = 0.6 and grid\[2\] = 0.4",
        None,
    ),
    "grid of one time": (
        lambda f: sample(f, E, grid=jnp.array([1.0])),
        ValueError,
        r"`grid` must be a 1-d array of at least 2 times; got shape \(1,\)",
        None,
    ),
    "grid not 1-d": (
        lambda f: sample(f, E, grid=jnp.array([[1.0, 0.0]])),
        ValueError,
        r"`grid` must be a 1-d array of at least 2 times; got shape \(1, 2\)",
        NAMES_ARGUMENT.format("grid"),
    ),
    "steps zero": (
        lambda f: sample(f, E, steps=0),
        ValueError,
        r"`steps` must be at least 1; got steps=0",
        None,
    ),
    "euler steps negative": (
        lambda f: sample_euler(f.velocity, E, steps=-2),
        ValueError,
        r"`steps` must be at least 1; got steps=-2",
        None,
    ),
    "steps not an int": (
        lambda f: sample(f, E, steps=2.0),  # pyright: ignore[reportArgumentType]
        TypeError,
        r"`steps` must be a Python int; got 2\.0",
        NAMES_ARGUMENT.format("steps"),
    ),
    "steps and grid": (
        lambda f: sample(f, E, steps=4, grid=jnp.array([1.0, 0.0])),
        ValueError,
        r"Pass either `steps` or `grid`, not both; got steps=4",
        None,
    ),
    "batched noise": (
        lambda f: sample(f, jnp.zeros((8, DIM))),
        ValueError,
        r"`noise` must be one example of shape \(dim,\) \(batch with jax\.vmap\); "
        r"got shape \(8, 4\)",
        NAMES_ARGUMENT.format("noise"),
    ),
    "scalar noise for the ODE": (
        lambda f: sample_ode(f.velocity, jnp.zeros(())),
        ValueError,
        r"`noise` must be one example of shape \(dim,\).*got shape \(\)",
        NAMES_ARGUMENT.format("noise"),
    ),
    "batched data to invert": (
        lambda f: invert(f, jnp.zeros((2, DIM))),
        ValueError,
        r"`x0` must be one example of shape \(dim,\)",
        NAMES_ARGUMENT.format("x0"),
    ),
    "integer noise": (
        lambda f: sample_euler(f.velocity, jnp.zeros(DIM, int), steps=2),
        TypeError,
        r"`noise` must be a floating array; got dtype int",
        NAMES_ARGUMENT.format("noise"),
    ),
    "consistency without grid": (
        lambda f: sample_consistency(f, E, key=KEY, grid=None),  # pyright: ignore
        TypeError,
        r"needs a `grid` of times from 1 to 0",
        NAMES_ARGUMENT.format("grid"),
    ),
    "Heun map without substeps": (
        lambda f: HeunMap(f.velocity, 0),
        ValueError,
        r"`HeunMap\(substeps=...\)` must be a positive integer; got 0",
        None,
    ),
    "batch sampler, unknown kind": (
        lambda f: sample_batch(f, E[None], steps=1, kind="one-step"),  # pyright: ignore
        ValueError,
        r"`sample_batch\(kind=...\)` must be one of .*'two-time'.*got 'one-step'",
        NAMES_ARGUMENT.format("kind"),
    ),
    "batch sampler, steps zero": (
        lambda f: sample_batch(f, E[None], steps=0, kind="two-time"),
        ValueError,
        r"`sample_batch\(steps=...\)` must be a positive integer; got 0",
        None,
    ),
    "batch sampler, one example": (
        lambda f: sample_batch(f, E, steps=1, kind="two-time"),
        ValueError,
        r"`noise` must be a batch of shape \(n, dim\); got shape \(4,\)",
        NAMES_ARGUMENT.format("noise"),
    ),
    "batch sampler, labels of another batch": (
        lambda f: sample_batch(f, E[None], steps=1, kind="two-time", cond=jnp.zeros(3)),
        ValueError,
        r"`cond` must hold one row per sample \(leading axis 1\); got leading axes "
        r"\[\(3,\)\]",
        None,
    ),
    "batch sampler, unknown solver": (
        lambda f: sample_batch(
            f,
            E[None],
            steps=2,
            kind="velocity",
            solver="rk4",  # pyright: ignore[reportArgumentType]
        ),
        ValueError,
        r"`sample_batch\(solver=...\)` must be one of .*'dpm2m'.*got 'rk4'",
        NAMES_ARGUMENT.format("solver"),
    ),
    "batch sampler, solver of a flow map": (
        lambda f: sample_batch(f, E[None], steps=2, kind="two-time", solver="heun"),
        ValueError,
        r"`sample_batch\(solver='heun'\)`.*needs `kind='velocity'`; got "
        r"kind='two-time'",
        None,
    ),
    "batch sampler, Heun with odd steps": (
        lambda f: sample_batch(f, E[None], steps=3, kind="velocity", solver="heun"),
        ValueError,
        r"`steps` \(the calls per sample\) must be even and at least 2; got steps=3",
        None,
    ),
    "batch sampler, Heun with one step": (
        lambda f: sample_batch(f, E[None], steps=1, kind="velocity", solver="heun"),
        ValueError,
        r"must be even and at least 2; got steps=1",
        None,
    ),
    "Heun steps zero": (
        lambda f: sample_heun(f.velocity, E, steps=0),
        ValueError,
        r"`steps` must be at least 1; got steps=0",
        None,
    ),
    "DPM-Solver++(2M) grid not monotone": (
        lambda f: sample_dpm2m(f.velocity, E, grid=jnp.array([1.0, 0.3, 0.5, 0.0])),
        ValueError,
        r"strictly decreasing; got grid\[1\] = 0.3 and grid\[2\] = 0.5",
        None,
    ),
    "batch sampler, re-noising without a key": (
        lambda f: sample_batch(f, E[None], steps=2, kind="to-data"),
        ValueError,
        r"re-noises between its 2 jumps: pass `key=`",
        None,
    ),
    "ODE time outside [0, 1]": (
        lambda f: sample_ode(f.velocity, E, t0=-0.5),
        ValueError,
        r"Time `t0` must lie in \[0, 1\].*got t0=-0\.5",
        None,
    ),
    "ODE tolerance not positive": (
        lambda f: sample_ode(f.velocity, E, rtol=0.0),
        ValueError,
        r"`rtol` must be positive or None; got 0\.0",
        None,
    ),
}


@pytest.mark.parametrize("case", BAD_CALLS, ids=str)
def test_bad_input(flow, case):
    call, error, message, _ = BAD_CALLS[case]
    with without_runtime_typechecks(), pytest.raises(error, match=message):
        call(flow)


@pytest.mark.parametrize("case", BAD_CALLS, ids=str)
def test_bad_input_with_runtime_typechecks(flow, case):
    """With the type-checking hook on, the error still names the bad argument: the
    sampler's own message where the annotation admits the value, else the hook's."""
    call, error, message, names_argument = BAD_CALLS[case]
    if names_argument is None:
        with pytest.raises(error, match=message):
            call(flow)
    else:
        with pytest.raises((TypeError, ValueError), match=names_argument):
            call(flow)
