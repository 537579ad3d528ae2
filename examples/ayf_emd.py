"""Align Your Flow (Eulerian form): distilling a teacher's velocity into a flow map.

A distillation method trains against a given velocity `v(x, t)`, passed to the
loss as `teacher=`. Here the teacher is exact: the marginal velocity
`flow.velocity` of the Gaussian mixture the data comes from. AYF-EMD's update is
MeanFlow's with the teacher in place of `eps - x0` and a normalised tangent whose
derivative term is switched on gradually: the factor `r` in front of it is a
schedule of the training step, read by `method.params(step)`. We train a small MLP,
sample with one and two jumps, and compare each sample with the exact end point of
the same noise.

python examples/ayf_emd.py [--steps N]
"""

import argparse
from functools import partial

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import fmcalc
from fmcalc.flows import GaussianMixture
from fmcalc.nn import MLP


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=5000, help="training steps")
args = parser.parse_args()

# Four Gaussians on a circle of radius 2.
angles = jnp.pi / 2 * jnp.arange(4)
means = 2.0 * jnp.stack([jnp.cos(angles), jnp.sin(angles)], axis=1)
flow = GaussianMixture(jnp.full(4, 0.25), means, jnp.tile(0.1 * jnp.eye(2), (4, 1, 1)))

# The tangent warm-up over the first half of this (short) run.
warmup = fmcalc.schedules.LinearWarmup(0.0, 1.0, max(args.steps // 2, 1))
method = fmcalc.methods.get("ayf-emd", warmup=warmup)
print(method)
for step in (0, args.steps // 4, args.steps // 2):
    print(f"step {step}: r = {float(method.params(step)['r']):.2f}")

model = MLP(2, width=128, depth=3, time_features=16, key=jax.random.key(0))
optim = optax.adam(optax.cosine_decay_schedule(2e-3, args.steps))
opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))


@eqx.filter_jit
def train_step(model, opt_state, key, step):
    k_data, k_batch = jax.random.split(key)
    batch = method.batch(k_batch, flow.sample(k_data, 256))
    grad_fn = eqx.filter_value_and_grad(method.loss, has_aux=True)
    _, grads = grad_fn(model, batch, teacher=flow.velocity, step=step)
    updates, opt_state = optim.update(grads, opt_state)
    return eqx.apply_updates(model, updates), opt_state


key = jax.random.key(1)
for step in range(args.steps):
    # The step goes in as an array: a Python int would recompile every step.
    step_key = jax.random.fold_in(key, step)
    model, opt_state = train_step(model, opt_state, step_key, jnp.asarray(step))

# Paired error: the same noise through the learned map and through the exact one.
eps = jax.random.normal(jax.random.key(2), (1000, 2))
exact = jax.jit(jax.vmap(lambda e: flow.flow_map(e, 1.0, 0.0)))(eps)
for jumps in (1, 2):
    x0 = jax.vmap(partial(fmcalc.sample, model, steps=jumps))(eps)
    error = jnp.mean(jnp.linalg.norm(x0 - exact, axis=1))
    print(f"{jumps}-step paired error: {float(error):.3f} (modes at radius 2)")
