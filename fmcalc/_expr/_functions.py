"""Scalars from the batch or the training step, and elementwise functions."""

import equinox as eqx

from ._core import AbstractExpr, Kind, _Leaf, _Unary


_TIME_FUNCTIONS = ("sqrt", "cos", "sin", "exp", "log", "sigmoid")


class Param(_Leaf):
    """A named scalar supplied at evaluation (`params={name: value}`), for
    hyperparameters that follow a curriculum (a tangent warm-up factor, a guidance
    scale): a method evaluates its schedules at the training step."""

    name: str = eqx.field(static=True)

    @property
    def key(self):
        return ("param", self.name)

    def _format(self):
        return self.name


class HasLabel(_Leaf):
    """`1` for an example with a class label (`cond >= 0`), `0` for an unlabelled
    or label-dropped one (`cond` negative or `None`)."""

    @property
    def key(self):
        return ("has_label",)

    def _format(self):
        return "[y ≠ ∅]"


class Indicator(_Unary):
    """`1` where `low <= operand <= high`, else `0` (e.g. a guidance interval)."""

    operand: AbstractExpr
    low: float = eqx.field(static=True)
    high: float = eqx.field(static=True)

    def __check_init__(self):
        if self.operand.kind != "time":
            raise TypeError(
                f"An indicator takes a time; got the vector `{self.operand}`."
            )
        if not self.low <= self.high:
            raise ValueError(
                "Indicator interval must have low <= high; got "
                f"[{self.low}, {self.high}]."
            )

    @property
    def kind(self) -> Kind:
        return "time"

    @property
    def key(self):
        return ("indicator", self.low, self.high, self.operand.key)

    def _format(self):
        return f"[{self.low:g} <= {self.operand} <= {self.high:g}]"


class TimeFunction(AbstractExpr):
    """An elementwise function of a time expression: one of `sqrt`, `cos`, `sin`,
    `exp`, `log`, `sigmoid`."""

    function: str = eqx.field(static=True)
    operand: AbstractExpr

    def __check_init__(self):
        if self.function not in _TIME_FUNCTIONS:
            raise ValueError(
                f"Unknown time function {self.function!r}; expected one of "
                f"{_TIME_FUNCTIONS}."
            )
        if self.operand.kind != "time":
            raise TypeError(
                f"`{self.function}` applies to times; got the vector `{self.operand}`."
            )

    @property
    def kind(self) -> Kind:
        return "time"

    @property
    def children(self):
        return (self.operand,)

    @property
    def key(self):
        return ("fn", self.function, self.operand.key)

    def _format(self):
        return f"{self.function}({self.operand})"


class Normalize(_Unary):
    """`operand / (‖operand‖ + c)`: the tangent normalisation of sCM and AYF."""

    operand: AbstractExpr
    c: float = eqx.field(static=True)

    def __check_init__(self):
        if self.operand.kind != "vector":
            raise TypeError(f"Normalize takes a vector; got the time `{self.operand}`.")
        if not self.c > 0:
            raise ValueError(f"Normalize needs c > 0; got {self.c}.")

    @property
    def kind(self) -> Kind:
        return "vector"

    @property
    def key(self):
        return ("normalize", self.c, self.operand.key)

    def _format(self):
        return f"normalize[{self.operand}; {self.c:g}]"


class Clip(_Unary):
    """`operand` clipped elementwise to `[low, high]` (shortcut models' magnitude
    clipping, FACM's clamp)."""

    operand: AbstractExpr
    low: float = eqx.field(static=True)
    high: float = eqx.field(static=True)

    def __check_init__(self):
        if not self.low < self.high:
            raise ValueError(f"Clip needs low < high; got [{self.low}, {self.high}].")

    @property
    def key(self):
        return ("clip", self.low, self.high, self.operand.key)

    def _format(self):
        return f"clip[{self.operand}; {self.low:g}, {self.high:g}]"
