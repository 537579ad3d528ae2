import abc
from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PyTree


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

    exact: ClassVar[bool]
    order: ClassVar[int | None]

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
    order: ClassVar[int | None] = None

    def __call__(self, fn, primals, tangents):
        tangents = tuple(
            jnp.broadcast_to(jnp.asarray(d, jnp.result_type(p)), jnp.shape(p))
            for p, d in zip(primals, tangents, strict=True)
        )
        return jax.jvp(fn, primals, tangents)


def _dtype_of(primals: PyTree) -> jnp.dtype:
    leaves = [x for x in jax.tree.leaves(primals) if eqx.is_array_like(x)]
    floats = [
        jnp.result_type(x)
        for x in leaves
        if jnp.issubdtype(jnp.result_type(x), jnp.floating)
    ]
    return jnp.result_type(*floats) if floats else jnp.result_type(float)


class FiniteDifference(AbstractDerivative):
    """Directional derivative by a finite-difference stencil.

    - `scheme="forward"`: `(f(p + h d) - f(p)) / h`, error `O(h)`; it reuses `f(p)`,
      so with the primal needed anyway it costs one extra forward pass.
    - `scheme="central"`: `(f(p + h d) - f(p - h d)) / (2 h)`, error `O(h²)`; two
      extra forward passes.

    No forward-mode autodiff is needed, so any network (fused attention kernels,
    `custom_vjp` layers) works, at the price of a truncation error and of round-off
    that grows like `eps / h` for small `h`.

    **Arguments:**

    - `step`: the step `h > 0` along the tangent.
    - `scheme`: `"forward"` (default) or `"central"`.
    """

    step: float = eqx.field(static=True)
    scheme: str = eqx.field(static=True, default="forward")

    exact: ClassVar[bool] = False

    def __check_init__(self):
        if self.scheme not in ("forward", "central"):
            raise ValueError(
                f"Unknown finite-difference scheme {self.scheme!r}; expected "
                "'forward' or 'central'."
            )
        if not isinstance(self.step, int | float) or not self.step > 0:
            raise ValueError(
                f"Finite-difference `step` must be a positive float; got {self.step!r}."
            )

    @property
    def order(self) -> int:  # pyright: ignore[reportIncompatibleVariableOverride]
        return 1 if self.scheme == "forward" else 2

    @property
    def stencil(self) -> tuple[tuple[float, float], ...]:
        """`(offset, weight)` pairs: the derivative is `Σ w f(p + offset h d) / h`."""
        if self.scheme == "forward":
            return ((0.0, -1.0), (1.0, 1.0))
        return ((-1.0, -0.5), (1.0, 0.5))

    def check_dtype(self, dtype) -> None:
        """Raise if `step` is below the resolution of `dtype` near 1."""
        eps = float(jnp.finfo(dtype).eps)
        if self.step <= eps:
            raise ValueError(
                f"Finite-difference step {self.step!r} is at or below the resolution "
                f"of {jnp.dtype(dtype).name} (eps = {eps:.3g}): `t + step == t` for "
                f"times near 1. Use a step of at least ~sqrt(eps) = {eps**0.5:.1g}."
            )

    def __call__(self, fn, primals, tangents):
        self.check_dtype(_dtype_of(primals))
        h = self.step

        def shifted(offset):
            return tuple(
                p + (offset * h) * jnp.asarray(d, jnp.result_type(p))
                for p, d in zip(primals, tangents, strict=True)
            )

        primal = fn(*primals)
        out = sum(
            (w * (primal if o == 0.0 else fn(*shifted(o))) for o, w in self.stencil),
            start=jnp.zeros_like(primal),
        )
        return primal, out / h
