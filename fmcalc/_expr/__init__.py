"""Residuals as expression trees.

A residual is a small tree of frozen nodes: leaves (`x`, `s`, `t`, `u`, constants),
network and velocity calls, directional derivatives with a strategy, stop-gradients
and arithmetic. The tree is data, so the same object is

- printed as a formula (`str(expr)`),
- costed statically ([`fmcalc.cost.estimate`][]),
- validated ([`fmcalc.validate`][]), and
- evaluated per example by one interpreter ([`fmcalc.evaluate`][]), which computes
  every distinct network call once and takes the primal of a JVP as the prediction
  wherever the same call appears.

Two kinds of value flow through a tree: *vectors* (shaped like `x`) and *times*
(scalars). Building a tree checks that they are combined sensibly.

One module per family of nodes, each importing only the ones above it:
`_core` (leaves, arithmetic, stop-gradients), `_networks`, `_velocities`,
`_functions` and `_derivatives`.
"""

from ._core import (
    AbstractExpr as AbstractExpr,
    Add as Add,
    Constant as Constant,
    Div as Div,
    Mul as Mul,
    Neg as Neg,
    S as S,
    StopGradient as StopGradient,
    Sub as Sub,
    T as T,
    U as U,
    Variable as Variable,
    X as X,
    _is_zero as _is_zero,
    _wrap as _wrap,
    sg as sg,
    walk as walk,
)
from ._derivatives import D as D, Derivative as Derivative
from ._functions import (
    Clip as Clip,
    HasLabel as HasLabel,
    Indicator as Indicator,
    Normalize as Normalize,
    Param as Param,
    TimeFunction as TimeFunction,
)
from ._networks import (
    Call as Call,
    FlowMap as FlowMap,
    FlowMapCall as FlowMapCall,
    Network as Network,
)
from ._velocities import (
    AbstractVelocity as AbstractVelocity,
    Analytic as Analytic,
    ConditionalVelocity as ConditionalVelocity,
    Diagonal as Diagonal,
    Teacher as Teacher,
    VelocityCall as VelocityCall,
)
