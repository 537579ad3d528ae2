"""Bad input gets a clear error that names the value and what would be right."""

import jax
import jax.numpy as jnp
import pytest
from helpers import random_batch, random_gaussian

import fmcalc
from fmcalc import (
    JVP,
    ConditionalVelocity,
    D,
    FiniteDifference,
    FlowMap,
    Network,
    S,
    T,
    Teacher,
    U,
    X,
    sg,
)
from fmcalc.flows import Gaussian


V = Network()
F = FlowMap(V)
v_c = ConditionalVelocity()


@pytest.fixture(scope="module")
def flow():
    return random_gaussian(jax.random.PRNGKey(0), 3)


def _example(flow):
    batch = random_batch(jax.random.PRNGKey(1), flow, 4)
    return jax.tree.map(lambda a: a[0], batch)


# Batches -----------------------------------------------------------------------


def test_batch_shape_mismatch():
    with pytest.raises(ValueError, match=r"same shape; got \(4, 3\) and \(4, 2\)"):
        fmcalc.Batch(jnp.zeros((4, 3)), jnp.zeros((4, 2)), jnp.zeros(4), jnp.zeros(4))


def test_batch_time_shape():
    with pytest.raises(ValueError, match=r"batch shape \(4,\).*got shape \(4, 1\)"):
        fmcalc.Batch(
            jnp.zeros((4, 3)), jnp.zeros((4, 3)), jnp.zeros((4, 1)), jnp.zeros(4)
        )


def test_batch_times_outside_unit_interval():
    with pytest.raises(ValueError, match=r"`t` must lie in \[0, 1\].*1\.5"):
        fmcalc.Batch(
            jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.ones(2), jnp.array([0.5, 1.5])
        )


def test_batch_integer_data():
    with pytest.raises(TypeError, match="`x0` must be a floating array; got int"):
        fmcalc.Batch(
            jnp.zeros((2, 3), int), jnp.zeros((2, 3), int), jnp.ones(2), jnp.ones(2)
        )


# Analytic flows ----------------------------------------------------------------


def test_gaussian_cov_shape():
    with pytest.raises(ValueError, match=r"`cov` must have shape \(3, 3\).*\(2, 2\)"):
        Gaussian(jnp.zeros(3), jnp.eye(2))


def test_gaussian_non_symmetric():
    with pytest.raises(ValueError, match="must be symmetric"):
        Gaussian(jnp.zeros(2), jnp.array([[1.0, 0.5], [0.0, 1.0]]))


def test_gaussian_not_psd():
    with pytest.raises(ValueError, match="positive semi-definite.*-1"):
        Gaussian(jnp.zeros(2), jnp.diag(jnp.array([1.0, -1.0])))


def test_point_mass_from_s_zero():
    point = Gaussian(jnp.ones(2), jnp.zeros((2, 2)))
    flow_map = jax.jit(lambda x, s, t: point.flow_map(x, s, t))
    with pytest.raises(Exception, match="singular covariance.*s = 0"):
        flow_map(jnp.ones(2), 0.0, 0.5).block_until_ready()


def test_gaussian_wrong_point_shape(flow):
    with pytest.raises(ValueError, match=r"one example of shape \(3,\).*\(2,\)"):
        flow.velocity(jnp.zeros(2), 0.5)


# Derivative strategies ---------------------------------------------------------


def test_unknown_scheme():
    with pytest.raises(ValueError, match="Unknown finite-difference scheme 'backward'"):
        FiniteDifference(1e-3, "backward")  # pyright: ignore[reportArgumentType]


def test_non_positive_step():
    with pytest.raises(ValueError, match="finite positive number.*got -0.1"):
        FiniteDifference(-0.1)


def test_step_below_dtype_resolution(flow):
    flow32 = Gaussian(flow.mean.astype(jnp.float32), jnp.eye(3, dtype=jnp.float32))
    batch = random_batch(jax.random.PRNGKey(2), flow32, 4)
    batch = jax.tree.map(lambda a: a.astype(jnp.float32), batch)
    expr = fmcalc.meanflow(derivative=FiniteDifference(1e-9), velocity=Teacher())
    with pytest.raises(
        ValueError, match="step 1e-09 is at or below the resolution of float32"
    ):
        fmcalc.residual_loss(expr, flow32, batch, teacher=flow32.velocity)


def test_unknown_derivative_strategy():
    # Under the test suite's jaxtyping hook the annotation check answers first.
    with pytest.raises(
        TypeError, match="`by` must be a derivative strategy|parameter 'by'"
    ):
        D(V, at=(X, S, T), along=(0, 1, 0), by="jvp")  # pyright: ignore[reportArgumentType]


# Builders and strategy names ---------------------------------------------------


def test_unknown_form():
    with pytest.raises(ValueError, match="Unknown form 'G'; expected one of"):
        fmcalc.eulerian(form="G")  # pyright: ignore[reportArgumentType]


def test_unknown_stop_gradient_placement():
    with pytest.raises(ValueError, match="Unknown stop_gradient.*'full'"):
        fmcalc.lagrangian(stop_gradient="full")  # pyright: ignore[reportArgumentType]


def test_unknown_network_role():
    with pytest.raises(ValueError, match="Unknown network role 'teacher'"):
        Network("teacher")


def test_fraction_outside_unit_interval():
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\); got 1.5"):
        fmcalc.compositional(u=1.5)


def test_ema_decay_out_of_range(flow):
    with pytest.raises(ValueError, match=r"decay` must lie in \[0, 1\]; got 1.5"):
        fmcalc.ema_update(flow, flow, 1.5)


# Invalid expression trees ------------------------------------------------------


def test_vector_plus_time():
    with pytest.raises(TypeError, match="Cannot add a vector .*`x`.* and a time"):
        X + S


def test_arguments_in_wrong_order():
    with pytest.raises(TypeError, match="first argument of V.*must be a vector"):
        V(S, X, T)


def test_divide_by_vector():
    with pytest.raises(TypeError, match="Can only divide by a time"):
        S / X


def test_non_numeric_leaf():
    with pytest.raises(TypeError, match="Cannot use 'x'"):
        V(X, S, T) + "x"  # pyright: ignore[reportOperatorIssue]


def test_derivative_point_arity():
    with pytest.raises(ValueError, match="three entries"):
        D(V, at=(X, S), along=(0, 1, 0))


def test_conditional_velocity_away_from_x_s():
    with pytest.raises(ValueError, match=r"called at \(F\(x, s, t\), t\).*biased"):
        v_c(F(X, S, T), T)


def test_conditional_velocity_squared():
    with pytest.raises(ValueError, match="non-linear in the conditional velocity"):
        fmcalc.validate(V(X, S, T) - sg(v_c(X, S) * v_c(X, S)))


def test_conditional_velocity_through_network():
    with pytest.raises(ValueError, match="evaluates a network at a point that depends"):
        fmcalc.validate(V(X, S, T) - sg(V(X + v_c(X, S), S, T)))


def test_conditional_velocity_outside_stop_gradient():
    with pytest.raises(ValueError, match="not under a stop-gradient"):
        fmcalc.eulerian(stop_gradient="none", velocity=v_c)


def test_conditional_velocity_times_prediction():
    with pytest.raises(ValueError, match="multiplies a term that carries gradient"):
        fmcalc.validate(V(X, S, T) * v_c(X, S))


def test_conditional_velocity_finite_difference():
    with pytest.raises(ValueError, match="finite difference along the conditional"):
        fmcalc.meanflow(derivative=FiniteDifference(1e-3))


def test_residual_must_be_a_vector():
    with pytest.raises(TypeError, match="must be a vector shaped like x"):
        fmcalc.validate(T - S)


def test_jvp_tangent_from_own_primal(flow):
    expr = D(V, at=(X, S, T), along=(V(X, S, T), 1, 0), by=JVP())
    with pytest.raises(ValueError, match="depends on its own primal"):
        fmcalc.evaluate(expr, _example(flow), model=flow)


def test_missing_teacher(flow):
    with pytest.raises(ValueError, match="`teacher=None`"):
        fmcalc.evaluate(fmcalc.lagrangian(), _example(flow), model=flow)


def test_missing_network(flow):
    expr = fmcalc.meanflow(target_network=Network("ema"))
    with pytest.raises(ValueError, match="role 'ema', but none was passed"):
        fmcalc.evaluate(expr, _example(flow), model=flow)


def test_missing_intermediate_time(flow):
    batch = random_batch(jax.random.PRNGKey(1), flow, 4, with_u=False)
    with pytest.raises(ValueError, match="uses the time `u`"):
        fmcalc.residual_loss(fmcalc.compositional(u=U), flow, batch)


def test_evaluate_takes_one_example(flow):
    batch = random_batch(jax.random.PRNGKey(1), flow, 4)
    with pytest.raises(ValueError, match="acts on one example"):
        fmcalc.evaluate(fmcalc.meanflow(), batch, model=flow)
