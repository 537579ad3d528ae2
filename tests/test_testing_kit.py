"""The testing kit itself: its checks catch wrong flow maps and its strategies draw
what they promise."""

import equinox as eqx
import hypothesis
import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import without_runtime_typechecks

import fmcalc.testing
from fmcalc import testing
from fmcalc.flows import Gaussian


PUBLIC = (
    "EDGE_TIMES",
    "all_residuals",
    "boundary_residual",
    "derivative_convergence",
    "diagonal_residual",
    "dimensions",
    "eulerian_residual",
    "gaussians",
    "inverse_residual",
    "lagrangian_residual",
    "means",
    "parameterisation_residual",
    "seeds",
    "semigroup_residual",
    "spd_covariances",
    "time_pairs",
    "time_triples",
    "times",
    "tolerance",
)
TOL = testing.tolerance(jnp.float64)
BATCH = 64


def test_public_api_is_documented():
    for name in PUBLIC:
        obj = getattr(fmcalc.testing, name)
        if callable(obj):
            doc = obj.__doc__ or ""
            for section in ("**Arguments:**", "**Returns:**", "**Example:**"):
                assert section in doc, f"{name} lacks {section}"


class Perturbed(eqx.Module):
    """The exact flow plus `1e-3 sin(x) (t - s)` in `F` (so `1e-3 sin(x)` in `V`):
    still `F(x, t, t) = x`, but off the flow everywhere else."""

    flow: Gaussian

    def flow_map(self, x, s, t):
        return self.flow.flow_map(x, s, t) + 1e-3 * jnp.sin(x) * (t - s)

    def average_velocity(self, x, s, t):
        return self.flow.average_velocity(x, s, t) + 1e-3 * jnp.sin(x)


class Shifted(eqx.Module):
    """The exact flow plus `1e-3 sin(x)`: moves points even on a jump of length 0."""

    flow: Gaussian

    def flow_map(self, x, s, t):
        return self.flow.flow_map(x, s, t) + 1e-3 * jnp.sin(x)


class Swapped(eqx.Module):
    """The wrong time convention `F(x, t, s)`: source and target exchanged."""

    flow: Gaussian

    def flow_map(self, x, s, t):
        return self.flow.flow_map(x, t, s)

    def average_velocity(self, x, s, t):
        return self.flow.average_velocity(x, t, s)


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    cov = (q * np.array([0.05, 0.5, 2.0])) @ q.T
    flow = Gaussian(rng.standard_normal(3), (cov + cov.T) / 2)
    # Times in [0.1, 0.9] and |t - s| >= 0.2 keep every wrong map's error O(1e-4) or
    # more, away from coincidences such as s = t.
    s = rng.uniform(0.1, 0.9, BATCH)
    t = np.clip(s + rng.choice([-1, 1], BATCH) * rng.uniform(0.2, 0.6, BATCH), 0, 1)
    u = rng.uniform(0.1, 0.9, BATCH)
    x = jnp.asarray(rng.standard_normal((BATCH, 3)))
    return flow, x, jnp.asarray(s), jnp.asarray(u), jnp.asarray(t)


def run_check(check, flow_map, average_velocity, velocity, x, s, u, t):
    if check == "semigroup":
        return testing.semigroup_residual(flow_map, x, s, u, t)
    if check == "inverse":
        return testing.inverse_residual(flow_map, x, s, t)
    if check == "boundary":
        return testing.boundary_residual(flow_map, x, t)
    if check == "diagonal":
        return testing.diagonal_residual(average_velocity, velocity, x, t)
    if check == "parameterisation":
        return testing.parameterisation_residual(flow_map, average_velocity, x, s, t)
    if check == "lagrangian":
        return testing.lagrangian_residual(flow_map, velocity, x, s, t)
    assert check == "eulerian"
    return testing.eulerian_residual(flow_map, velocity, x, s, t)


CHECKS = (
    "semigroup",
    "inverse",
    "boundary",
    "diagonal",
    "parameterisation",
    "lagrangian",
    "eulerian",
)
# (wrong model, what it replaces), for each check a wrong model that it must catch.
CAUGHT_BY = {
    "semigroup": [("perturbed", "F"), ("swapped", "F")],
    "inverse": [("perturbed", "F")],
    "boundary": [("shifted", "F")],
    "diagonal": [("perturbed", "V")],
    "parameterisation": [("perturbed", "F"), ("swapped", "V")],
    "lagrangian": [("perturbed", "F"), ("swapped", "F")],
    "eulerian": [("perturbed", "F"), ("swapped", "F")],
}
# Blind spots, pinned so that nobody relies on one check alone: a map that swaps its
# times is its own inverse and fixes the diagonal; a `(t - s)`-scaled error vanishes
# at `s = t`.
MISSED_BY = {
    "inverse": [("swapped", "F")],
    "boundary": [("perturbed", "F"), ("swapped", "F")],
    "diagonal": [("swapped", "V")],
}


def wrong(kind, flow):
    return {"perturbed": Perturbed, "shifted": Shifted, "swapped": Swapped}[kind](flow)


def residual_with(check, kind, replaced, problem):
    flow, x, s, u, t = problem
    model = wrong(kind, flow)
    F = model.flow_map if replaced == "F" else flow.flow_map
    V = model.average_velocity if replaced == "V" else flow.average_velocity
    return run_check(check, F, V, flow.velocity, x, s, u, t)


@pytest.mark.parametrize("check", CHECKS)
def test_exact_flow_passes(check, problem):
    flow, x, s, u, t = problem
    F, V, v = flow.flow_map, flow.average_velocity, flow.velocity
    assert run_check(check, F, V, v, x, s, u, t) <= TOL


@pytest.mark.parametrize(
    ("check", "kind", "replaced"),
    [(c, k, r) for c, cases in CAUGHT_BY.items() for k, r in cases],
)
def test_wrong_flow_fails(check, kind, replaced, problem):
    assert residual_with(check, kind, replaced, problem) > 1e4 * TOL


@pytest.mark.parametrize(
    ("check", "kind", "replaced"),
    [(c, k, r) for c, cases in MISSED_BY.items() for k, r in cases],
)
def test_known_blind_spots(check, kind, replaced, problem):
    assert residual_with(check, kind, replaced, problem) <= TOL


@pytest.mark.slow
def test_all_residuals_agrees_with_single_checks(problem):
    flow, x, s, u, t = problem
    for model in (flow, Perturbed(flow)):
        found = testing.all_residuals(
            model.flow_map, model.average_velocity, flow.velocity, x, s, u, t
        )
        assert set(found) == set(CHECKS)
        for check in CHECKS:
            single = run_check(
                check, model.flow_map, model.average_velocity, flow.velocity, x, s, u, t
            )
            assert found[check] == pytest.approx(single, rel=1e-6, abs=1e-15)


def test_nan_is_a_failure(problem):
    flow, x, s, u, t = problem
    found = testing.boundary_residual(lambda y, a, b: y * jnp.nan, x, t)
    assert not found <= TOL


def test_tolerance():
    assert testing.tolerance(jnp.float64) == 1e-10
    assert testing.tolerance(np.float32) == 1e-4
    assert testing.tolerance("float32") == 1e-4
    with pytest.raises(ValueError, match="No tolerance policy for dtype float16"):
        testing.tolerance(jnp.float16)


def test_checks_validate_batches(problem):
    flow, x, s, _, t = problem
    with without_runtime_typechecks():
        with pytest.raises(ValueError, match=r"`x` must be a non-empty batch"):
            testing.boundary_residual(flow.flow_map, x[0], t[0])
        with pytest.raises(ValueError, match=r"Time `t` must have shape \(64,\)"):
            testing.inverse_residual(flow.flow_map, x, s, t[:3])
        with pytest.raises(TypeError, match="`x` must be a floating array"):
            testing.boundary_residual(flow.flow_map, jnp.ones((4, 3), int), t[:4])


def test_checks_measure_in_the_precision_of_x(problem):
    """float64 times are cast to float32 `x`'s dtype instead of promoting to float64:
    the float32 residual shows float32 round-off."""
    flow, x, s, u, t = problem
    found = testing.semigroup_residual(flow.flow_map, x.astype(jnp.float32), s, u, t)
    assert TOL < found <= testing.tolerance(jnp.float32)


def test_derivative_convergence_on_a_known_function():
    primals, tangents = (jnp.array([0.3, 1.1]),), (jnp.array([1.0, -0.5]),)
    steps = np.logspace(-4, -1, 7)
    slope, errors = testing.derivative_convergence(
        jnp.sin, primals, tangents, scheme="forward", steps=steps
    )
    assert errors.shape == steps.shape
    assert abs(slope - 1) <= 0.1
    slope, _ = testing.derivative_convergence(
        jnp.sin, primals, tangents, scheme="central", steps=steps
    )
    assert abs(slope - 2) <= 0.1


def test_derivative_convergence_rejects_exact_differences():
    # cos is even: at 0 every central difference is exactly 0, the derivative too.
    with pytest.raises(ValueError, match="finite difference is exact"):
        testing.derivative_convergence(
            jnp.cos,
            (jnp.zeros(2),),
            (jnp.ones(2),),
            scheme="central",
            steps=[1e-3, 1e-2],
        )
    with pytest.raises(ValueError, match="at least two distinct positive steps"):
        testing.derivative_convergence(
            jnp.sin, (jnp.ones(2),), (jnp.ones(2),), scheme="forward", steps=[1e-3]
        )


@hypothesis.given(
    data=st.data(),
    dim=testing.dimensions(),
    bounds=st.tuples(st.floats(1e-4, 1.0), st.floats(1.0, 10.0)),
)
def test_spd_covariances(data, dim, bounds):
    low, high = bounds
    cov = data.draw(testing.spd_covariances(dim, low, high))
    assert cov.shape == (dim, dim) and cov.dtype == np.float64
    np.testing.assert_array_equal(cov, cov.T)
    eigenvalues = np.linalg.eigvalsh(cov)
    assert eigenvalues.min() >= low * (1 - 1e-9) - 1e-14
    assert eigenvalues.max() <= high * (1 + 1e-9) + 1e-14


@hypothesis.given(data=st.data(), dim=testing.dimensions(max_dim=4))
def test_means_and_gaussians(data, dim):
    mean = data.draw(testing.means(dim, dtype=np.float32))
    assert mean.shape == (dim,) and mean.dtype == np.float32
    flow = data.draw(testing.gaussians(min_dim=2, max_dim=4, dtype=np.float32))
    assert 2 <= flow.dim <= 4 and flow.mean.dtype == jnp.float32
    # Eigenvalues hold up to float32 rounding of the largest, 2.
    rounding = 10 * float(np.finfo(np.float32).eps) * 2.0
    assert not flow.singular and float(flow.eigvals.min()) >= 1e-3 - rounding
    assert data.draw(testing.gaussians(dim)).dim == dim


def test_dimensions_validate():
    with pytest.raises(ValueError, match="min_dim <= max_dim"):
        testing.dimensions(3, 2)
    with pytest.raises(ValueError, match="0 < min_eigenvalue <= max_eigenvalue"):
        testing.spd_covariances(2, 0.0)


def collect(strategy, n=300):
    """`n` draws (paired with a seed: Hypothesis skips duplicate examples)."""
    drawn = []

    @hypothesis.settings(max_examples=n, database=None)
    @hypothesis.given(strategy, testing.seeds())
    def run(value, _):
        drawn.append(value)

    run()
    return drawn


def test_times_cover_the_edges():
    drawn = np.array(collect(testing.times()))
    assert np.all((drawn >= 0) & (drawn <= 1))
    edges = np.isin(drawn, testing.EDGE_TIMES)
    assert 0.2 <= edges.mean() <= 0.8
    assert {0.0, 1.0} <= set(drawn[edges])

    interior = np.array(collect(testing.times(include_edges=False), n=100))
    assert np.all((interior >= 1e-6) & (interior <= 1 - 1e-6))


def test_time_pairs_and_triples():
    pairs = np.array(collect(testing.time_pairs()))
    assert pairs.shape[1] == 2 and np.all((pairs >= 0) & (pairs <= 1))
    # Hypothesis repeats values on purpose: s = t often, but not always.
    assert 0.05 <= np.mean(pairs[:, 0] == pairs[:, 1]) <= 0.75
    assert np.any(pairs[:, 0] < pairs[:, 1]) and np.any(pairs[:, 0] > pairs[:, 1])
    triples = np.array(collect(testing.time_triples()))
    assert triples.shape[1] == 3 and np.all((triples >= 0) & (triples <= 1))
    assert np.any(triples[:, 0] == triples[:, 1])
    assert np.any(triples[:, 1] == triples[:, 2])
