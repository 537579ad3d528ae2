"""A Flax network trained with fmcalc's losses: `fmcalc.nn.from_flax`.

Most JAX diffusion code is written with Flax. `from_flax` turns an NNX module (or a
Linen module with its variables) into an fmcalc model: called per example as
`model(x, s, t)`, its `nnx.Param`s are arrays that `fmcalc.train.fit`, EMAs and
checkpoints handle like any other, and `model.to_flax()` gives the trained network
back. We train an NNX MLP with Lagrangian self-distillation on a 2-d Gaussian
mixture, and the same network with flow matching as the baseline, and compare their
samples with the exact end points of the same noise.

python examples/flax_model.py [--steps N] [--figure PATH]
"""

import argparse

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib
import optax
from flax import nnx

import fmcalc
from fmcalc.flows import GaussianMixture
from fmcalc.train import Evaluation, Options


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=5000, help="training steps")
parser.add_argument("--figure", default="flax_model.png", help="the figure's path")
args = parser.parse_args()

# Four Gaussians on a circle of radius 2.
angles = jnp.pi / 2 * jnp.arange(4)
means = 2.0 * jnp.stack([jnp.cos(angles), jnp.sin(angles)], axis=1)
flow = GaussianMixture(jnp.full(4, 0.25), means, jnp.tile(0.1 * jnp.eye(2), (4, 1, 1)))


class AverageVelocity(nnx.Module):
    """A batched NNX MLP `V(x, s, t)`: the input and sinusoidal features of both
    times, three SiLU layers."""

    def __init__(self, dim: int, width: int, *, rngs: nnx.Rngs):
        self.frequencies = jnp.geomspace(1.0, 100.0, 8)
        self.layers = nnx.List(
            [
                nnx.Linear(dim + 32, width, rngs=rngs),
                nnx.Linear(width, width, rngs=rngs),
                nnx.Linear(width, width, rngs=rngs),
            ]
        )
        self.out = nnx.Linear(width, dim, rngs=rngs)

    def __call__(self, x, s, t):
        times = jnp.concatenate([s[:, None], t[:, None]], axis=1)
        angles = (times[..., None] * self.frequencies[None, None]).reshape(len(x), -1)
        h = jnp.concatenate([x, jnp.cos(angles), jnp.sin(angles)], axis=1)
        for layer in self.layers:
            h = nnx.silu(layer(h))
        return self.out(h)


method = fmcalc.methods.get("lsd")
print(method)

# Paired error: the same noise through a learned sampler and through the exact map.
noise = jax.random.normal(jax.random.key(2), (1000, 2))
exact = jax.jit(jax.vmap(lambda e: flow.flow_map(e, 1.0, 0.0)))(noise)


@eqx.filter_jit
def draw(model, steps):
    return jax.vmap(lambda e: fmcalc.sample(model, e, steps=steps))(noise)


def paired_error(samples) -> float:
    return float(jnp.mean(jnp.linalg.norm(samples - exact, axis=1)))


def evaluate(state):
    """Called by `fit` during training: the EMA's paired errors so far."""
    return {f"{k}-step": paired_error(draw(state.ema, k)) for k in (1, 2)}


def train(method, **options):
    model = fmcalc.nn.from_flax(AverageVelocity(2, 128, rngs=nnx.Rngs(0)))
    return fmcalc.train.fit(
        method,
        model,
        flow.sample,
        key=jax.random.key(1),
        steps=args.steps,
        batch_size=256,
        optimizer=optax.adam(optax.cosine_decay_schedule(2e-3, args.steps)),
        **options,
    )


result = train(
    method,
    options=Options(evaluation=Evaluation(evaluate, every=max(args.steps // 4, 1))),
)
for step, errors in result.evaluations:
    print(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in errors.items()))
trained = result.ema.to_flax()  # an AverageVelocity again, with the EMA's weights
print("back in Flax:", type(trained).__name__)
baseline = fmcalc.model_velocity(train(fmcalc.methods.get("flow-matching")).ema)

samples = {k: draw(result.ema, k) for k in (1, 2)}
euler = {
    k: jax.vmap(lambda e, k=k: fmcalc.sample_euler(baseline, e, steps=k))(noise)
    for k in (1, 2, 128)
}
print("paired error (modes at radius 2): steps | lsd | flow matching (Euler)")
for k in (1, 2, 128):
    own = f"{paired_error(samples[k]):.3f}" if k in samples else "-"
    print(f"{k}-step paired error: {own} | {paired_error(euler[k]):.3f}")

panels = {
    "exact map": exact,
    "lsd (Flax), 1 jump": samples[1],
    "lsd (Flax), 2 jumps": samples[2],
    "flow matching, 2 Euler steps": euler[2],
}
fig, axes = plt.subplots(1, len(panels), figsize=(12, 3.2), sharex=True, sharey=True)
for ax, (title, x) in zip(axes, panels.items(), strict=True):
    ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.5)
    ax.set_title(title, fontsize=9)
    ax.set_aspect("equal")
fig.tight_layout()
fig.savefig(args.figure, dpi=100)
print(f"figure: {args.figure}")
