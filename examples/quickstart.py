"""A first tour: build MeanFlow from primitives, check it on an exact flow, cost it,
train it.

python examples/quickstart.py [--steps N] [--figure PATH]
"""

import argparse

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib

import fmcalc
from fmcalc import D, Network, S as s, T as t, X as x, sg
from fmcalc.flows import Gaussian
from fmcalc.nn import MLP
from fmcalc.testing import check_unbiased, perturbed
from fmcalc.train import Evaluation, Options


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=2000, help="training steps")
parser.add_argument("--figure", default="quickstart.png", help="the figure's path")
args = parser.parse_args()

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

# Train it. A method is the residual with the times its rows are drawn at.
times = fmcalc.SortedPair(fmcalc.LogitNormal(-0.4, 1.0), equal_fraction=0.75)
method = fmcalc.Method(
    "my-meanflow", "eulerian", "marginal-from-conditional", "V",
    (fmcalc.Term("meanflow", meanflow, times),),
)  # fmt: skip
noise = jax.random.normal(jax.random.key(3), (1000, 2))
exact = jax.vmap(lambda e: flow.flow_map(e, 1.0, 0.0))(noise)  # closed form


def paired_error(samples) -> float:
    """Mean distance of each sample to the exact end point of its own noise."""
    return float(jnp.mean(jnp.linalg.norm(samples - exact, axis=1)))


def evaluate(state):
    one_jump = jax.vmap(lambda e: fmcalc.sample(state.ema, e))(noise)
    return {"1-step": paired_error(one_jump)}


def train(method, **options):
    return fmcalc.train.fit(
        method, net, flow.sample, key=jax.random.key(4), steps=args.steps,
        batch_size=256, **options,
    )  # fmt: skip


result = train(
    method,
    options=Options(evaluation=Evaluation(evaluate, every=max(args.steps // 4, 1))),
)
for step, errors in result.evaluations:
    print(f"step {step}: 1-step paired error {errors['1-step']:.3f}")
one_jump = jax.vmap(lambda e: fmcalc.sample(result.ema, e))(noise)
baseline = fmcalc.model_velocity(train(fmcalc.methods.get("flow-matching")).ema)
euler = jax.vmap(lambda e: fmcalc.sample_euler(baseline, e, steps=1))(noise)
euler128 = jax.vmap(lambda e: fmcalc.sample_euler(baseline, e, steps=128))(noise)
print(
    f"1-step paired error: meanflow {paired_error(one_jump):.3f} | flow matching "
    f"{paired_error(euler):.3f} (1 Euler step), {paired_error(euler128):.3f} (128)"
)
panels = {
    "exact map": exact,
    "meanflow, 1 jump": one_jump,
    "flow matching, 1 step": euler,
}
fig, axes = plt.subplots(1, 3, figsize=(9, 3.2), sharex=True, sharey=True)
for ax, (title, points) in zip(axes, panels.items(), strict=True):
    ax.scatter(points[:, 0], points[:, 1], s=2, alpha=0.5)
    ax.set_title(title, fontsize=9)
    ax.set_aspect("equal")
fig.tight_layout()
fig.savefig(args.figure, dpi=100)
print(f"figure: {args.figure}")
