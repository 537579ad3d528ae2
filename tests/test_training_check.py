"""`check_training`: a short run on the broad asymmetric mixture tells a loss that
trains from one that only has the right fixed point."""

import inspect
import warnings

import jax
import numpy as np
import pytest

import fmcalc
from fmcalc import D, Diagonal, FiniteDifference, FlowMap, Network, S, T, X, methods, sg
from fmcalc.testing import check_training


# A few training runs of 10 to 40 s each.
slow = pytest.mark.slow
# Flow matching's baseline is cached per process: one worker runs every check with
# the default budget (docs/kit.md's too, tests/test_docs_kit.py), and trains it once.
pytestmark = pytest.mark.xdist_group("check_training")
F = FlowMap(Network())
FD = FiniteDifference(1e-3, "central")
JUMP_BAR = inspect.signature(check_training).parameters["min_jump_gradient"].default


def _lsd_with_ema_teacher(wrong: bool) -> fmcalc.Method:
    """Lagrangian self-distillation with central differences and an EMA teacher,
    the stop-gradient on the target, or (`wrong`) moved to the prediction."""
    derivative = D(F, at=(X, S, T), along=(0, 0, 1), by=FD)
    teacher = Diagonal(Network("ema"))(F(X, S, T), T)
    residual = sg(derivative) - teacher if wrong else derivative - sg(teacher)
    anchor = fmcalc.Term(
        "anchor", fmcalc.flow_matching(), fmcalc.Equal(fmcalc.Uniform())
    )
    term = fmcalc.Term("lagrangian", residual, fmcalc.UniformTriangle())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fmcalc.GradientPathWarning)
        return fmcalc.Method(
            "lsd-ema", "lagrangian", "self-distillation", "V", (anchor, term),
            split=(0.75, 0.25),
        )  # fmt: skip


@pytest.fixture(scope="module")
def right():
    return check_training(_lsd_with_ema_teacher(False), key=jax.random.key(0))


@slow
def test_the_wrong_gradient_path_fails(right):
    wrong = check_training(_lsd_with_ema_teacher(True), key=jax.random.key(0))
    assert not wrong.passed, str(wrong)
    assert max(wrong.one_step, wrong.two_step) > wrong.margin * wrong.trivial
    assert "FAIL" in str(wrong)
    # The same spec with the stop-gradient on the target trains.
    assert right.passed, str(right)
    assert max(right.one_step, right.two_step) < 0.5 * wrong.trivial


@slow
@pytest.mark.parametrize(
    "name, overrides",
    # One self-distillation and one compositional method; benchmarks/trust.py runs
    # the check on every registry method (benchmarks/results/trust/).
    [("lsd", {}), ("shortcut", {})],
)
def test_registry_methods_pass_at_the_defaults(name, overrides, right):
    result = check_training(methods.get(name, **overrides), key=jax.random.key(0))
    assert result.passed, str(result)
    assert result.failure is None and result.steps == 3000
    # Flow matching's run was cached from the first check with these settings.
    assert result.flow_matching == right.flow_matching
    assert result.trivial == right.trivial
    assert np.isfinite(result.two_step)
    # The velocity-only control: the flow-matching network used as a map. It is
    # finite, cached with the run, named in the printout, and worse than the
    # learned jumps of a method that trains them.
    assert result.velocity_only == right.velocity_only
    assert all(np.isfinite(result.velocity_only))
    assert result.one_step < result.velocity_only[0], str(result)
    assert "as a map" in str(result)


@slow
def test_flow_matching_is_judged_as_a_velocity():
    result = check_training(
        methods.get("flow-matching"), key=jax.random.key(0), steps=300
    )
    assert result.one_step == result.two_step == pytest.approx(result.flow_matching)


def test_curricula_settle_within_the_run():
    method = methods.get("ayf-emd")  # tangent warm-up over 10k steps
    assert method.settled_step == 10_000
    short = method.for_run(3000)
    assert short.settled_step == 1500
    assert float(short.params(1500)["r"]) == 1.0
    assert float(short.params(750)["r"]) == pytest.approx(0.5)
    assert methods.get("lsd").for_run(3000) == methods.get("lsd")


@slow
def test_a_run_that_blows_up_fails_without_raising():
    """A learning rate that blows up every run, flow matching's too: the check
    reports a failure instead of raising."""
    result = check_training(
        methods.get("lsd"), key=jax.random.key(0), steps=50, learning_rate=1e6
    )
    assert not result.passed
    assert "FAIL" in str(result)


def test_a_stopped_run_prints_without_numpy_warnings():
    from fmcalc.testing import TrainingResult

    nan = float("nan")
    stopped = TrainingResult(
        "m", 3000, nan, nan, 0.04, 1.4, 0.6, 20.0, "non-finite loss", 1.0, False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text = str(stopped)
    assert "FAIL: training stopped (non-finite loss)" in text


# The map never trained off the diagonal ---------------------------------------


def _never_jumps() -> dict[str, fmcalc.Method]:
    """Specs whose loss never reaches the map off the diagonal (`t ≠ s`) with a
    gradient, or reaches it only a finite difference's step away."""
    diagonal = fmcalc.Equal(fmcalc.Uniform())
    lagrangian = D(F, at=(X, S, T), along=(0, 0, 1))
    target = Diagonal(Network())(sg(F(X, S, T)), T)
    prediction_frozen = fmcalc.Term(
        "lagrangian", sg(lagrangian) - target, fmcalc.UniformTriangle()
    )
    anchor = fmcalc.Term("anchor", fmcalc.flow_matching(), diagonal)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fmcalc.FmcalcWarning)
        frozen = fmcalc.Method(
            "frozen-jumps", "lagrangian", "self-distillation", "V",
            (anchor, prediction_frozen), split=(0.75, 0.25),
        )  # fmt: skip
    return {
        "lsd on the diagonal": methods.get("lsd", times=diagonal),
        "lsd on the diagonal, forward differences of 0.01": methods.get(
            "lsd", times=diagonal, derivative=FiniteDifference(1e-2, "forward")
        ),
        "meanflow on the diagonal": methods.get("meanflow", times=diagonal),
        "esd on the diagonal": methods.get("esd", times=diagonal),
        "psd on the diagonal": methods.get("psd", times=diagonal, midpoint=True),
        "jumps only under stop-gradient": frozen,
    }


def _reach(method: fmcalc.Method) -> float:
    from fmcalc.nn import MLP
    from fmcalc.testing import asymmetric_mixture, jump_gradient

    flow = asymmetric_mixture(broad=True, steps=64)
    model = MLP(2, width=64, depth=3, skip=True, key=jax.random.key(0))
    x0 = flow.sample(jax.random.key(1), 256)
    return jump_gradient(
        method.for_run(3000), model, x0, key=jax.random.key(2),
        teacher=flow.velocity, aux=flow,
    )  # fmt: skip


@slow
@pytest.mark.parametrize("name", sorted(_never_jumps()))
def test_a_spec_that_never_trains_jumps_has_no_jump_gradient(name):
    reach = _reach(_never_jumps()[name])
    assert reach < JUMP_BAR / 10, reach


@slow
def test_every_registry_map_clears_the_jump_bar_tenfold():
    """The margin of the bar: every registry method that learns a map sends at
    least 10 times `min_jump_gradient` of its gradient off the diagonal."""
    for name in methods.names():
        method = methods.get(name)
        if method.rule == "diagonal":
            continue
        reach = _reach(method)
        assert reach >= 10 * JUMP_BAR, (name, reach)
        # One compiled program per method in one process: drop each once read, so
        # a worker late in the suite does not pile them up (XLA's compiler
        # crashed here once, in a worker that had compiled many).
        jax.clear_caches()


@slow
def test_check_training_fails_a_spec_that_never_trains_jumps(right):
    result = check_training(
        _never_jumps()["lsd on the diagonal"], key=jax.random.key(0)
    )
    assert not result.passed
    assert result.jump_gradient == 0.0
    assert "trains a velocity, not jumps" in str(result)
    assert right.jump_gradient >= 10 * right.min_jump_gradient
