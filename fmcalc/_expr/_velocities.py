"""Sources of the instantaneous velocity `v(x, t)` and their calls."""

import abc
from typing import TYPE_CHECKING, Any, ClassVar

import equinox as eqx

from ._core import AbstractExpr, Kind, S, X, _wrap
from ._networks import Network


# Pyright reads `AbstractClassVar` as a `ClassVar` only when imported so, in the
# module that uses it (equinox's docs; a re-export loses it).
if TYPE_CHECKING:
    from typing import ClassVar as AbstractClassVar
else:
    from equinox import AbstractClassVar


class AbstractVelocity(eqx.Module):
    """A source of the instantaneous velocity `v(x, t)` used in a residual.

    Calling `v(x, t)` with expressions builds a [`fmcalc.VelocityCall`][] node (or,
    for [`fmcalc.Diagonal`][], the network call `V(x, t, t)`).

    Each source declares `network_cost`: forward passes of a network per call.
    """

    network_cost: AbstractClassVar[int]

    @property
    @abc.abstractmethod
    def name(self) -> str: ...

    def __call__(self, x, t) -> AbstractExpr:
        x, t = _wrap(x), _wrap(t)
        if x.kind != "vector" or t.kind != "time":
            raise TypeError(
                f"A velocity is called as v(x, t) with a vector and a time; got "
                f"v({x}, {t})."
            )
        return VelocityCall(self, x, t)


class Teacher(AbstractVelocity):
    """A pre-trained velocity `v(x, t)` passed as `teacher=` at evaluation.

    Any per-example callable works, e.g. the exact `flow.velocity` of an analytic
    flow, or a frozen diffusion model. It is never differentiated with respect to
    its parameters (gradients can still flow through its input).

    **Arguments:**

    - `symbol`: printed name (default `"v"`).
    - `unconditional`: call the teacher with `cond=None`.
    """

    symbol: str = eqx.field(static=True, default="v")
    unconditional: bool = eqx.field(static=True, default=False)
    network_cost: ClassVar[int] = 1

    @property
    def name(self) -> str:
        return self.symbol

    def without_condition(self) -> "Teacher":
        """The same teacher called with `cond=None` (its unconditional velocity)."""
        return Teacher(self.symbol, unconditional=True)


class ConditionalVelocity(AbstractVelocity):
    """The conditional velocity `eps - x0`, an unbiased sample of `v(x_s, s)`.

    `E[eps - x0 | x_s] = v(x_s, s)`, so it may replace the marginal velocity only at
    the point `(x_s, s)` and only where the update stays affine in it (see
    [`fmcalc.validate`][]). Calling it anywhere else raises at construction:
    `ConditionalVelocity()(F(x, s, t), t)` would be biased.

    **Arguments:** none.
    """

    network_cost: ClassVar[int] = 0

    @property
    def name(self) -> str:
        return "v_c"

    def __call__(self, x, t) -> AbstractExpr:
        x, t = _wrap(x), _wrap(t)
        if x.key != X.key or t.key != S.key:
            raise ValueError(
                f"The conditional velocity eps - x0 was called at ({x}, {t}); it is an "
                "unbiased estimate of the marginal velocity only at (x, s), the noisy "
                "input and its own time: E[eps - x0 | x_s] = v(x_s, s). At any other "
                "point its conditional expectation is not the marginal velocity there, "
                "so the training update would be biased (this is why Lagrangian "
                "residuals, which need v(F(x, s, t), t), cannot learn "
                "marginal-from-conditional). Use a teacher or the model's own diagonal "
                "(`Diagonal(Network())`) at that point instead."
            )
        return VelocityCall(self, x, t)


class Analytic(AbstractVelocity):
    """The exact velocity of an analytic flow (e.g. `fmcalc.flows.Gaussian`),
    embedded in the residual itself.

    **Arguments:**

    - `flow`: any object with a per-example `velocity(x, t)` method.
    - `symbol`: printed name (default `"v*"`).
    """

    flow: Any
    symbol: str = eqx.field(static=True, default="v*")
    network_cost: ClassVar[int] = 0

    @property
    def name(self) -> str:
        return self.symbol


class Diagonal(AbstractVelocity):
    """The model's own velocity: the diagonal `V(x, t, t) = v(x, t)` of a network.

    Self-distillation uses it in place of a teacher. Calling `Diagonal(V)(x, t)` is
    exactly the network call `V(x, t, t)`.

    **Arguments:**

    - `network`: the [`fmcalc.Network`][] whose diagonal is used (default online).
    """

    network: Network = Network()
    network_cost: ClassVar[int] = 1

    @property
    def name(self) -> str:
        return self.network.name

    def __call__(self, x, t) -> AbstractExpr:
        x, t = _wrap(x), _wrap(t)
        return self.network(x, t, t)


class VelocityCall(AbstractExpr):
    """`v(x, t)` from a velocity source."""

    source: AbstractVelocity
    x: AbstractExpr
    t: AbstractExpr

    @property
    def kind(self) -> Kind:
        return "vector"

    @property
    def children(self):
        return (self.x, self.t)

    @property
    def key(self):
        if isinstance(self.source, Analytic):
            source_key = ("analytic", id(self.source.flow))
        else:
            source_key = (type(self.source).__name__, self.unconditional)
        return ("velocity", source_key, self.x.key, self.t.key)

    @property
    def unconditional(self) -> bool:
        return bool(getattr(self.source, "unconditional", False))

    def _format(self):
        bar = " | ∅" if self.unconditional else ""
        return f"{self.source.name}({self.x}, {self.t}{bar})"
