"""Measured cost of residuals built from primitives: the compiled program against
the static estimate read off the expression tree."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest

import fmcalc
from fmcalc import Diagonal
from fmcalc.cost import estimate, forward_pass_equivalents
from fmcalc.nn import MLP, Transformer


BATCH = 16


@functools.cache
def _models():
    return {
        "mlp": MLP(16, width=256, depth=4, time_features=32, dtype=jnp.float32,
                   key=jr.key(0)),
        "transformer": Transformer(64, patch_size=2, width=128, depth=2, heads=4,
                                   time_features=64, dtype=jnp.float32,
                                   key=jr.key(0)),
    }  # fmt: skip


def _batch(dim):
    keys = jr.split(jr.key(1), 5)
    x0 = jr.normal(keys[0], (BATCH, dim), jnp.float32)
    eps = jr.normal(keys[1], (BATCH, dim), jnp.float32)
    times = jnp.sort(jr.uniform(keys[2], (BATCH, 2), jnp.float32), axis=1)
    return fmcalc.Batch(x0, eps, times[:, 1], times[:, 0])


def _step(residual, model, batch):
    # The teacher has its own weights: a copy of the model, closed over.
    teacher = jax.tree.map(lambda a: a, model)
    return eqx.filter_value_and_grad(
        lambda m: fmcalc.residual_loss(
            residual, m, batch, teacher=lambda x, t: teacher(x, t, t)
        )
    )(model)


def _forward(model, batch):
    return jax.vmap(model)(batch.x, batch.s, batch.t)


RESIDUALS = {
    "flow-matching": (fmcalc.flow_matching(), {"mlp": 3.1, "transformer": 3.1}),
    "meanflow": (fmcalc.meanflow(), {"mlp": 4.1, "transformer": 4.3}),
    "shortcut": (fmcalc.compositional(), {"mlp": 5.1, "transformer": 5.1}),
    "lsd": (
        fmcalc.lagrangian(form="F", velocity=Diagonal()),
        {"mlp": 7.3, "transformer": 7.5},
    ),
    # Two JVPs at one point, one under a stop-gradient (ESD's residual): the
    # stopped lane must not be backpropagated.
    "esd": (
        fmcalc.eulerian(form="F", stop_gradient="spatial", velocity=Diagonal()),
        {"mlp": 8.3, "transformer": 8.5},
    ),
    # A teacher whose input carries the gradient: an input-only backward (1 FPE).
    "lmd": (
        fmcalc.lagrangian(form="F", stop_gradient="none"),
        {"mlp": 8.3, "transformer": 8.5},
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["mlp", "transformer"])
@pytest.mark.parametrize("name", sorted(RESIDUALS))
def test_measured_cost_matches_estimate(name, model_name):
    residual, bound = RESIDUALS[name]
    model = _models()[model_name]
    batch = _batch(16 if model_name == "mlp" else 64)
    measured = forward_pass_equivalents(
        _step, (residual, model, batch), forward=_forward, forward_args=(model, batch)
    )
    static = estimate(residual).total
    assert measured <= bound[model_name]
    assert abs(measured - static) <= 0.5, (measured, static)
    if name == "lsd":
        assert abs(measured - 7) <= 0.5
