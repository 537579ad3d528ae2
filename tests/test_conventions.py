"""Conventions, converters between parameterisations, networks and EMA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_batch, random_gaussian, residuals

import fmcalc
from fmcalc import Analytic, Network, S, T, X
from fmcalc.testing import perturbed


def _point(flow, key=0):
    batch = random_batch(jax.random.PRNGKey(key), flow, 1)
    return batch.x[0], batch.s[0], batch.t[0]


def test_interpolate_is_batch_polymorphic():
    x0, eps = jnp.ones((3, 2)), jnp.zeros((3, 2))
    t = jnp.array([0.0, 0.5, 1.0])
    np.testing.assert_allclose(fmcalc.interpolate(x0, eps, t)[:, 0], [1.0, 0.5, 0.0])
    np.testing.assert_allclose(fmcalc.interpolate(x0[0], eps[0], 0.25), [0.75, 0.75])


@pytest.mark.slow
def test_parameterisation_round_trips():
    flow = random_gaussian(jax.random.PRNGKey(0), 4)
    x, s, t = _point(flow)
    V = flow.average_velocity(x, s, t)
    F = flow.flow_map(x, s, t)
    np.testing.assert_allclose(fmcalc.flow_map_from_average_velocity(x, s, t, V), F)
    np.testing.assert_allclose(fmcalc.average_velocity_from_flow_map(x, s, t, F), V)
    x_hat = fmcalc.denoised_from_average_velocity(x, s, V)
    np.testing.assert_allclose(fmcalc.average_velocity_from_denoised(x, s, x_hat), V)
    np.testing.assert_allclose(fmcalc.flow_map_from_denoised(x, s, t, x_hat), F)


@pytest.mark.slow
def test_denoiser_and_score_of_a_gaussian():
    """x0_hat = E[x0 | x_t] and the score -C_t^{-1}(x - m_t) in closed form."""
    flow = random_gaussian(jax.random.PRNGKey(1), 3)
    x, t, _ = _point(flow)
    cov = (flow.eigvecs * flow.eigvals[None, :]) @ flow.eigvecs.T
    c_t = (1 - t) ** 2 * cov + t**2 * jnp.eye(3)
    m_t = (1 - t) * flow.mean
    score = -jnp.linalg.solve(c_t, x - m_t)
    # E[x0 | x_t] = mean + (1 - t) cov C_t^{-1} (x - m_t).
    x0_hat = flow.mean + (1 - t) * cov @ jnp.linalg.solve(c_t, x - m_t)
    v = flow.velocity(x, t)
    np.testing.assert_allclose(fmcalc.denoiser_from_velocity(x, t, v), x0_hat)
    np.testing.assert_allclose(fmcalc.velocity_from_denoiser(x, t, x0_hat), v)
    np.testing.assert_allclose(fmcalc.score_from_velocity(x, t, v), score)
    np.testing.assert_allclose(fmcalc.velocity_from_score(x, t, score), v)


@pytest.mark.slow
def test_analytic_velocity_source():
    flow = random_gaussian(jax.random.PRNGKey(2), 4)
    batch = random_batch(jax.random.PRNGKey(3), flow, 32)
    expr = fmcalc.lagrangian(velocity=Analytic(flow))
    assert float(jnp.max(jnp.abs(residuals(expr, batch, model=flow)))) <= 1e-10
    assert "v*(sg[F(x, s, t)], t)" in str(expr)


def test_ema_update_is_a_moving_average():
    flow = random_gaussian(jax.random.PRNGKey(4), 2)
    other = random_gaussian(jax.random.PRNGKey(5), 2)
    averaged = fmcalc.ema_update(flow, other, 0.9)
    np.testing.assert_allclose(averaged.mean, 0.9 * flow.mean + 0.1 * other.mean)
    assert averaged.singular == flow.singular


@pytest.mark.slow
def test_ema_network_in_the_target_gets_no_gradient():
    """With an EMA network in the target, the loss uses the EMA parameters there and
    the gradient flows only through the online prediction."""
    flow = random_gaussian(jax.random.PRNGKey(6), 3)
    batch = random_batch(jax.random.PRNGKey(7), flow, 16)
    model = perturbed(flow, 3, key=jax.random.PRNGKey(8))
    ema = perturbed(flow, 3, key=jax.random.PRNGKey(9))
    expr = fmcalc.compositional(target_network=Network("ema"))
    assert "V_ema(x, s, s + 0.5 * (t - s))" in str(expr)

    def loss(m, e):
        return fmcalc.residual_loss(expr, m, batch, ema=e)

    grads = jax.grad(lambda m, e: loss(m, e), argnums=(0, 1))(model, ema)
    assert float(jnp.abs(grads[1].A).max()) == 0.0
    assert float(jnp.abs(grads[0].A).max()) > 0.0
    by_hand = residuals(
        fmcalc.compositional(), batch, model=model
    )  # the online target differs from the EMA one
    with_ema = residuals(expr, batch, model=model, ema=ema)
    assert float(jnp.abs(by_hand - with_ema).max()) > 1e-3
    online_in_target = residuals(
        fmcalc.compositional(target_network=Network("ema")),
        batch,
        model=model,
        ema=model,
    )
    np.testing.assert_allclose(online_in_target, by_hand, atol=1e-12)


def test_leaves_and_flow_map_expressions():
    V = Network()
    F = fmcalc.FlowMap(V)
    assert str(F(X, S, T)) == "F(x, s, t)"
    assert F(X, S, T).key == (X + (T - S) * V(X, S, T)).key
