import abc
import contextlib
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PyTree

from ._warnings import FiniteDifferenceStepWarning, warn as warn_from_user


# Pyright reads `AbstractClassVar` as a `ClassVar` only when imported so, in the
# module that uses it (equinox's docs; a re-export loses it).
if TYPE_CHECKING:
    from typing import ClassVar as AbstractClassVar
else:
    from equinox import AbstractClassVar


class AbstractDerivative(eqx.Module):
    """How a directional derivative `d/dh f(p + h d) |_{h=0}` is computed.

    Concrete strategies: [`fmcalc.JVP`][] (forward-mode, exact) and
    [`fmcalc.FiniteDifference`][] (a stencil of plain evaluations). Each declares

    - `exact`: whether the derivative is exact (up to round-off);
    - `order`: the order of its truncation error in the step (`None` if exact).

    Calling a strategy as `strategy(fn, primals, tangents)` returns `(f(p), df)`, where
    `primals` and `tangents` are tuples of the same structure (one entry per argument
    of `fn`); the primal comes free with the derivative and should be reused.
    """

    exact: AbstractClassVar[bool]

    @property
    @abc.abstractmethod
    def order(self) -> int | None:
        """The order of the truncation error in the step (`None` if exact)."""

    @abc.abstractmethod
    def __call__(
        self, fn: Callable[..., Array], primals: tuple, tangents: tuple
    ) -> tuple[Array, Array]:
        """Return `(fn(*primals), directional derivative along tangents)`."""


class JVP(AbstractDerivative):
    """Exact directional derivative by forward-mode autodiff (`jax.jvp`).

    One call gives the primal and the tangent together for about two forward passes;
    the primal is the prediction wherever the same call appears elsewhere, so it is
    never recomputed. Backpropagating through the tangent (no stop-gradient) is a
    second-order derivative and costs about four more forward passes.

    **Arguments:** none.
    """

    exact: ClassVar[bool] = True

    @property
    def order(self) -> None:
        return None

    def __call__(self, fn, primals, tangents):
        tangents = tuple(
            jnp.broadcast_to(jnp.asarray(d, jnp.result_type(p)), jnp.shape(p))
            for p, d in zip(primals, tangents, strict=True)
        )
        with forward_mode_hint():
            return jax.jvp(fn, primals, tangents)


@contextlib.contextmanager
def forward_mode_hint() -> Iterator[None]:
    """Add to JAX's error for a JVP through a `jax.custom_vjp` network that a finite
    difference works there."""
    try:
        yield
    except TypeError as error:
        # Nested contexts (a strategy inside the interpreter's) add it once.
        if "custom_vjp" not in str(error) or "fmcalc.JVP()" in str(error):
            raise
        raise TypeError(
            f"{error}\n\nThe network defines a `jax.custom_vjp`, which has no forward "
            "mode, so `fmcalc.JVP()` cannot differentiate it. A finite difference "
            "needs only plain calls and works here: e.g. "
            "`method.replace(derivative=fmcalc.FiniteDifference(1e-3))`."
        ) from error


def _only(tangents: tuple, times: list[int], keep: int, *, with_rest: bool) -> tuple:
    """`tangents` with every time in `times` but `keep` set to 0, and the other
    arguments' tangents kept only `with_rest`."""
    return tuple(
        d if i == keep or (with_rest and i not in times) else 0
        for i, d in enumerate(tangents)
    )


def _dtype_of(primals: PyTree) -> jnp.dtype:
    leaves = [x for x in jax.tree.leaves(primals) if eqx.is_array_like(x)]
    floats = [
        jnp.result_type(x)
        for x in leaves
        if jnp.issubdtype(jnp.result_type(x), jnp.floating)
    ]
    return jnp.result_type(*floats) if floats else jnp.result_type(float)


def _as_step(value: Any) -> Any:
    """Field converter: Python and NumPy reals to `float`; anything else (booleans
    included) is left for `__check_init__` to reject with a message that names it."""
    if isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool | np.bool_
    ):
        return float(value)
    return value


def _round_up(x: float) -> float:
    """`x` rounded up to two significant digits, so that a suggested bound printed
    with `:.2g` is never below the bound itself."""
    unit = 10 ** (math.floor(math.log10(x)) - 1)
    return math.ceil(x / unit) * unit


class FiniteDifference(AbstractDerivative):
    """Directional derivative by a finite-difference stencil.

    - `scheme="forward"`: `(f(p + h d) - f(p)) / h`, error `O(h)`; it reuses `f(p)`,
      so with the primal needed anyway it costs one extra forward pass.
    - `scheme="central"`: `(f(p + h d) - f(p - h d)) / (2 h)`, error `O(h²)`; two
      extra forward passes.

    No forward-mode autodiff is needed, so any network (fused attention kernels,
    `custom_vjp` layers) works, at the price of a truncation error and of round-off
    that grows like `eps / h` for small `h`: a step below `sqrt(eps)` (forward) or
    `cbrt(eps)` (central) of the dtype the loss is traced in raises an
    [`fmcalc.FiniteDifferenceStepWarning`][], and one at or below `eps` an error.

    **Times stay in `[0, 1]`.** Where a shifted time would leave `[0, 1]` (a forward
    step along `s` at `s = 1`), the stencil turns at run time, per example: the
    forward difference becomes the backward one `(f(p) - f(p - h d)) / h`, and the
    central one the one-sided `(3 f(p) - 4 f(p - h d) + f(p - 2 h d)) / (2 h)`,
    still second order, which needs `f(p)` (shared with the residual's own
    `f(p)` where it has one). Along two times at once, the derivative is the sum of
    one stencil per time, since at a corner (`s = 1`, `t = 0` along `(1, 1)`) no
    step along both stays inside. Zero-dimensional arguments of `fn` are the times.

    **Arguments:**

    - `step`: the step `h` along the tangent, a real number in `(0, 0.25]`
      (NumPy scalars are accepted).
    - `scheme`: `"forward"` (default) or `"central"`.
    """

    step: float = eqx.field(static=True, converter=_as_step)
    scheme: str = eqx.field(static=True, default="forward")

    exact: ClassVar[bool] = False

    def __check_init__(self):
        if self.scheme not in ("forward", "central"):
            raise ValueError(
                f"Unknown finite-difference scheme {self.scheme!r}; expected "
                "'forward' or 'central'."
            )
        if not isinstance(self.step, float):
            raise TypeError(
                "Finite-difference `step` must be a real number such as 1e-3; got "
                f"{self.step!r} ({type(self.step).__name__})."
            )
        if not (0 < self.step <= 0.25 and math.isfinite(self.step)):
            raise ValueError(
                "Finite-difference `step` must be a finite positive number of at "
                "most 0.25 (a quarter of the time range, so that the stencil fits "
                f"inside [0, 1]), such as 1e-3; got {self.step!r}."
            )

    @property
    def order(self) -> int:
        return 1 if self.scheme == "forward" else 2

    def stencil(self, up: Any = 1, down: Any = 1) -> tuple[tuple[Any, Any], ...]:
        """`(offset, weight)` pairs: the derivative is `Σ w f(p + offset h d) / h`.

        `up` and `down` say (1 or 0; numbers, arrays or expressions) whether the
        points one step forward and one step backward keep the times in `[0, 1]`.
        Where only one side fits, the forward difference turns to that side, and the
        central one becomes the one-sided second-order stencil
        `(-3 f(p) + 4 f(p + h d) - f(p + 2 h d)) / (2 h)` towards it (`h → -h` for
        the backward side), which uses `f(p)` instead of a third point. A weight
        that is 0 for every example is left out.
        """
        if self.scheme == "forward":
            sign = 1 - 2 * (1 - up) * down
            return ((0.0, -sign), (sign, sign))
        back = (1 - up) * down
        ahead = (1 - down) * up
        pairs = (
            (0.0, -1.5 * (ahead - back)),
            (-1 + 2 * ahead, -0.5 - 1.5 * back + 2.5 * ahead),
            (1 - 3 * back + ahead, 0.5 - ahead),
        )
        return tuple(
            (o, w) for o, w in pairs if not (isinstance(w, float | int) and w == 0)
        )

    def check_dtype(self, dtype) -> None:
        """Raise if `step` is below the resolution of `dtype` near 1, and warn
        ([`fmcalc.FiniteDifferenceStepWarning`][]) if round-off, `eps / step`, would
        outweigh the truncation error."""
        eps = float(jnp.finfo(dtype).eps)
        name = jnp.dtype(dtype).name
        if self.step <= eps:
            raise ValueError(
                f"Finite-difference step {self.step!r} is at or below the resolution "
                f"of {name} (eps = {eps:.3g}): `t + step == t` for times near 1. Use "
                f"a step of at least ~sqrt(eps) = {_round_up(eps**0.5):.2g}."
            )
        floor, rule = (
            (eps ** (1 / 2), "sqrt")
            if self.scheme == "forward"
            else (eps ** (1 / 3), "cbrt")
        )
        if self.step < floor:
            warn_from_user(
                f"Finite-difference step {self.step!r} ({self.scheme}) is below "
                f"{rule}(eps) = {floor:.2g} for {name}: round-off in the network's "
                f"output, divided by the step, outweighs the truncation error. Use a "
                f"step of at least {_round_up(floor):.2g}, or a wider dtype.",
                FiniteDifferenceStepWarning,
            )

    def __call__(self, fn, primals, tangents):
        self.check_dtype(_dtype_of(primals))
        moving = [
            i
            for i, (p, d) in enumerate(zip(primals, tangents, strict=True))
            if jnp.ndim(p) == 0 and not (isinstance(d, int | float) and d == 0)
        ]
        if len(moving) > 1:
            # Along two times at a corner (s = 1, t = 0 along (1, 1)) no step stays
            # in [0, 1]; along one time at a time, one does.
            parts = [
                self(fn, primals, _only(tangents, moving, i, with_rest=i == moving[0]))
                for i in moving
            ]
            return parts[0][0], sum(part[1] for part in parts)
        h = self.step
        tangents = tuple(
            jnp.asarray(d, jnp.result_type(p))
            for p, d in zip(primals, tangents, strict=True)
        )
        times = [
            (p, d) for p, d in zip(primals, tangents, strict=True) if jnp.ndim(p) == 0
        ]

        def fits(direction: float) -> Any:
            inside = [
                (p + direction * h * d >= 0) & (p + direction * h * d <= 1)
                for p, d in times
            ]
            return (
                jnp.all(jnp.stack(inside)).astype(_dtype_of(primals)) if inside else 1
            )

        def shifted(offset):
            return tuple(
                p + (offset * h) * d for p, d in zip(primals, tangents, strict=True)
            )

        primal = fn(*primals)
        out = sum(
            (
                w * (primal if isinstance(o, float) and o == 0 else fn(*shifted(o)))
                for o, w in self.stencil(fits(1.0), fits(-1.0))
            ),
            start=jnp.zeros_like(primal),
        )
        return primal, out / h
