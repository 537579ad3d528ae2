"""Record every registry method's loss, metrics and gradient on fixed inputs.

    python tests/golden/losses/record.py   # writes losses.npz beside this file

`tests/test_golden_losses.py` compares the current code with the recorded values:
a refactor changes no number. Regenerate only after a deliberate change of a
method's loss, and say so in the commit.
"""

import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import fmcalc
from fmcalc.nn import MLP


HERE = pathlib.Path(__file__).parent
DIM, ROWS = 2, 24


def inputs():
    """The fixed inputs: an MLP, its EMA and aux copies, a teacher and a batch."""
    jax.config.update("jax_enable_x64", True)
    model = MLP(DIM, width=16, depth=2, key=jax.random.key(0), dtype=jnp.float64)
    perturbed = lambda k: jax.tree.map(  # noqa: E731
        lambda a: (
            a + 0.01 * jax.random.normal(k, a.shape, a.dtype)
            if eqx.is_inexact_array(a)
            else a
        ),
        model,
    )
    ema, aux = perturbed(jax.random.key(1)), perturbed(jax.random.key(2))
    teacher = MLP(DIM, width=16, depth=2, key=jax.random.key(3), dtype=jnp.float64)
    x0 = jax.random.normal(jax.random.key(4), (ROWS, DIM), jnp.float64)
    return model, ema, aux, fmcalc.model_velocity(teacher), x0


def values(name: str) -> dict[str, np.ndarray]:
    """The loss, metrics and flattened gradient of method `name` at step 0, and for
    a method with curricula also at step 500 (inside every curriculum)."""
    model, ema, aux, teacher, x0 = inputs()
    method = fmcalc.methods.get(name)
    batch = method.batch(jax.random.key(5), x0)
    out = {}
    for step in (0, 500) if method.schedules else (0,):

        def loss(model, step=step):
            return method.loss(
                model, batch, teacher=teacher, ema=ema, aux=aux, step=step
            )

        gradient = eqx.filter_jit(eqx.filter_value_and_grad(loss, has_aux=True))
        (value, metrics), grads = gradient(model)
        leaves = jax.tree.leaves(eqx.filter(grads, eqx.is_inexact_array))
        out[f"{step}/loss"] = np.asarray(value)
        out[f"{step}/grad"] = np.concatenate([np.ravel(g) for g in leaves])
        for key, metric in metrics.items():
            out[f"{step}/{key}"] = np.asarray(metric)
    return out


def main() -> None:
    recorded = {}
    for name in fmcalc.methods.names():
        for key, value in values(name).items():
            recorded[f"{name}:{key}"] = value
    np.savez(HERE / "losses.npz", **recorded)
    print(f"recorded {len(recorded)} arrays of {len(fmcalc.methods.names())} methods")


if __name__ == "__main__":
    main()
