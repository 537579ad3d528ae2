"""Directional derivatives of networks and flow maps."""

from .._derivative import JVP, AbstractDerivative, FiniteDifference
from ._core import AbstractExpr, Kind, _is_zero, _wrap
from ._functions import Indicator
from ._networks import Call, FlowMap, Network, _check_point


class Derivative(AbstractExpr):
    """The directional derivative of a network or flow map at a point.

    `D(f, at=(x, a, b), along=(dx, da, db), by=strategy)` is
    `d/dh f(x + h dx, a + h da, b + h db) |_{h=0}`: for example the Eulerian
    `∂_s V + ∇_x V · v` is `D(V, at=(x, s, t), along=(v, 1, 0))` and the Lagrangian
    `∂_t F` is `D(F, at=(x, s, t), along=(0, 0, 1))`.

    - With [`fmcalc.JVP`][] the derivative of a network is one `jax.jvp`, whose
      primal is shared with every `f(at)` elsewhere in the residual; the derivative
      of a flow map is expanded by the product rule,
      `dF = dx + (db - da) V + (b - a) dV`, so that it too costs one JVP of `V`.
    - With [`fmcalc.FiniteDifference`][] it is the stencil `Σ w f(at + o h along) / h`
      of plain calls; the base point `f(at)` of the forward scheme is shared too.
    """

    function: Network | FlowMap
    at: tuple[AbstractExpr, AbstractExpr, AbstractExpr]
    along: tuple[AbstractExpr, AbstractExpr, AbstractExpr]
    strategy: AbstractDerivative

    def __check_init__(self):
        if not isinstance(self.function, Network | FlowMap):
            raise TypeError(
                "D(f, ...) differentiates a `Network` or a `FlowMap`; got "
                f"{type(self.function).__name__}."
            )
        if not isinstance(self.strategy, JVP | FiniteDifference):
            raise TypeError(
                "`by` must be a derivative strategy (fmcalc.JVP() or "
                f"fmcalc.FiniteDifference(step)); got {self.strategy!r}."
            )
        _check_point("D(f, at=...)", *self.at)
        dx, da, db = self.along
        if not (dx.kind == "vector" or _is_zero(dx)):
            raise TypeError(
                f"The tangent of x must be a vector (or 0); got the time `{dx}`."
            )
        for arg in (da, db):
            if arg.kind != "time":
                raise TypeError(f"Time tangents must be times; got the vector `{arg}`.")

    @property
    def lowered(self) -> AbstractExpr | None:
        """An equivalent expression of simpler nodes, or `None` for a JVP of a
        network (the interpreter's primitive)."""
        x, a, b = self.at
        dx, da, db = self.along
        if isinstance(self.strategy, FiniteDifference):
            if not (_is_zero(da) or _is_zero(db)):
                # At a corner (s = 1, t = 0 along (1, 1)) no step along both times
                # stays in [0, 1]; along one time at a time, one does.
                zero = _wrap(0.0)
                first = Derivative(
                    self.function, self.at, (dx, da, zero), self.strategy
                )
                second = Derivative(
                    self.function, self.at, (zero, zero, db), self.strategy
                )
                return first + second
            h = self.strategy.step
            moving = [(p, d) for p, d in ((a, da), (b, db)) if not _is_zero(d)]

            def fits(direction: float) -> AbstractExpr | int:
                # 1 where one step in `direction` keeps every time in [0, 1]: the
                # stencil is chosen at run time, per example, from these.
                both: AbstractExpr | int = 1
                for p, d in moving:
                    inside = Indicator(p + (direction * h) * d, 0.0, 1.0)
                    both = inside if isinstance(both, int) else both * inside
                return both

            terms = []
            for offset, weight in self.strategy.stencil(fits(1.0), fits(-1.0)):
                if isinstance(offset, float | int) and offset == 0:
                    point = (x, a, b)
                else:
                    c = offset * h
                    point = tuple(
                        p if _is_zero(d) else p + c * d
                        for p, d in zip((x, a, b), (dx, da, db), strict=True)
                    )
                numeric = isinstance(weight, float | int)
                scale = weight / h if numeric else weight * (1 / h)
                terms.append(scale * self.function(*point))
            out = terms[0]
            for term in terms[1:]:
                out = out + term
            return out
        if isinstance(self.function, FlowMap):
            network = self.function.network
            dV = Derivative(network, self.at, self.along, self.strategy)
            out = (db - da) * network(x, a, b) + (b - a) * dV
            return out if _is_zero(dx) else dx + out
        return None

    @property
    def kind(self) -> Kind:
        return "vector"

    @property
    def children(self):
        lowered = self.lowered
        return (lowered,) if lowered is not None else (*self.at, *self.along)

    @property
    def key(self):
        lowered = self.lowered
        if lowered is not None:
            return lowered.key
        network = self.function
        assert isinstance(network, Network)
        return (
            "jvp",
            (network.role, network.unconditional),
            tuple(e.key for e in self.at),
            tuple(e.key for e in self.along),
        )

    @property
    def primal(self) -> Call:
        """The call `f(at)` this JVP computes alongside its tangent."""
        assert isinstance(self.function, Network)
        return self.function(*self.at)

    def _format(self):
        f = self.function.name
        at = ", ".join(str(e) for e in self.at)
        along = ", ".join(str(e) for e in self.along)
        by = (
            ""
            if isinstance(self.strategy, JVP)
            else f"~{_strategy_name(self.strategy)}"
        )
        return f"D{by}[{f}]({at})·({along})"


def _strategy_name(strategy: AbstractDerivative) -> str:
    if isinstance(strategy, FiniteDifference):
        return f"fd[{strategy.scheme}, h={strategy.step:g}]"
    return type(strategy).__name__


def D(
    function: Network | FlowMap,
    *,
    at: tuple,
    along: tuple,
    by: AbstractDerivative = JVP(),
) -> Derivative:
    """Directional derivative of a network or flow map; see [`fmcalc.Derivative`][].

    **Arguments:**

    - `function`: a [`fmcalc.Network`][] (`V`) or [`fmcalc.FlowMap`][] (`F`).
    - `at`: the point `(x, a, b)`, expressions.
    - `along`: the tangent `(dx, da, db)`; numbers are allowed (`0`, `1`).
    - `by`: the strategy, [`fmcalc.JVP`][] (default) or [`fmcalc.FiniteDifference`][].

    **Returns:** the derivative as an expression (shaped like `x`).

    !!! Example

        ```python
        V = fmcalc.Network()
        v = fmcalc.ConditionalVelocity()
        x, s, t = fmcalc.X, fmcalc.S, fmcalc.T
        dV = fmcalc.D(V, at=(x, s, t), along=(v(x, s), 1, 0))  # ∂_s V + ∇_x V · v
        ```
    """
    if len(at) != 3 or len(along) != 3:
        raise ValueError(
            f"`at` and `along` must each have three entries (x, a, b); got {len(at)} "
            f"and {len(along)}."
        )
    return Derivative(
        function,
        tuple(_wrap(e) for e in at),  # pyright: ignore[reportArgumentType]
        tuple(_wrap(e) for e in along),  # pyright: ignore[reportArgumentType]
        by,
    )
