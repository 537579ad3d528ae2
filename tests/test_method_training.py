"""Every registered method trains: 300 Adam steps of a small MLP on a 2-D Gaussian
mixture stay finite and make progress.

Each method gets everything it may call: the mixture's exact velocity as `teacher`,
an exponential moving average of the model as `ema`, and the mixture itself (whose
call is the exact average velocity) as the flow map `aux`; the training step drives
the curricula. The whole run is one jitted `lax.scan`, so each method compiles once.

**What "makes progress" means.** The training loss is not a common yardstick: the
adaptive weights of MeanFlow and iMF normalise it to about 1 whatever the fit; the
targets of SoFlow and MeanFlow multiply the network's derivatives by the noisy
`eps - x0`, so their loss at the exact map (about 50 for SoFlow's Eulerian term here)
lies far above its value at initialisation; self-consistency terms start near 0 and
grow as the anchor teaches the network a velocity. Two deterministic measures are
taken at initialisation and after training, both on one fixed held-out batch drawn by
the method's own `batch` (so its time sampler decides where it is judged: `t = 0`
for consistency models, `s = 1` for PID and FreeFlow):

- the **distance to the exact map**, the mean of `‖V(x_s, s, t) - V*(x_s, s, t)‖²`
  with `V*` the mixture's average velocity from an ODE solve, which every method
  aims to lower;
- the method's **held-out loss**, with the model itself in the `ema` slot so that it
  is a function of the parameters alone, and its schedules at the final step in both
  evaluations.

A method passes if either measure ends below `PROGRESS` times its initial value
(slow learners such as CTM, whose teacher covers a tenth of each jump, move the map
little in 300 steps but do lower their own loss) and the distance to the exact map
has not grown beyond `RUNAWAY` times its initial value.
"""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fmcalc
from fmcalc.flows import GaussianMixture
from fmcalc.nn import MLP


STEPS = 300
BATCH = 64
HELD_OUT = 256
WINDOW = 30
# A fast average suits 300 steps; the online model under a stop-gradient is no
# substitute (consistency distillation then drifts away from the exact map).
EMA_DECAY = 0.99
PROGRESS = 0.9
RUNAWAY = 1.25
OPTIMISER = optax.adam(1e-3)


def _mixture() -> GaussianMixture:
    """Three well-separated, anisotropic components in float32.

    The solve behind `V*` (and behind CTM's and PFMM's `aux`) runs at a tolerance far
    below the distances measured; `aux` is only called under a stop-gradient on data
    inputs, so reverse mode through the solve suffices.
    """
    dtype = jnp.float32
    weights = jnp.array([0.3, 0.3, 0.4], dtype)
    means = jnp.array([[-2.0, -1.0], [2.0, -1.0], [0.0, 2.0]], dtype)
    covs = jnp.array(
        [
            [[0.3, 0.1], [0.1, 0.2]],
            [[0.2, -0.05], [-0.05, 0.3]],
            [[0.4, 0.0], [0.0, 0.1]],
        ],
        dtype,
    )
    return GaussianMixture(
        weights,
        means,
        covs,
        rtol=1e-4,
        atol=1e-4,
        adjoint=diffrax.RecursiveCheckpointAdjoint(),
    )


@eqx.filter_jit
def _exact_velocity(flow, batch):
    return jax.vmap(flow)(batch.x, batch.s, batch.t)


@eqx.filter_jit
def _train(method, flow, model, held_out, exact, key):
    """`STEPS` steps of Adam from `model`; returns the training losses and the
    (held-out loss, distance to the exact map) before and after."""
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss(params, ema, batch, step):
        return method.loss(
            eqx.combine(params, static),
            batch,
            teacher=flow.velocity,
            ema=eqx.combine(ema, static),
            aux=flow,
            step=step,
        )

    def measure(params):
        model = eqx.combine(params, static)
        predicted = jax.vmap(model)(held_out.x, held_out.s, held_out.t)
        distance = jnp.mean(jnp.sum((predicted - exact) ** 2, axis=-1))
        return loss(params, params, held_out, STEPS)[0], distance

    def step(carry, inputs):
        params, ema, state = carry
        i, key = inputs
        k_data, k_batch = jax.random.split(key)
        batch = method.batch(k_batch, flow.sample(k_data, BATCH))
        (value, _), grads = jax.value_and_grad(loss, has_aux=True)(
            params, ema, batch, i
        )
        updates, state = OPTIMISER.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        ema = fmcalc.ema_update(ema, params, EMA_DECAY)
        return (params, ema, state), value

    before = measure(params)
    carry = (params, params, OPTIMISER.init(params))
    inputs = (jnp.arange(STEPS), jax.random.split(key, STEPS))
    (params, _, _), losses = jax.lax.scan(step, carry, inputs)
    return losses, before, measure(params)


@pytest.mark.slow
@pytest.mark.parametrize("name", fmcalc.methods.names())
def test_method_trains(name):
    method = fmcalc.methods.get(name)
    flow = _mixture()
    k_model, k_data, k_batch, k_train = jax.random.split(jax.random.key(0), 4)
    model = MLP(2, width=64, depth=2, dtype=jnp.float32, key=k_model)
    held_out = method.batch(k_batch, flow.sample(k_data, HELD_OUT))
    exact = _exact_velocity(flow, held_out)
    losses, before, after = _train(method, flow, model, held_out, exact, k_train)
    losses = np.asarray(losses)
    (loss0, distance0), (loss1, distance1) = [
        tuple(map(float, m)) for m in (before, after)
    ]

    bad = np.flatnonzero(~np.isfinite(losses))
    assert bad.size == 0, f"{name}: non-finite training loss from step {bad[0]}."
    ratios = {
        "distance to the exact map": distance1 / distance0,
        "held-out loss": loss1 / loss0,
    }
    report = (
        f"{name}: distance to the exact map {distance0:.4g} -> {distance1:.4g}, "
        f"held-out loss {loss0:.4g} -> {loss1:.4g}, mean training loss over the "
        f"first/last {WINDOW} steps {losses[:WINDOW].mean():.4g} -> "
        f"{losses[-WINDOW:].mean():.4g}."
    )
    assert np.isfinite(list(ratios.values())).all(), report
    assert min(ratios.values()) < PROGRESS, f"no progress; {report}"
    assert ratios["distance to the exact map"] < RUNAWAY, f"runs away; {report}"
