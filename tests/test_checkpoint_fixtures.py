"""Checkpoints written by fmcalc before its training package was rebuilt (by
`tests/golden/checkpoints/record.py`, with the API of that version) still load,
and the run they record still resumes, in either store."""

import json
import pathlib
import shutil

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fmcalc
from fmcalc import train
from fmcalc.nn import MLP


GOLDEN = pathlib.Path(__file__).parent / "golden" / "checkpoints"
# The optimiser the fixtures were written with: `fit` chained gradient clipping.
OPTIMIZER = optax.adam(1e-3)


def _model() -> MLP:
    # Written in float32, where the tests run with float64 enabled.
    return MLP(2, width=8, depth=2, key=jax.random.key(1), dtype=jnp.float32)


def _like() -> train.TrainState:
    model = _model()
    chained = optax.chain(optax.clip_by_global_norm(1.0), OPTIMIZER)
    opt_state = chained.init(eqx.filter(model, eqx.is_inexact_array))
    return train.TrainState(model, model, opt_state, 0, jax.random.key(2))


@pytest.mark.parametrize("name", ["run.eqx", "run.orbax"])
def test_old_checkpoints_load(name):
    state = train.load_checkpoint(GOLDEN / name, _like())
    assert state.step == 3
    leaves = jax.tree.leaves(state.model)
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves if hasattr(x, "dtype"))
    header = train.checkpoint_header(GOLDEN / name)
    assert header["run"]["method"].startswith("fmcalc.")


def _resume(path, steps):
    data = jax.random.normal(jax.random.key(0), (64, 2), jnp.float32)
    return train.fit(
        fmcalc.methods.get("lsd"),
        _model(),
        data,
        key=jax.random.key(2),
        steps=steps,
        batch_size=16,
        optimizer=OPTIMIZER,
        ema=train.EMA(decay=0.9),
        options=train.Options(
            checkpoint=train.Checkpoint(path, every=2), progress=False
        ),
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["run.eqx", "run.orbax"])
def test_the_old_run_resumes(tmp_path, name):
    path = tmp_path / name
    if (GOLDEN / name).is_dir():
        shutil.copytree(GOLDEN / name, path)
    else:
        shutil.copy(GOLDEN / name, path)
    # The fixtures' run drew its batches with 64-bit types disabled.
    with jax.enable_x64(False):
        resumed = _resume(path, 5)
    assert resumed.step == 5
    straight = json.loads((GOLDEN / "losses.json").read_text())
    np.testing.assert_array_equal(resumed.losses, np.float32(straight[3:]))
