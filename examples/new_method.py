"""A new method from primitives: MeanFlow with a central finite difference and an
EMA network in the target.

Along MeanFlow's tangent `eps - x0` a finite difference evaluates the network at
`x + h (eps - x0)`, non-linear in the noise: biased, and the validator says so. The
new method takes its tangent from the EMA's velocity `V_ema(x, s, s)` (so it is
self-distillation, with a flow-matching anchor), passes the fixed-point check on an
exact Gaussian flow, and trains.

python examples/new_method.py [--steps N]
"""

import argparse
from functools import partial

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import fmcalc
from fmcalc import D, Diagonal, Network, S as s, T as t, Term, X as x, sg
from fmcalc.flows import Gaussian
from fmcalc.nn import MLP
from fmcalc.testing import check_fixed_point


jax.config.update("jax_enable_x64", True)
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=2000, help="training steps")
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

ema, optim = model, optax.adam(1e-3)
opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))


@eqx.filter_jit
def train_step(model, ema, opt_state, key):
    k_data, k_batch = jax.random.split(key)
    batch = method.batch(k_batch, flow.sample(k_data, 256))
    grad_fn = eqx.filter_value_and_grad(method.loss, has_aux=True)
    _, grads = grad_fn(model, batch, ema=ema)
    updates, opt_state = optim.update(grads, opt_state)
    model = eqx.apply_updates(model, updates)
    return model, fmcalc.ema_update(ema, model, 0.99), opt_state


for step in range(args.steps):
    key = jax.random.fold_in(jax.random.key(4), step)
    model, ema, opt_state = train_step(model, ema, opt_state, key)
eps = jax.random.normal(jax.random.key(5), (1000, 2))
exact = jax.vmap(lambda e: flow.flow_map(e, 1.0, 0.0))(eps)  # closed form
for jumps in (1, 2):
    x0 = jax.vmap(partial(fmcalc.sample, model, steps=jumps))(eps)
    error = jnp.mean(jnp.linalg.norm(x0 - exact, axis=1))
    print(f"{jumps}-step paired error: {float(error):.3f}")
