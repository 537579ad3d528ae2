"""A first tour: build MeanFlow from primitives, check it on an exact flow, cost it.

python examples/quickstart.py
"""

import equinox as eqx
import jax
import jax.numpy as jnp

import fmcalc
from fmcalc import D, Network, S as s, T as t, X as x, sg
from fmcalc.flows import Gaussian
from fmcalc.nn import MLP
from fmcalc.testing import check_unbiased, perturbed


V = Network()
v = fmcalc.ConditionalVelocity()
meanflow = V(x, s, t) - sg(
    v(x, s) + (t - s) * D(V, at=(x, s, t), along=(v(x, s), 1, 0))
)
print("residual:", meanflow)
print("static cost:", fmcalc.cost.estimate(meanflow).total, "forward-pass equivalents")

# The exact flow of Gaussian data is a model whose MeanFlow residual vanishes.
flow = Gaussian(jnp.array([1.0, -1.0]), jnp.array([[1.0, 0.5], [0.5, 0.8]]))
key = jax.random.PRNGKey(0)
k_data, k_noise, k_times = jax.random.split(key, 3)
x0 = flow.sample(k_data, 512)
eps = jax.random.normal(k_noise, x0.shape)
times = jnp.sort(jax.random.uniform(k_times, (512, 2)), axis=1)
batch = fmcalc.Batch(x0, eps, s=times[:, 1], t=times[:, 0])
teacher_form = fmcalc.meanflow(velocity=fmcalc.Teacher())
print(
    "residual loss of the exact map (teacher velocity):",
    float(fmcalc.residual_loss(teacher_form, flow, batch, teacher=flow.velocity)),
)

# eps - x0 in place of the marginal velocity: unbiased for MeanFlow...
model = perturbed(flow, 2, key=jax.random.PRNGKey(1))
print("MeanFlow with eps - x0:", check_unbiased(meanflow, model, flow, key=key))
# ...but not for a Lagrangian target, which needs the velocity at F(x_s, s, t).
lagrangian = fmcalc.lagrangian(velocity=fmcalc.Teacher())
print("Lagrangian with eps - x0:", check_unbiased(lagrangian, model, flow, key=key))

# Measured cost of one training step on a small MLP.
net = MLP(2, width=128, depth=3, key=jax.random.PRNGKey(2))


def step(net, batch):
    return eqx.filter_value_and_grad(
        lambda m: fmcalc.residual_loss(meanflow, m, batch)
    )(net)


def forward(net, batch):
    return jax.vmap(net)(batch.x, batch.s, batch.t)


fpe = fmcalc.cost.forward_pass_equivalents(
    step, (net, batch), forward=forward, forward_args=(net, batch)
)
print(f"measured cost: {fpe:.2f} forward-pass equivalents")
