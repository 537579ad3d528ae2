"""Shorthands shared by the method specs: the symbols of the formulas."""

from .. import _rules as rules
from .._expr import FlowMap, Network, S, T, U, X
from .._losses import AbstractLoss, LogVariance, SquaredError
from .._method import Term
from .._times import AbstractTimeSampler, Equal, GridStep, Uniform


V = Network()
F = FlowMap(V)
V_ema = Network("ema")
F_ema = FlowMap(V_ema)
V_aux = Network("aux")
F_aux = FlowMap(V_aux)
x, s, t, u = X, S, T, U


# Where Boffi et al.'s code (nmboffi/flow-maps) differs from the LSD, PSD and ESD
# specs, the same for the three.
SELF_DISTILLATION_CODE = (
    "Their code (nmboffi/flow-maps) weighs every term by a learned log-variance, "
    "`e^{-w(s, t)} L + w(s, t)`, with `w` a Fourier-feature MLP on image networks "
    "and `w = 1` on their MLPs: `loss=fmcalc.LogVariance(source='model')` with "
    "the network wrapped in `fmcalc.nn.WithLogVariance` (weight "
    "`fmcalc.nn.LogVarianceMLP(key=...)`, zero at the start, or `1.0`); off by "
    "default.",
    "Their noise has the data's scale, `σ_data N(0, I)` (0.5 for images), where "
    "fmcalc draws `N(0, I)`: `noise_scale=0.5`. Since `(1 - s) x0 + s σ eps = "
    "σ ((1 - s) x0 / σ + s eps)`, the map `F'` trained on `x0 / σ` at unit noise "
    "gives theirs as `F(x, s, t) = σ F'(x / σ, s, t)`.",
    "preset='reference' sets both; their data-dependent scale for point data "
    "(the data's standard deviation) is `noise_scale=`.",
    "Their diagonal term runs the network with dropout on and the other terms "
    "with it off; fmcalc's networks have no dropout, and there is no option: the "
    "two agree for a network without dropout.",
)

SELF_DISTILLATION_TEST = "tests/test_self_distillation_reference.py"
SELF_DISTILLATION_SOURCE = (
    "nmboffi/flow-maps, read as its public import roni-dot/regularized-loss-flow-maps "
    "at afdaefa (py/common/losses.py)"
)

SELF_DISTILLATION_REFERENCE = {
    "loss": LogVariance(source="model"),
    "noise_scale": 0.5,
}
"""The `preset="reference"` of LSD, PSD and ESD: the weighting and the noise of
their authors' code."""


def compared_by_formula(
    code: str,
    test: str = "tests/test_reference_options.py",
    under: str = "preset='reference'",
) -> str:
    """`MethodInfo.compared_with` for a spec whose loss `under` a setting (its
    reference preset, or its defaults) was checked against the formulas of `code`
    by `test`."""
    return (
        f"{code}: {under}, the loss and its gradient equal the formulas of that "
        f"code, recomputed row by row in float64 ({test})"
    )


def anchor(
    times: AbstractTimeSampler = Equal(Uniform()),
    loss: AbstractLoss = SquaredError(),
    **kwargs,
) -> Term:
    """The flow-matching anchor `V(x, s, s) - v(x, s)` of self-distillation (with the
    conditional velocity by default)."""
    return Term("anchor", rules.flow_matching(**kwargs), times, loss)


def shortcut_anchor(grid: int | None, loss: AbstractLoss) -> Term:
    """Shortcut models' flow-matching rows: the plain anchor without a `grid`;
    with one, their code's `V(x, s, s - 1/grid) - (eps - x0)` on the `grid`-point
    grid ([`fmcalc.GridStep`][]), a bias of `O(1/grid)` that the term declares."""
    if grid is None:
        return anchor(loss=loss)
    return Term(
        "anchor",
        rules.flow_matching(at="target"),
        GridStep(grid),
        loss,
        biased=f"the flow-matching rows ask for the step 1/{grid}, not 0: the exact "
        "map's V there is the mean velocity over the step, not the velocity at s",
    )


__all__ = [
    "SELF_DISTILLATION_CODE",
    "SELF_DISTILLATION_REFERENCE",
    "SELF_DISTILLATION_SOURCE",
    "SELF_DISTILLATION_TEST",
    "compared_by_formula",
    "shortcut_anchor",
    "F",
    "F_aux",
    "F_ema",
    "V",
    "V_aux",
    "V_ema",
    "anchor",
    "s",
    "t",
    "u",
    "x",
]
