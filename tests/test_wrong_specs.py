"""A battery of deliberately wrong specs: each is flagged by at least one of the
kit's layers (refused at construction, a warning, the fixed point, stability,
training), in the order a user meets them; none of them flags a registry method
(`test_explain.py`, `test_fixed_point.py`, `test_stability.py`,
`test_training_check.py` show that side)."""

import warnings
from collections.abc import Callable

import jax
import pytest

import fmcalc
from fmcalc import (
    D,
    Diagonal,
    FiniteDifference,
    FlowMap,
    Network,
    Normalize,
    S,
    T,
    Teacher,
    U,
    X,
    sg,
)
from fmcalc.testing import check_fixed_point, check_stability, check_training


V, V_ema = Network(), Network("ema")
F, F_ema = FlowMap(V), FlowMap(V_ema)
v, v_c = Teacher(), fmcalc.ConditionalVelocity()
x, s, t, u = X, S, T, U
FD = FiniteDifference(1e-3, "central")
TRIANGLE = fmcalc.UniformTriangle()
MIDPOINT = fmcalc.WithIntermediate(fmcalc.UniformTriangle())
MID = s + 0.5 * (t - s)


def _anchor(loss=None) -> fmcalc.Term:
    loss = fmcalc.SquaredError() if loss is None else loss
    return fmcalc.Term(
        "anchor", fmcalc.flow_matching(), fmcalc.Equal(fmcalc.Uniform()), loss
    )


def _distillation(residual, times=TRIANGLE, loss=None) -> fmcalc.Method:
    loss = fmcalc.SquaredError() if loss is None else loss
    term = fmcalc.Term("term", residual, times, loss)
    return fmcalc.Method("wrong", "lagrangian", "distillation", "V", (term,))


def _self(residual, times=TRIANGLE) -> fmcalc.Method:
    term = fmcalc.Term("term", residual, times)
    return fmcalc.Method(
        "wrong", "lagrangian", "self-distillation", "V", (_anchor(), term),
        split=(0.75, 0.25),
    )  # fmt: skip


def _meanflow(target_tangent=(1, 0), sign=1.0, loss=None) -> fmcalc.Method:
    da, db = target_tangent
    dV = D(V, at=(x, s, t), along=(v_c(x, s), da, db))
    residual = V(x, s, t) - sg(v_c(x, s) + sign * (t - s) * dV)
    term = fmcalc.Term(
        "meanflow", residual, fmcalc.SortedPair(fmcalc.LogitNormal(-0.4, 1.0)),
        fmcalc.SquaredError() if loss is None else loss,
    )  # fmt: skip
    return fmcalc.Method("wrong", "eulerian", "marginal-from-conditional", "V", (term,))


WRONG: dict[str, Callable[[], fmcalc.Method]] = {
    # misplaced stop-gradients
    "LSD, stop-gradient on the prediction": lambda: _self(
        sg(D(F, at=(x, s, t), along=(0, 0, 1), by=FD)) - Diagonal(V_ema)(F(x, s, t), t)
    ),
    "LSD, stop-gradient on the whole residual": lambda: _self(
        sg(D(F, at=(x, s, t), along=(0, 0, 1)) - Diagonal()(F(x, s, t), t))
    ),
    "MeanFlow without its stop-gradient": lambda: _distillation(
        V(x, s, t) - (v_c(x, s) + (t - s) * D(V, at=(x, s, t), along=(v_c(x, s), 1, 0)))
    ),
    "shortcut, stop-gradient on the prediction instead of the target": lambda: _self(
        sg(V(x, s, t)) - (0.5 * V(x, s, MID) + 0.5 * V(F(x, s, MID), MID, t))
    ),
    # gradient only through frozen networks
    "CTM compared through the EMA network's velocity only": lambda: _distillation(
        V_ema(F(x, s, t), t, 0) - sg(V_ema(F(F(x, s, u), u, t), t, 0)), MIDPOINT
    ),
    "EMD on the EMA map with the online map as its input": lambda: _distillation(
        D(F_ema, at=(F(x, s, t), s, t), along=(v(x, s), 1, 0))
    ),
    # sign slips
    "MeanFlow, the derivative term with the wrong sign": lambda: _meanflow(sign=-1.0),
    "Eulerian, advection with the wrong sign": lambda: _distillation(
        D(F, at=(x, s, t), along=(0, 1, 0)) - D(F, at=(x, s, t), along=(v(x, s), 0, 0))
    ),
    "AYF-LMD tangent surrogate with the sign read literally": lambda: _distillation(
        F(x, s, t)
        - sg(
            F(x, s, t)
            - Normalize(D(F, at=(x, s, t), along=(0, 0, 1)) - v(F(x, s, t), t), 0.1)
        ),
        fmcalc.SortedPair(fmcalc.LogitNormal(-0.8, 1.0)),
    ),
    # time-argument slips
    "MeanFlow, derivative along the target time": lambda: _meanflow((0, 1)),
    "Lagrangian, teacher at the source time": lambda: _distillation(
        D(F, at=(x, s, t), along=(0, 0, 1)) - sg(v(F(x, s, t), s))
    ),
    "Lagrangian, teacher at the start point": lambda: _distillation(
        D(F, at=(x, s, t), along=(0, 0, 1)) - sg(v(x, t))
    ),
    "shortcut, second jump back to the source": lambda: _self(
        V(x, s, t) - sg(0.5 * V(x, s, MID) + 0.5 * V(F(x, s, MID), MID, s))
    ),
    "flow matching at the wrong time": lambda: _distillation(V(x, t, t) - v(x, s)),
    # robust losses on the conditional velocity
    "pseudo-Huber flow matching": lambda: fmcalc.Method(
        "wrong",
        "diagonal",
        "marginal-from-conditional",
        "V",
        (_anchor(fmcalc.PseudoHuber()),),
    ),  # fmt: skip
    "cosine flow matching": lambda: fmcalc.Method(
        "wrong",
        "diagonal",
        "marginal-from-conditional",
        "V",
        (_anchor(fmcalc.Cosine()),),
    ),  # fmt: skip
    "MeanFlow with an undeclared adaptive weight": lambda: _meanflow(
        loss=fmcalc.Adaptive(p=0.5)
    ),
}


def _flags(build: Callable[[], fmcalc.Method]) -> list[str]:
    """The kit's layers, cheapest first, up to the first that flags the spec."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", fmcalc.FmcalcWarning)
            method = build()
    except (ValueError, TypeError) as error:
        return [f"refused: {type(error).__name__}"]
    except fmcalc.FmcalcWarning as warning:
        return [f"warning: {type(warning).__name__}"]
    key = jax.random.key(0)
    if not check_fixed_point(method, key=key).passed:
        return ["fixed point"]
    if not check_stability(method, key=key).passed:
        return ["stability"]
    if not check_training(method, key=key).passed:
        return ["training"]
    return []


@pytest.mark.parametrize("case", WRONG)
def test_wrong_spec_is_flagged(case):
    flags = _flags(WRONG[case])
    assert flags, f"{case}: no layer of the kit flags it"
