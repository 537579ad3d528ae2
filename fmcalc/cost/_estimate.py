from typing import NamedTuple

from .._evaluate import primitive_jvps
from .._expr import AbstractExpr, Call, Derivative, Network, VelocityCall, walk
from .._validate import differentiated


class CostEstimate(NamedTuple):
    """Static cost of a training step on a residual, in forward-pass equivalents (FPE)
    of one network.

    - `forward`: network forward passes (a JVP with its primal counts 2).
    - `backward`: backward passes (2 per online forward that gradients flow through,
      4 for an online JVP whose tangent is backpropagated; half that for a network
      whose weights get no gradient, where only the input gradient is computed).
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
    a backward through a network other than the online one (an EMA copy, a teacher
    at a point that depends on the online network) computes only the input gradient
    and counts half; teacher calls count as one network forward each; the
    conditional velocity and analytic velocities are free. Gradients flow into every
    network call reachable from the root outside `sg[...]` that depends on the
    online network (also through a frozen teacher's input).

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

    through = differentiated(residual)
    forward = float(len(calls))
    backward = sum(_backward(calls[key]) for key in calls.keys() & through)
    for primal_key, group in groups.items():
        forward += 1 + len(group)
        tangents = sum(d.key in through for d in group)
        if tangents or primal_key in through:
            backward += _backward(group[0]) * (1 + tangents)
    return CostEstimate(forward=forward, backward=backward)


def _backward(node: AbstractExpr) -> float:
    """Backward cost of one pass through `node`: 2 for the online network (input and
    weight gradients), 1 for any other network, whose weights get no gradient."""
    network = node.function if isinstance(node, Derivative) else node
    if isinstance(network, Call):
        network = network.network
    online = isinstance(network, Network) and network.role == "online"
    return 2.0 if online else 1.0
