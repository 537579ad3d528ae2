"""Leaves, arithmetic and stop-gradients: the nodes every residual is built from."""

import abc
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import equinox as eqx


# Pyright reads `AbstractClassVar` as a `ClassVar` only when imported so, in the
# module that uses it (equinox's docs; a re-export loses it).
if TYPE_CHECKING:
    from typing import ClassVar as AbstractClassVar
else:
    from equinox import AbstractClassVar


Kind = Literal["vector", "time"]


def _wrap(value: Any) -> "AbstractExpr":
    if isinstance(value, AbstractExpr):
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(
            f"Cannot use {value!r} (type {type(value).__name__}) in a residual; "
            "expected an expression (`x`, `s`, `t`, `u`, a network or velocity call, "
            "...) or a Python number."
        )
    return Constant(float(value))


def _precedence(expr: "AbstractExpr") -> int:
    return {Add: 1, Sub: 1, Neg: 2, Mul: 2, Div: 2}.get(type(expr), 3)


class AbstractExpr(eqx.Module):
    """A node of a residual expression tree.

    Nodes are immutable and compared structurally (`expr.key`), so two occurrences
    of `V(x, s, t)` are one network call. Arithmetic (`+`, `-`, `*`, `/`, unary `-`)
    with other nodes or Python numbers builds new nodes.
    """

    @property
    @abc.abstractmethod
    def kind(self) -> Kind:
        """`"vector"` (shaped like `x`) or `"time"` (a scalar)."""

    @property
    @abc.abstractmethod
    def children(self) -> tuple["AbstractExpr", ...]:
        """The sub-expressions this node is computed from."""

    @property
    @abc.abstractmethod
    def key(self) -> tuple:
        """A hashable structural key: equal keys compute equal values."""

    @abc.abstractmethod
    def _format(self) -> str: ...

    def __str__(self) -> str:
        return self._format()

    def __add__(self, other):
        return Add(self, _wrap(other))

    def __radd__(self, other):
        return Add(_wrap(other), self)

    def __sub__(self, other):
        return Sub(self, _wrap(other))

    def __rsub__(self, other):
        return Sub(_wrap(other), self)

    def __mul__(self, other):
        return Mul(self, _wrap(other))

    def __rmul__(self, other):
        return Mul(_wrap(other), self)

    def __truediv__(self, other):
        return Div(self, _wrap(other))

    def __neg__(self):
        return Neg(self)


# Leaves ------------------------------------------------------------------------------


class _Leaf(AbstractExpr):
    """A node computed from no other node: a time, unless it says otherwise."""

    @property
    def kind(self) -> Kind:
        return "time"

    @property
    def children(self) -> tuple[AbstractExpr, ...]:
        return ()


class _Unary(AbstractExpr):
    """A node computed from one other node, `operand`: of the operand's kind,
    unless it says otherwise."""

    operand: eqx.AbstractVar[AbstractExpr]

    @property
    def kind(self) -> Kind:
        return self.operand.kind

    @property
    def children(self) -> tuple[AbstractExpr, ...]:
        return (self.operand,)


class Variable(_Leaf):
    """A leaf: `x` (the noisy input `x_s`), or one of the times `s`, `t`, `u`.

    Use the module-level instances [`fmcalc.X`][], [`fmcalc.S`][], [`fmcalc.T`][],
    [`fmcalc.U`][].
    """

    name: Literal["x", "s", "t", "u"] = eqx.field(static=True)

    def __check_init__(self):
        if self.name not in ("x", "s", "t", "u"):
            raise ValueError(
                f"Unknown variable {self.name!r}; expected 'x' (the noisy input x_s), "
                "'s' (source time), 't' (target time) or 'u' (intermediate time)."
            )

    @property
    def kind(self) -> Kind:
        return "vector" if self.name == "x" else "time"

    @property
    def key(self):
        return ("var", self.name)

    def _format(self):
        return self.name


class Constant(_Leaf):
    """A scalar constant. Python numbers in expressions become constants."""

    value: float = eqx.field(static=True)

    @property
    def key(self):
        return ("const", self.value)

    def _format(self):
        return f"{self.value:g}"


X = Variable("x")
S = Variable("s")
T = Variable("t")
U = Variable("u")


def _is_zero(expr: AbstractExpr) -> bool:
    return isinstance(expr, Constant) and expr.value == 0.0


# Arithmetic --------------------------------------------------------------------------


class _Binary(AbstractExpr):
    left: AbstractExpr
    right: AbstractExpr
    symbol: AbstractClassVar[str]

    @property
    def children(self):
        return (self.left, self.right)

    @property
    def key(self):
        return (type(self).__name__, self.left.key, self.right.key)

    @property
    def kind(self) -> Kind:
        if "vector" in (self.left.kind, self.right.kind):
            return "vector"
        return "time"

    def _format(self):
        p = _precedence(self)
        left = self.left._format()
        right = self.right._format()
        if _precedence(self.left) < p:
            left = f"({left})"
        # Right operands of `-` and `/` need parentheses at equal precedence too.
        right_strict = isinstance(self, Sub | Div)
        if _precedence(self.right) < p or (
            right_strict and _precedence(self.right) == p
        ):
            right = f"({right})"
        return f"{left} {self.symbol} {right}"


class Add(_Binary):
    """`left + right` (both vectors or both times)."""

    symbol: ClassVar[str] = "+"

    def __check_init__(self):
        _check_same_kind(self, "add")


class Sub(_Binary):
    """`left - right` (both vectors or both times)."""

    symbol: ClassVar[str] = "-"

    def __check_init__(self):
        _check_same_kind(self, "subtract")


class Mul(_Binary):
    """`left * right`: a time scales a vector; two vectors multiply elementwise."""

    symbol: ClassVar[str] = "*"


class Div(_Binary):
    """`left / right`, where `right` is a time."""

    symbol: ClassVar[str] = "/"

    def __check_init__(self):
        if self.right.kind != "time":
            raise TypeError(
                f"Can only divide by a time (scalar) expression; `{self.right}` is a "
                "vector."
            )


def _check_same_kind(node: _Binary, verb: str) -> None:
    if node.left.kind != node.right.kind:
        raise TypeError(
            f"Cannot {verb} a {node.left.kind} (`{node.left}`) and a "
            f"{node.right.kind} (`{node.right}`); scale a vector by a time with `*`."
        )


class Neg(_Unary):
    """`-operand`."""

    operand: AbstractExpr

    @property
    def key(self):
        return ("neg", self.operand.key)

    def _format(self):
        inner = self.operand._format()
        return f"-({inner})" if _precedence(self.operand) <= 2 else f"-{inner}"


class StopGradient(_Unary):
    """`sg[operand]`: the value of `operand`, with no gradient flowing through it."""

    operand: AbstractExpr

    @property
    def key(self):
        return ("sg", self.operand.key)

    def _format(self):
        return f"sg[{self.operand._format()}]"


def sg(expr: AbstractExpr) -> AbstractExpr:
    """Stop-gradient: `sg[expr]` has the value of `expr` and blocks backpropagation.

    **Arguments:**

    - `expr`: any expression.

    **Returns:** a [`fmcalc.StopGradient`][] node (or `expr` itself if it already is
    one, or holds no network call).
    """
    expr = _wrap(expr)
    if isinstance(expr, StopGradient | Variable | Constant):
        return expr
    return StopGradient(expr)


def walk(expr: AbstractExpr, visit: Callable[[AbstractExpr], None]) -> None:
    """Call `visit` on every node of `expr` (lowered forms included), parents first."""
    visit(expr)
    for child in expr.children:
        walk(child, visit)
