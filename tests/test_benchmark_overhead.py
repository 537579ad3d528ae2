"""The specs of MeanFlow, shortcut models, LSD and sCT against plain JAX.

`benchmarks/handwritten.py` writes the four losses by hand; `benchmarks/overhead.py`
compares them with the specs. Here, on a tiny network: the loss and its gradient
agree, and the compiled `value_and_grad` of the spec does no more FLOPs than the
hand-written one. (Wall time is measured by the benchmark, not asserted here.)
"""

import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest

import fmcalc.nn


BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import overhead  # noqa: E402


TINY = overhead.Network(
    "tiny MLP",
    6,
    lambda key: fmcalc.nn.MLP(
        6,
        width=32,
        depth=2,
        time_features=8,
        num_classes=overhead.NUM_CLASSES,
        dtype=jnp.float32,
        key=key,
    ),
)
SETTINGS = overhead.Settings(batch=16, repeats=0, batches=1)


@pytest.mark.slow
@pytest.mark.parametrize("name", overhead.METHODS)
def test_spec_matches_hand_written(name):
    row = overhead.benchmark(name, TINY, SETTINGS, timing=False, key=jax.random.key(3))
    assert row["loss_rel_diff"] <= overhead.TOLERANCE, row
    assert row["grad_rel_diff"] <= overhead.TOLERANCE, row
    assert row["flops_ratio"] <= overhead.MAX_FLOPS_RATIO, row
    assert row["passed"], row


@pytest.mark.slow
def test_comparison_detects_a_different_loss(monkeypatch):
    # The shortcut target taken from the online network instead of the EMA: the
    # loss must differ, so equality above is informative.
    shortcut = overhead.handwritten.shortcut_loss
    monkeypatch.setattr(
        overhead.handwritten,
        "shortcut_loss",
        lambda model, ema, *args, **kwargs: shortcut(model, model, *args, **kwargs),
    )
    row = overhead.benchmark(
        "shortcut",
        TINY,
        SETTINGS,
        count_flops=False,
        timing=False,
        key=jax.random.key(3),
    )
    assert row["loss_rel_diff"] > 1e-4
    assert not row["passed"]
