"""The analytic Gaussian flow satisfies every flow-map identity to round-off."""

import equinox as eqx
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import without_runtime_typechecks

from fmcalc import testing
from fmcalc._derivative import JVP, FiniteDifference
from fmcalc.flows import Gaussian


DTYPES = (jnp.float64, jnp.float32)
BATCH = 64


def fixed_gaussian(dim: int, dtype=jnp.float64, min_eigenvalue=1e-3, seed=0):
    """A full-rank Gaussian with eigenvalues log-spaced in [min_eigenvalue, 2]."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    eigenvalues = np.geomspace(min_eigenvalue, 2.0, dim)
    cov = (q * eigenvalues) @ q.T
    mean = 2 * rng.standard_normal(dim)
    return Gaussian(mean.astype(dtype), ((cov + cov.T) / 2).astype(dtype))


def on_flow(flow: Gaussian, s, seed: int, dtype):
    """Points `x_s = (1 - s) x0 + s eps` on the flow at the source times `s`.

    Built in float64 with numpy from the flow's eigendecomposition, so no eager JAX
    kernel is compiled per dimension.
    """
    rng = np.random.default_rng(seed)
    s = np.asarray(s, np.float64)[:, None]
    z, eps = rng.standard_normal((2, s.shape[0], flow.dim))
    eigvecs = np.asarray(flow.eigvecs, np.float64)
    scale = np.sqrt(np.asarray(flow.eigvals, np.float64))
    x0 = np.asarray(flow.mean, np.float64) + (z * scale) @ eigvecs.T
    return jnp.asarray((1 - s) * x0 + s * eps, dtype)


def residuals(flow: Gaussian, x, s, u, t) -> dict[str, float]:
    """Every identity, compiled once per dimension and dtype (the single checks agree
    with it: `tests/test_testing_kit.py`)."""
    return testing.all_residuals(
        flow.flow_map, flow.average_velocity, flow.velocity, x, s, u, t
    )


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@hypothesis.given(data=st.data())
def test_identities(dtype, data):
    flow = data.draw(testing.gaussians(dtype=np.dtype(dtype).type), label="flow")
    seed = data.draw(testing.seeds(), label="seed")
    drawn = data.draw(testing.time_triples(), label="(s, u, t)")
    # Half the rows take the drawn (edge-heavy) times, half uniform ones, so every
    # example also covers the interior and mixed orderings.
    rng = np.random.default_rng(seed)
    s, u, t = (
        np.concatenate([np.full(BATCH // 2, time), rng.uniform(size=BATCH // 2)])
        for time in drawn
    )
    x = on_flow(flow, s, seed, dtype)
    s, u, t = (jnp.asarray(time, dtype) for time in (s, u, t))
    found = residuals(flow, x, s, u, t)
    failed = {k: r for k, r in found.items() if not r <= testing.tolerance(dtype)}
    assert not failed, f"residuals above {testing.tolerance(dtype)}: {failed}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [1, 16])
def test_identities_at_every_edge_combination(dtype, dim):
    """All 6³ combinations of edge times for (s, u, t), at the ends of the dimension
    range, with λ_min = 1e-3 exactly."""
    flow = fixed_gaussian(dim, np.dtype(dtype).type)
    grid = np.array(np.meshgrid(*[testing.EDGE_TIMES] * 3)).reshape(3, -1)
    x = on_flow(flow, grid[0], seed=dim, dtype=dtype)
    s, u, t = (jnp.asarray(time, dtype) for time in grid)
    found = residuals(flow, x, s, u, t)
    assert max(found.values()) <= testing.tolerance(dtype), found


@pytest.mark.slow
def test_average_velocity_is_cancellation_free():
    flow64 = fixed_gaussian(4)
    flow32 = fixed_gaussian(4, jnp.float32)
    s = jnp.full(BATCH, 0.5, jnp.float32)
    t = s + jnp.float32(1e-5)
    x = on_flow(flow32, s, seed=1, dtype=jnp.float32)
    exact = jax.vmap(flow64.average_velocity)(
        x.astype(jnp.float64), s.astype(jnp.float64), t.astype(jnp.float64)
    )
    naive = (jax.vmap(flow32.flow_map)(x, s, t) - x) / (t - s)[:, None]
    closed_form = jax.vmap(flow32.average_velocity)(x, s, t)
    assert closed_form.dtype == jnp.float32
    assert jnp.max(jnp.abs(naive - exact)) > 1e-3
    assert jnp.max(jnp.abs(closed_form - exact)) <= 1e-5


@pytest.mark.slow
def test_transformations():
    flow = fixed_gaussian(3)
    x, s, t = jnp.array([0.3, -1.0, 2.0]), jnp.array(0.9), jnp.array(0.2)
    F = flow.flow_map(x, s, t)
    tol = testing.tolerance(jnp.float64)

    # `jax.jit(flow.flow_map)` itself fails: jax hashes the callable, and a bound
    # method of an `eqx.Module` holds arrays. Filter-jit it, or jit a closure.
    for jitted in (
        eqx.filter_jit(flow.flow_map),
        jax.jit(lambda *args: flow.flow_map(*args)),
    ):
        assert jnp.max(jnp.abs(jitted(x, s, t) - F)) <= tol

    xs = jnp.stack([x, -x, 2 * x])
    ss, ts = jnp.array([0.9, 0.1, 1.0]), jnp.array([0.2, 0.7, 0.0])
    looped = jnp.stack([flow.flow_map(*args) for args in zip(xs, ss, ts, strict=True)])
    assert jnp.max(jnp.abs(jax.vmap(flow.flow_map)(xs, ss, ts) - looped)) <= tol

    # The flow map is affine in x: its Jacobian is Q diag(√(c_t / c_s)) Qᵀ.
    lam, q = flow.eigvals, flow.eigvecs
    c_s, c_t = (1 - s) ** 2 * lam + s**2, (1 - t) ** 2 * lam + t**2
    jacobian = (q * jnp.sqrt(c_t / c_s)[None, :]) @ q.T
    dx = jnp.array([1.0, 2.0, -0.5])
    _, tangent = jax.jvp(lambda y: flow.flow_map(y, s, t), (x,), (dx,))
    assert jnp.max(jnp.abs(tangent - jacobian @ dx)) <= tol

    w = jnp.array([0.5, -1.0, 2.0])
    grad_t = jax.grad(lambda time: flow.flow_map(x, s, time) @ w)(t)
    assert jnp.abs(grad_t - flow.velocity(F, t) @ w) <= tol
    grad_x = jax.grad(lambda y: flow.flow_map(y, s, t) @ w)(x)
    assert jnp.max(jnp.abs(grad_x - jacobian.T @ w)) <= tol
    # dF/dmean = (1 - t) I - (1 - s) J, so gradients reach the flow's parameters.
    grads = eqx.filter_grad(lambda f: f.flow_map(x, s, t) @ w)(flow)
    expected = (1 - t) * w - (1 - s) * jacobian.T @ w
    assert jnp.max(jnp.abs(grads.mean - expected)) <= tol


@pytest.mark.slow
def test_point_mass():
    dim = 3
    mean = jnp.array([1.0, -2.0, 0.5])
    flow = Gaussian(mean, jnp.zeros((dim, dim)))
    rng = np.random.default_rng(2)
    s = jnp.asarray(rng.uniform(0.05, 1.0, BATCH))
    u = jnp.asarray(rng.uniform(0.05, 1.0, BATCH))
    t = jnp.asarray(rng.uniform(0.0, 1.0, BATCH))
    x = on_flow(flow, s, seed=3, dtype=jnp.float64)

    at_data = jax.vmap(flow.flow_map)(x, s, jnp.zeros(BATCH))
    np.testing.assert_array_equal(at_data, jnp.broadcast_to(mean, at_data.shape))
    # Straight lines through the mean: F = (1 - t) mean + (t / s) (x - (1 - s) mean).
    mean_row = mean[None, :]
    line = (1 - t)[:, None] * mean_row + (t / s)[:, None] * (
        x - (1 - s)[:, None] * mean_row
    )
    F = jax.vmap(flow.flow_map)(x, s, t)
    assert jnp.max(jnp.abs(F - line)) <= testing.tolerance(jnp.float64)
    found = residuals(flow, x, s, u, jnp.asarray(rng.uniform(0.05, 1.0, BATCH)))
    assert max(found.values()) <= testing.tolerance(jnp.float64), found


def test_point_mass_is_singular_at_data_end():
    flow = Gaussian(jnp.ones(2), jnp.zeros((2, 2)))
    x = jnp.zeros(2)
    with pytest.raises(RuntimeError, match="singular"):
        flow.flow_map(x, 0.0, 0.5)
    with pytest.raises(RuntimeError, match="singular"):
        flow.average_velocity(x, 0.0, 0.5)
    with pytest.raises(RuntimeError, match="singular"):
        flow.velocity(x, 0.0)
    with pytest.raises(RuntimeError, match="singular"):
        eqx.filter_jit(flow.flow_map)(x, jnp.array(0.0), jnp.array(0.5))


def moments_within_error(samples, mean, cov, sigmas=5.0):
    """Sample mean and covariance within `sigmas` Monte Carlo standard errors."""
    n = samples.shape[0]
    mean, cov = np.asarray(mean), np.asarray(cov)
    variances = np.diag(cov)
    mean_error = np.abs(np.mean(samples, axis=0) - mean)
    cov_error = np.abs(np.cov(np.asarray(samples), rowvar=False) - cov)
    cov_se = np.sqrt((np.outer(variances, variances) + cov**2) / n)
    return np.all(mean_error <= sigmas * np.sqrt(variances / n)) and np.all(
        cov_error <= sigmas * cov_se
    )


def test_samples_have_data_moments():
    flow = fixed_gaussian(3, min_eigenvalue=0.1)
    cov = (flow.eigvecs * flow.eigvals[None, :]) @ flow.eigvecs.T
    samples = flow.sample(jax.random.key(0), 50_000)
    assert samples.shape == (50_000, 3)
    assert moments_within_error(samples, flow.mean, cov)


@pytest.mark.parametrize("steps", [1, 4])
def test_pushing_noise_gives_data(steps):
    """K exact steps 1 -> 0 give N(mean, cov) samples, the same as one step."""
    flow = fixed_gaussian(3, min_eigenvalue=0.1)
    cov = (flow.eigvecs * flow.eigvals[None, :]) @ flow.eigvecs.T
    n = 50_000
    noise = jax.random.normal(jax.random.key(1), (n, 3), jnp.float64)
    grid = jnp.linspace(1.0, 0.0, steps + 1)
    x = noise
    for s, t in zip(grid[:-1], grid[1:], strict=True):
        x = jax.vmap(flow.flow_map)(x, jnp.full(n, s), jnp.full(n, t))
    one_step = jax.vmap(flow.flow_map)(noise, jnp.ones(n), jnp.zeros(n))
    assert jnp.max(jnp.abs(x - one_step)) <= testing.tolerance(jnp.float64)
    assert moments_within_error(x, flow.mean, cov)


# The hook's TypeCheckError or `Gaussian`'s own message; either names the argument.
NAMES_ARGUMENT = "`{0}`|parameter '{0}'"
BAD_CONSTRUCTIONS = {
    "non-square cov": (
        lambda: Gaussian(jnp.zeros(3), jnp.zeros((3, 2))),
        ValueError,
        r"`cov` must have shape \(3, 3\)",
        NAMES_ARGUMENT.format("cov"),
    ),
    "mismatched cov": (
        lambda: Gaussian(jnp.zeros(3), jnp.eye(2)),
        ValueError,
        r"`cov` must have shape \(3, 3\) to match `mean`",
        NAMES_ARGUMENT.format("cov"),
    ),
    "non-float dtype": (
        lambda: Gaussian(jnp.zeros(3, jnp.int32), jnp.eye(3, dtype=jnp.int32)),
        TypeError,
        "`mean` must be a floating array",
        NAMES_ARGUMENT.format("mean"),
    ),
}
BAD_CALLS = {
    "x with wrong length": (
        lambda g: g.velocity(jnp.zeros(4), 0.5),
        ValueError,
        r"`x` must be one example of shape \(3,\)",
        NAMES_ARGUMENT.format("x"),
    ),
    "batched x": (
        lambda g: g.flow_map(jnp.zeros((2, 3)), 0.5, 0.1),
        ValueError,
        r"`x` must be one example of shape \(3,\)",
        NAMES_ARGUMENT.format("x"),
    ),
    "non-scalar time": (
        lambda g: g.flow_map(jnp.zeros(3), jnp.zeros(2), 0.1),
        ValueError,
        "Time `s` must be a scalar per example",
        NAMES_ARGUMENT.format("s"),
    ),
    "cond given": (
        lambda g: g.average_velocity(jnp.zeros(3), 0.5, 0.1, cond=1),
        TypeError,
        "`Gaussian` is unconditional",
        "got cond=1",
    ),
}


@pytest.mark.parametrize("case", BAD_CONSTRUCTIONS, ids=str)
def test_bad_construction(case):
    make, error, message, _ = BAD_CONSTRUCTIONS[case]
    with without_runtime_typechecks(), pytest.raises(error, match=message):
        make()


@pytest.mark.parametrize("case", BAD_CALLS, ids=str)
def test_bad_call(case):
    call, error, message, _ = BAD_CALLS[case]
    with without_runtime_typechecks(), pytest.raises(error, match=message):
        call(Gaussian(jnp.zeros(3), jnp.eye(3)))


@pytest.mark.parametrize("case", {**BAD_CONSTRUCTIONS, **BAD_CALLS}, ids=str)
def test_bad_input_names_the_argument(case):
    """With or without the type-checking hook, the error names the bad argument."""
    bad, *_, names_argument = {**BAD_CONSTRUCTIONS, **BAD_CALLS}[case]
    flow = Gaussian(jnp.zeros(3), jnp.eye(3))
    with pytest.raises((TypeError, ValueError), match=names_argument):
        bad() if case in BAD_CONSTRUCTIONS else bad(flow)


@pytest.mark.parametrize(
    ("cov", "message"),
    [
        (jnp.array([[1.0, 0.5], [0.0, 1.0]]), "`cov` must be symmetric"),
        (jnp.array([[1.0, 0.0], [0.0, -0.5]]), "`cov` must be positive semi-definite"),
    ],
)
def test_bad_covariance_values(cov, message):
    with pytest.raises(ValueError, match=message):
        Gaussian(jnp.zeros(2), cov)


LAGRANGIAN, EULERIAN = "lagrangian (0, 0, 1)", "eulerian (v, 1, 0)"


@pytest.mark.parametrize("tangent", [LAGRANGIAN, EULERIAN])
@pytest.mark.parametrize(("scheme", "order"), [("forward", 1), ("central", 2)])
@pytest.mark.parametrize(("s", "t"), [(0.8, 0.3), (0.2, 0.9)])
def test_finite_difference_order(tangent, scheme, order, s, t):
    flow = fixed_gaussian(4, min_eigenvalue=0.05)
    s, t = jnp.array(s), jnp.array(t)
    x = on_flow(flow, jnp.full(1, s), seed=4, dtype=jnp.float64)[0]
    if tangent == LAGRANGIAN:
        along = (jnp.zeros_like(x), jnp.array(0.0), jnp.array(1.0))
    else:
        along = (flow.velocity(x, s), jnp.array(1.0), jnp.array(0.0))
    slope, errors = testing.derivative_convergence(
        flow.flow_map, (x, s, t), along, scheme=scheme, steps=np.logspace(-4, -1, 7)
    )
    assert abs(slope - order) <= 0.3, (slope, errors)


def test_finite_difference_step_below_resolution_raises():
    with pytest.raises(ValueError, match="resolution of float32"):
        FiniteDifference(1e-8).check_dtype(jnp.float32)
    FiniteDifference(1e-8).check_dtype(jnp.float64)

    flow = fixed_gaussian(2, jnp.float32)
    x = jnp.ones((4, 2), jnp.float32)
    s, t = jnp.full(4, 0.7, jnp.float32), jnp.full(4, 0.2, jnp.float32)
    with pytest.raises(ValueError, match="resolution of float32"):
        testing.lagrangian_residual(
            flow.flow_map, flow.velocity, x, s, t, derivative=FiniteDifference(1e-8)
        )


@pytest.mark.slow
def test_checks_accept_any_derivative_strategy():
    """A finite difference's truncation error shows in the residual, shrinking at its
    order; the exact JVP leaves only round-off."""
    flow = fixed_gaussian(3, min_eigenvalue=0.05)
    rng = np.random.default_rng(5)
    s = jnp.asarray(rng.uniform(size=BATCH))
    t = jnp.asarray(rng.uniform(size=BATCH))
    x = on_flow(flow, s, seed=5, dtype=jnp.float64)
    F, v = flow.flow_map, flow.velocity
    for check in (testing.lagrangian_residual, testing.eulerian_residual):
        exact = check(F, v, x, s, t, derivative=JVP())
        coarse = check(F, v, x, s, t, derivative=FiniteDifference(1e-3, "central"))
        fine = check(F, v, x, s, t, derivative=FiniteDifference(1e-4, "central"))
        assert exact <= testing.tolerance(jnp.float64)
        assert 50 < coarse / fine < 200


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_log_prob_is_the_marginal_density(t):
    """`log_prob(x, t)` is `log N(x; (1 - t) mean, (1 - t)² cov + t² I)`."""
    flow = fixed_gaussian(3, min_eigenvalue=0.05)
    q, lam = np.asarray(flow.eigvecs), np.asarray(flow.eigvals)
    cov = (q * lam) @ q.T
    c_t = (1 - t) ** 2 * cov + t**2 * np.eye(3)
    x = on_flow(flow, np.full(8, t), seed=1, dtype=jnp.float64)
    y = np.asarray(x) - (1 - t) * np.asarray(flow.mean)
    _, logdet = np.linalg.slogdet(2 * np.pi * c_t)
    expected = -0.5 * (logdet + np.einsum("ni,ij,nj->n", y, np.linalg.inv(c_t), y))
    got = jax.vmap(flow.log_prob, in_axes=(0, None))(x, t)
    np.testing.assert_allclose(got, expected, atol=1e-10)


def test_log_prob_of_a_point_mass_is_undefined_at_data():
    flow = Gaussian(jnp.zeros(2), jnp.zeros((2, 2)))
    assert jnp.isfinite(flow.log_prob(jnp.ones(2), 0.5))
    with pytest.raises(Exception, match="undefined at t = 0"):
        flow.log_prob(jnp.ones(2))
