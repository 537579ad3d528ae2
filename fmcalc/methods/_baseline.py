"""The baseline every flow map method is measured against."""

from .. import _rules as rules
from .._losses import AbstractLoss, SquaredError
from .._method import Method, Term
from .._times import AbstractTimeSampler, Equal, LogitNormal
from ._registry import register


@register(
    "flow-matching",
    full_name="Flow matching",
    citation='Lipman, Chen, Ben-Hamu, Nickel, Le, "Flow Matching for Generative '
    'Modeling", ICLR 2023; Liu, Gong, Liu, "Flow Straight and Fast: Learning to '
    'Generate and Transfer Data with Rectified Flow", ICLR 2023',
    summary="The baseline: learn the marginal velocity v(x, t) = V(x, t, t) from "
    "eps - x0, and sample with many Euler steps.",
    dieleman_cost=3,
)
def flow_matching(
    *,
    times: AbstractTimeSampler = Equal(LogitNormal(0.0, 1.0)),
    loss: AbstractLoss = SquaredError(),
) -> Method:
    """Flow matching (Lipman et al. 2023; Liu et al. 2023), the baseline:
    `R = V(x, s, s) - (eps - x0)`; its minimiser is the marginal velocity, which a
    flow map holds on its diagonal. Sample with many Euler steps of `V(x, t, t)`."""
    term = Term("flow-matching", rules.flow_matching(), times, loss)
    return Method(
        "flow-matching", "diagonal", "marginal-from-conditional", "V", (term,)
    )
