"""Shorthands shared by the method specs: the symbols of the formulas."""

from .. import _rules as rules
from .._expr import FlowMap, Network, S, T, U, X
from .._losses import AbstractLoss, SquaredError
from .._method import Term
from .._times import AbstractTimeSampler, Equal, Uniform


V = Network()
F = FlowMap(V)
V_ema = Network("ema")
F_ema = FlowMap(V_ema)
V_aux = Network("aux")
F_aux = FlowMap(V_aux)
x, s, t, u = X, S, T, U


def anchor(
    times: AbstractTimeSampler = Equal(Uniform()),
    loss: AbstractLoss = SquaredError(),
    **kwargs,
) -> Term:
    """The flow-matching anchor `V(x, s, s) - v(x, s)` of self-distillation (with the
    conditional velocity by default)."""
    return Term("anchor", rules.flow_matching(**kwargs), times, loss)


__all__ = ["F", "F_aux", "F_ema", "V", "V_aux", "V_ema", "anchor", "s", "t", "u", "x"]
