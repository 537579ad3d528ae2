"""Network slots and flow maps, and the calls they build."""

import equinox as eqx

from ._core import AbstractExpr, Kind, _wrap


_ROLES = ("online", "ema", "aux")


class Network(eqx.Module):
    """A network slot of a residual: a model `V(x, a, b)` supplied at evaluation.

    - `role="online"`: the model being trained (gradients flow into it unless the
      call sits under [`fmcalc.sg`][]).
    - `role="ema"`: an exponential moving average of the online parameters, passed
      as `ema=` at evaluation; never differentiated.
    - `role="aux"`: an auxiliary network (e.g. a partial flow map teacher, or
      FreeFlow's denoiser), passed as `aux=`.

    Calling `V(x, a, b)` with expressions builds a [`fmcalc.Call`][] node.

    **Arguments:**

    - `role`: one of `"online"`, `"ema"`, `"aux"`.
    - `symbol`: the name used when printing (default `"V"`, `"V_ema"`, `"V_aux"`).
    - `unconditional`: call the network without the batch's conditioning
      (`cond=None`), as classifier-free guidance needs; printed as `V(x, a, b | ∅)`.
    """

    role: str = eqx.field(static=True, default="online")
    symbol: str = eqx.field(static=True, default="")
    unconditional: bool = eqx.field(static=True, default=False)

    def __check_init__(self):
        if self.role not in _ROLES:
            raise ValueError(
                f"Unknown network role {self.role!r}; expected one of {_ROLES}."
            )

    @property
    def name(self) -> str:
        if self.symbol:
            return self.symbol
        return "V" if self.role == "online" else f"V_{self.role}"

    def __call__(self, x, a, b) -> "Call":
        return Call(self, _wrap(x), _wrap(a), _wrap(b))

    def without_condition(self) -> "Network":
        """The same network called with `cond=None`."""
        return Network(self.role, self.symbol, unconditional=True)


class FlowMap(eqx.Module):
    """The flow map of a network: `F(x, a, b) = x + (b - a) V(x, a, b)`.

    Calling it builds the expression (printed as `F(x, a, b)`); it can also be the
    function differentiated by [`fmcalc.D`][].

    **Arguments:**

    - `network`: the [`fmcalc.Network`][] giving the average velocity `V`.
    - `symbol`: printed name (default `"F"`, or `"F_ema"`, `"F_aux"` by role).
    """

    network: Network = Network()
    symbol: str = eqx.field(static=True, default="")

    @property
    def name(self) -> str:
        if self.symbol:
            return self.symbol
        role = self.network.role
        return "F" if role == "online" else f"F_{role}"

    def __call__(self, x, a, b) -> "FlowMapCall":
        return FlowMapCall(self, _wrap(x), _wrap(a), _wrap(b))


def _check_point(what: str, x: AbstractExpr, a: AbstractExpr, b: AbstractExpr):
    if x.kind != "vector":
        raise TypeError(
            f"The first argument of {what} must be a vector (the point `x`); got the "
            f"time `{x}`. Arguments are ordered (x, source time, target time)."
        )
    for name, arg in (("second", a), ("third", b)):
        if arg.kind != "time":
            raise TypeError(
                f"The {name} argument of {what} must be a time; got the vector "
                f"`{arg}`. Arguments are ordered (x, source time, target time)."
            )


class Call(AbstractExpr):
    """A network forward pass `V(x, a, b)`: one forward pass per distinct call."""

    network: Network
    x: AbstractExpr
    a: AbstractExpr
    b: AbstractExpr

    def __check_init__(self):
        _check_point(f"{self.network.name}(x, a, b)", self.x, self.a, self.b)

    @property
    def kind(self) -> Kind:
        return "vector"

    @property
    def children(self):
        return (self.x, self.a, self.b)

    @property
    def key(self):
        network = (self.network.role, self.network.unconditional)
        return ("call", network, self.x.key, self.a.key, self.b.key)

    def _format(self):
        bar = " | ∅" if self.network.unconditional else ""
        return f"{self.network.name}({self.x}, {self.a}, {self.b}{bar})"


class FlowMapCall(AbstractExpr):
    """`F(x, a, b)`, evaluated as `x + (b - a) V(x, a, b)`."""

    flow_map: FlowMap
    x: AbstractExpr
    a: AbstractExpr
    b: AbstractExpr

    def __check_init__(self):
        _check_point(f"{self.flow_map.name}(x, a, b)", self.x, self.a, self.b)

    @property
    def lowered(self) -> AbstractExpr:
        return self.x + (self.b - self.a) * self.flow_map.network(
            self.x, self.a, self.b
        )

    @property
    def kind(self) -> Kind:
        return "vector"

    @property
    def children(self):
        return (self.lowered,)

    @property
    def key(self):
        return self.lowered.key

    def _format(self):
        return f"{self.flow_map.name}({self.x}, {self.a}, {self.b})"
