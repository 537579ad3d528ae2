"""A new method from primitives: MeanFlow with a central finite difference and an
EMA network in the target.

Along MeanFlow's tangent `eps - x0` a finite difference evaluates the network at
`x + h (eps - x0)`, non-linear in the noise: biased, and the validator says so. The
new method takes its tangent from the EMA's velocity `V_ema(x, s, s)` (so it is
self-distillation, with a flow-matching anchor), passes the fixed-point check on an
exact Gaussian flow, and trains with `fmcalc.train.fit`; its paired errors stand
beside flow matching's with the same budget.

python examples/new_method.py [--steps N] [--figure PATH]
"""

import argparse

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib

import fmcalc
from fmcalc import D, Diagonal, Network, S as s, T as t, Term, X as x, sg
from fmcalc.flows import Gaussian
from fmcalc.nn import MLP
from fmcalc.testing import check_fixed_point
from fmcalc.train import EMA, Evaluation, Options


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


jax.config.update("jax_enable_x64", True)
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=2000, help="training steps")
parser.add_argument("--figure", default="new_method.png", help="the figure's path")
args = parser.parse_args()

V, v_c = Network(), fmcalc.ConditionalVelocity()(x, s)
central = fmcalc.FiniteDifference(1e-4, "central")
times = fmcalc.SortedPair(fmcalc.LogitNormal(-0.4, 1.0))


def meanflow(v):
    """MeanFlow's residual with the tangent `v` and a central difference."""
    dV = D(V, at=(x, s, t), along=(v, 1, 0), by=central)
    return V(x, s, t) - sg(v + (t - s) * dV)


# First attempt: MeanFlow's own tangent, `eps - x0`.
try:
    fmcalc.Method("naive", "eulerian", "marginal-from-conditional", "V",
                  (Term("eulerian", meanflow(v_c), times),))  # fmt: skip
except ValueError as error:
    print(f"rejected: {error}\n")
# (`Term(..., biased="why")` accepts it knowingly, as SoFlow's spec does.)

# The tangent is the EMA's velocity. Differentiating the EMA too, `D(V_ema, ...)`,
# passes the same check but diverged here: a lagging copy inside a derivative.
anchor = Term("anchor", V(x, s, s) - v_c, fmcalc.Equal(fmcalc.Uniform()))
eulerian = Term("eulerian", meanflow(Diagonal(Network("ema"))(x, s)), times)
method = fmcalc.Method(
    "meanflow-fd-ema", "eulerian", "self-distillation", "V", (anchor, eulerian),
    split=(0.75, 0.25),
)  # fmt: skip
print(method)

# At the exact map, the EMA is the exact map too.
flow = Gaussian(jnp.array([1.0, -1.0]), jnp.array([[1.0, 0.5], [0.5, 0.8]]))
result = check_fixed_point(method, flow, key=jax.random.key(0), ema=flow)
print(f"fixed point of the exact Gaussian map:\n{result}")
assert result.passed

model = MLP(2, width=128, depth=3, time_features=16, key=jax.random.key(1))
batch = method.batch(jax.random.key(2), flow.sample(jax.random.key(3), 64))
measured = fmcalc.cost.forward_pass_equivalents(
    eqx.filter_value_and_grad(lambda m, b: method.loss(m, b, ema=model)[0]),
    (model, batch),
    forward=lambda m, b: jax.vmap(m)(b.x, b.s, b.t),
    forward_args=(model, batch),
)
print(f"cost per data row: {method.cost():.2f} static, {measured:.2f} measured (FPE)")

# Paired error: the same noise through a learned sampler and through the exact map.
noise = jax.random.normal(jax.random.key(5), (1000, 2))
exact = jax.vmap(lambda e: flow.flow_map(e, 1.0, 0.0))(noise)  # closed form


@eqx.filter_jit
def draw(model, steps):
    return jax.vmap(lambda e: fmcalc.sample(model, e, steps=steps))(noise)


def paired_error(samples) -> float:
    return float(jnp.mean(jnp.linalg.norm(samples - exact, axis=1)))


def evaluate(state):
    """Called by `fit` during training: the EMA's paired errors so far."""
    return {f"{k}-step": paired_error(draw(state.ema, k)) for k in (1, 2)}


def train(method, **options):
    return fmcalc.train.fit(
        method,
        model,
        flow.sample,
        key=jax.random.key(4),
        steps=args.steps,
        batch_size=256,
        # The EMA is also the tangent's network: a short memory, 5 % of the run.
        ema=EMA(horizon=0.05),
        **options,
    )


result = train(
    method,
    options=Options(evaluation=Evaluation(evaluate, every=max(args.steps // 4, 1))),
)
for step, errors in result.evaluations:
    print(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in errors.items()))
baseline = fmcalc.model_velocity(train(fmcalc.methods.get("flow-matching")).ema)

samples = {k: draw(result.ema, k) for k in (1, 2)}
euler = {
    k: jax.vmap(lambda e, k=k: fmcalc.sample_euler(baseline, e, steps=k))(noise)
    for k in (1, 2, 128)
}
print("paired error: steps | meanflow-fd-ema | flow matching (Euler)")
for k in (1, 2, 128):
    own = f"{paired_error(samples[k]):.3f}" if k in samples else "-"
    print(f"{k}-step paired error: {own} | {paired_error(euler[k]):.3f}")

panels = {
    "exact map": exact,
    "new method, 1 jump": samples[1],
    "new method, 2 jumps": samples[2],
    "flow matching, 2 Euler steps": euler[2],
}
fig, axes = plt.subplots(1, len(panels), figsize=(12, 3.2), sharex=True, sharey=True)
for ax, (title, points) in zip(axes, panels.items(), strict=True):
    ax.scatter(points[:, 0], points[:, 1], s=2, alpha=0.5)
    ax.set_title(title, fontsize=9)
    ax.set_aspect("equal")
fig.tight_layout()
fig.savefig(args.figure, dpi=100)
print(f"figure: {args.figure}")
