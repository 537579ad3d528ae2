from typing import NamedTuple

from .._evaluate import primitive_jvps
from .._expr import AbstractExpr, Call, Derivative, StopGradient, VelocityCall, walk
from .._validate import carries_gradient


class CostEstimate(NamedTuple):
    """Static cost of a training step on a residual, in forward-pass equivalents (FPE)
    of one network.

    - `forward`: network forward passes (a JVP with its primal counts 2).
    - `backward`: backward passes (2 per forward that gradients flow through, 4 for
      a JVP whose tangent is backpropagated).
    - `total`: `forward + backward`, the figure compared with the compiled program.
    """

    forward: float
    backward: float

    @property
    def total(self) -> float:
        return self.forward + self.backward


def estimate(residual: AbstractExpr) -> CostEstimate:
    """Forward-pass equivalents of a training step on `residual`, read off the tree.

    The usual accounting (Dieleman 2026, "Learning the integral of a diffusion
    model"): a forward pass is 1, its backward 2, a JVP with its primal 2 and the
    backward through a JVP 4. Each distinct network call counts once; the primal of
    a JVP is free wherever the same call appears; `k` JVPs at one point share their
    primal (`1 + k` forward, and 2 more backward per extra differentiated tangent);
    teacher calls count as one network forward each; the conditional velocity and
    analytic velocities are free. Gradients flow into every network call reachable
    from the root outside `sg[...]` that depends on the online network (also through
    a frozen teacher's input).

    **Arguments:**

    - `residual`: the residual expression.

    **Returns:** a [`fmcalc.cost.CostEstimate`][].
    """
    groups = primitive_jvps(residual)
    calls: dict[tuple, AbstractExpr] = {}

    def collect(node):
        if isinstance(node, Call) and node.key not in groups:
            calls[node.key] = node
        elif isinstance(node, VelocityCall) and node.source.network_cost:
            calls[node.key] = node

    walk(residual, collect)

    differentiated: set[tuple] = set()

    def mark(node):
        if isinstance(node, StopGradient):
            return
        if isinstance(node, Call | VelocityCall | Derivative) and carries_gradient(
            node
        ):
            differentiated.add(node.key)
        for child in node.children:
            mark(child)

    mark(residual)

    forward = float(len(calls))
    backward = 2.0 * len(calls.keys() & differentiated)
    for primal_key, group in groups.items():
        forward += 1 + len(group)
        tangents = sum(d.key in differentiated for d in group)
        if tangents:
            backward += 2 + 2 * tangents
        elif primal_key in differentiated:
            backward += 2
    return CostEstimate(forward=forward, backward=backward)
