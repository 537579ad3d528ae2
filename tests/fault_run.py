"""A training run for the fault-injection tests: `python fault_run.py CHECKPOINT
LOSSES` trains (or resumes) a small model, prints each step as it is dispatched and
writes the losses of this call, with the step they start from, to LOSSES."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fmcalc
from fmcalc import train
from fmcalc.nn import MLP


STEPS = 400
EVERY = 25


def main(checkpoint: str, losses: str) -> None:
    def report(state):
        print(state.step, flush=True)
        return {}

    data = jax.random.normal(jax.random.key(1), (256, 2), jnp.float32)
    model = MLP(2, width=16, depth=2, time_features=8, key=jax.random.key(0))
    result = train.fit(
        fmcalc.methods.get("shortcut"),
        model,
        data,
        key=jax.random.key(2),
        steps=STEPS,
        batch_size=16,
        optimizer=optax.adam(1e-3),
        ema=train.EMA(decay=0.9),
        options=train.Options(
            checkpoint=train.Checkpoint(checkpoint, every=EVERY),
            evaluation=train.Evaluation(report, every=1),
            progress=False,
        ),
    )
    start = result.step - len(result.losses)
    np.save(losses, np.concatenate([[start], result.losses]))


if __name__ == "__main__":
    main(*sys.argv[1:])
