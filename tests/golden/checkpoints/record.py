"""Write the checkpoint fixtures: a file and an orbax directory of a 3-step run.

    python tests/golden/checkpoints/record.py

They were written by fmcalc before its training package was rebuilt (the call
below is that version's API); `tests/test_checkpoint_fixtures.py` checks that
they still load and that the run they record still resumes. Do not regenerate
them: their point is that they are old.
"""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import optax

import fmcalc
from fmcalc.nn import MLP


HERE = pathlib.Path(__file__).parent


def run(path, steps=3):
    data = jax.random.normal(jax.random.key(0), (64, 2), jnp.float32)
    model = MLP(2, width=8, depth=2, key=jax.random.key(1))
    return fmcalc.train.fit(
        fmcalc.methods.get("lsd"),
        model,
        data,
        key=jax.random.key(2),
        steps=steps,
        batch_size=16,
        optimizer=optax.adam(1e-3),
        ema_decay=0.9,
        checkpoint=path,
        checkpoint_every=2,
        progress=False,
    )


def main() -> None:
    result = run(HERE / "run.eqx")
    directory = HERE / "run.orbax"
    shutil.rmtree(directory, ignore_errors=True)
    from fmcalc import _checkpoint, _checkpoint_orbax

    header = _checkpoint.checkpoint_header(HERE / "run.eqx")
    record = {"run": header["run"], "monitor": header["monitor"]}
    _checkpoint_orbax.save(str(directory), result.state, record, None)
    (HERE / "losses.json").write_text(json.dumps(straight_losses()))


if __name__ == "__main__":
    main()


def straight_losses() -> list[float]:
    """The losses of the same run taken straight to 5 steps (`losses.json`): the
    fixtures resumed to step 5 must continue with the last two."""
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        return [float(x) for x in run(f"{directory}/run.eqx", steps=5).losses]
