"""Curricula: endpoints, monotonicity, traced steps under jit, bad parameters."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fmcalc
from fmcalc._schedules import (
    Constant,
    Doubling,
    Exponential,
    LinearWarmup,
    Sigmoid,
)


STEPS = np.arange(-10, 1_210, dtype=np.int32)


def _values(schedule, steps=STEPS):
    return np.asarray(jax.jit(jax.vmap(schedule))(jnp.asarray(steps)))


def alphaflow_reference(step, start, end, first, last, gamma, snap):
    """AlphaFlow's `get_ratio` ("sigmoid" scheduler) for first = 1, last = 0."""
    if step < start:
        value = first
    elif step > end:
        value = last
    else:
        middle = start + (end - start) / 2
        progress = (step - middle) / (end - start)
        value = first + (last - first) / (1 + math.exp(-progress * gamma))
    if value < snap:
        return 0.0
    if value > 1 - snap:
        return 1.0
    return value


def test_sigmoid_matches_alphaflow():
    schedule = Sigmoid(200, 1000)
    values = _values(schedule)
    expected = [
        alphaflow_reference(int(k), 200, 1000, 1.0, 0.0, 25.0, 0.005) for k in STEPS
    ]
    np.testing.assert_allclose(values, expected, atol=1e-12)
    assert values[STEPS <= 200].tolist() == [1.0] * int(np.sum(STEPS <= 200))
    assert np.all(values[STEPS >= 1000] == 0.0)
    assert float(schedule(600)) == pytest.approx(0.5)
    assert np.all(np.diff(values) <= 0)
    # Snapped: every value is an endpoint or at least `snap` away from both.
    inside = values[(values != 0) & (values != 1)]
    assert inside.size and np.all((inside >= 0.005) & (inside <= 0.995))


def test_sigmoid_general_endpoints_and_no_snap():
    schedule = Sigmoid(0, 100, first=2.0, last=4.0, gamma=10.0, snap=0.0)
    values = _values(schedule, np.arange(-5, 106))
    assert values[0] == 2.0 and values[-1] == 4.0
    assert np.all(np.diff(values) >= 0)
    assert float(schedule(0)) == pytest.approx(2 + 2 / (1 + math.exp(5)))
    snapped = Sigmoid(0, 100, first=2.0, last=4.0, gamma=10.0, snap=0.02)
    assert float(snapped(0)) == 2.0 and float(snapped(100)) == 4.0


def test_exponential():
    schedule = Exponential(0.1, 0.002, 1000)
    values = _values(schedule)
    assert values[STEPS <= 0].tolist() == [0.1] * int(np.sum(STEPS <= 0))
    assert np.all(values[STEPS >= 1000] == 0.002)
    assert float(schedule(500)) == pytest.approx(math.sqrt(0.1 * 0.002))
    assert np.all(np.diff(values) <= 0)
    ratios = values[11:1010] / values[10:1009]
    np.testing.assert_allclose(ratios, (0.002 / 0.1) ** (1 / 1000), rtol=1e-10)


def test_linear_warmup():
    schedule = LinearWarmup(0.0, 0.99, 400)
    values = _values(schedule)
    assert np.all(values[STEPS <= 0] == 0.0)
    assert np.all(values[STEPS >= 400] == 0.99)
    assert float(schedule(100)) == pytest.approx(0.2475)
    assert np.all(np.diff(values) >= 0)
    decreasing = _values(LinearWarmup(1.0, 0.0, 10), np.arange(12))
    np.testing.assert_allclose(decreasing, [1 - k / 10 for k in range(11)] + [0.0])


def test_doubling():
    values = _values(Doubling(10, 100, maximum=1280))
    assert np.all(values[STEPS < 100] == 10)
    assert float(Doubling(10, 100)(250)) == 40.0
    assert np.all(values[STEPS >= 700] == 1280)
    assert np.all(np.diff(values) >= 0)
    assert set(values.tolist()) == {10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0, 1280}
    fmm = Doubling(0.05, 10, maximum=1.0)
    assert [float(fmm(k)) for k in (0, 10, 20, 30, 40, 50)] == [
        0.05,
        0.1,
        0.2,
        0.4,
        0.8,
        1.0,
    ]


def test_constant():
    values = _values(Constant(0.3))
    assert np.all(values == 0.3)


def test_traced_steps_under_jit():
    schedules = [
        Constant(1.0),
        Sigmoid(10, 50),
        Exponential(1.0, 0.01, 30),
        LinearWarmup(0.0, 1.0, 30),
        Doubling(1.0, 7, maximum=8.0),
    ]
    for schedule in schedules:
        jitted = jax.jit(schedule)
        for step in (0, 12, 29, 1_000_000):
            traced = jitted(jnp.asarray(step, jnp.int32))
            assert traced.shape == () and jnp.issubdtype(traced.dtype, jnp.floating)
            assert float(traced) == pytest.approx(float(schedule(step)), abs=1e-12)
    # Inside a training step, with the step carried as state.
    schedule = LinearWarmup(0.0, 1.0, 4)

    def body(step, total):
        return total + schedule(step)

    total = jax.jit(lambda: jax.lax.fori_loop(0, 6, body, jnp.asarray(0.0)))()
    assert float(total) == pytest.approx(0 + 0.25 + 0.5 + 0.75 + 1 + 1)


def test_step_must_be_scalar():
    # The annotation (under the test suite's beartype hook) or the body rejects it.
    with pytest.raises((TypeError, ValueError), match=r"step"):
        LinearWarmup(0.0, 1.0, 4)(jnp.arange(3))


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda: Constant(math.nan), ValueError, r"value=.*finite"),
        (lambda: Sigmoid(100, 100), ValueError, r"start < end.*100"),
        (lambda: Sigmoid(-1, 100), ValueError, r"start=.*≥ 0.*-1"),
        (lambda: Sigmoid(0, 1.5e5), TypeError, r"end=.*int"),
        (lambda: Sigmoid(0, 10, gamma=0.0), ValueError, r"gamma=.*positive"),
        (lambda: Sigmoid(0, 10, snap=0.6), ValueError, r"snap=.*\[0, 0\.5\)"),
        (lambda: Sigmoid(0, 10, snap=-0.1), ValueError, r"snap="),
        (lambda: Sigmoid(0, 10, first=1.0, last=1.0), ValueError, r"snap="),
        (lambda: Exponential(0.0, 0.002, 10), ValueError, r"first=.*positive"),
        (lambda: Exponential(0.1, -0.002, 10), ValueError, r"last=.*positive"),
        (lambda: Exponential(0.1, 0.002, 0), ValueError, r"steps=.*≥ 1.*0"),
        (lambda: LinearWarmup(0.0, 0.99, 0), ValueError, r"steps=.*≥ 1"),
        (lambda: LinearWarmup(0.0, math.inf, 10), ValueError, r"last=.*finite"),
        (lambda: Doubling(0.0, 10), ValueError, r"initial=.*positive"),
        (lambda: Doubling(1.0, 0), ValueError, r"every=.*≥ 1"),
        (lambda: Doubling(10.0, 5, maximum=5.0), ValueError, r"maximum=.*≥ initial"),
    ],
)
def test_bad_parameters(build, error, match):
    with pytest.raises(error, match=match):
        build()


@pytest.mark.parametrize(
    "name", [n for n in fmcalc.methods.names() if fmcalc.methods.get(n).schedules]
)
def test_for_run_settles_every_curriculum_by_half_the_run(name):
    method = fmcalc.methods.get(name)
    short = method.for_run(2000)
    assert short.settled_step is not None and short.settled_step <= 1000
    # The terms, and so the formulas, are unchanged.
    assert short.terms == method.terms and str(short) == str(method)
    # A run long enough for the paper's curricula leaves them as they are.
    assert method.for_run(10 * (method.settled_step or 1)) == method
    # At the end of a compressed curriculum, the final values.
    end = method.params(method.settled_step)
    for key, value in short.params(short.settled_step).items():
        assert float(value) == pytest.approx(float(end[key])), key


def test_for_run_refuses_bad_lengths():
    method = fmcalc.methods.get("ect")
    with pytest.raises(
        ValueError, match="steps=...\\)` must be an integer >= 2; got 1"
    ):
        method.for_run(1)
    with pytest.raises(
        ValueError, match="settle=...\\)` must lie in \\(0, 1\\]; got 0"
    ):
        method.for_run(100, settle=0.0)


def test_compressed_schedule():
    warmup = fmcalc.schedules.LinearWarmup(0.0, 1.0, 1000)
    fast = fmcalc.schedules.Compressed(warmup, 4)
    assert fast.settled == 250
    assert float(fast(125)) == pytest.approx(0.5) and float(fast(10_000)) == 1.0
    with pytest.raises(ValueError, match="factor"):
        fmcalc.schedules.Compressed(warmup, 0.0)
    with pytest.raises(TypeError, match="schedule"):
        fmcalc.schedules.Compressed(lambda step: step, 2.0)  # pyright: ignore[reportArgumentType]
