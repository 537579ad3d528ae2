"""Inverse maps: data to noise and back, editing and interpolating in noise space."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from .._custom_types import Cond, Vector
from .._misc import check_example, checked, concrete
from .._sampling import invert, sample


def round_trip_error(
    model: Callable[..., Vector],
    x0: Vector,
    *,
    steps: int = 1,
    cond: Cond = None,
) -> Vector:
    """How far a map is from invertible at `x0`: encode to noise and decode,
    `sample(invert(x0)) - x0`; with one step, `F(F(x0, 0, 1), 1, 0) - x0`.

    Zero for an exact map on any grid; a learned map is invertible only as far as it
    satisfies `F(F(x, s, t), t, s) = x`, which it learns only if trained on both
    orders of `(s, t)` (e.g. times from [`fmcalc.UniformSquare`][]).

    **Arguments:**

    - `model`: the average velocity, called per example as `model(x, s, t, cond=cond)`.
    - `x0`: one data example, shape `(dim,)`; batch with `jax.vmap`.
    - `steps`: jumps each way ([`fmcalc.invert`][] then [`fmcalc.sample`][]).
    - `cond`: conditioning passed on to every model call (when not `None`).

    **Returns:** the reconstruction error, shaped like `x0`.
    """
    noise = invert(model, x0, steps=steps, cond=cond)
    return sample(model, noise, steps=steps, cond=cond) - x0


def slerp(a: Vector, b: Vector, weight: Float[ArrayLike, ""]) -> Vector:
    """Spherical interpolation `(sin((1 - w) θ) a + sin(w θ) b) / sin θ`, `θ` the
    angle between `a` and `b`: the path between two noise vectors along which the
    norm stays typical of Gaussian noise (a straight line passes through noise of
    too small a norm, which decodes to blurred data). Linear where `θ ≈ 0`.

    **Arguments:**

    - `a`, `b`: two vectors of shape `(dim,)`.
    - `weight`: `w`, a scalar; `0` gives `a`, `1` gives `b`.

    **Returns:** the interpolant, shaped like `a`.
    """
    check_example("a", a)
    check_example("b", b)
    if a.shape != b.shape:
        raise ValueError(f"`a` and `b` differ in shape: {a.shape} and {b.shape}.")
    norms = jnp.linalg.norm(a) * jnp.linalg.norm(b)
    zero = "`slerp` needs two nonzero vectors: the angle to a zero vector is undefined"
    value = concrete(norms)
    if value is None:
        a = checked(a, ~(norms > 0), zero + ".")
    elif not value > 0:
        raise ValueError(
            f"{zero}; got |a| = {float(jnp.linalg.norm(a)):g} and "
            f"|b| = {float(jnp.linalg.norm(b)):g}."
        )
    w = jnp.asarray(weight, a.dtype)
    cosine = a @ b / norms
    theta = jnp.arccos(jnp.clip(cosine, -1, 1))
    small = theta < 1e-4
    safe = jnp.where(small, 1, theta)
    spherical = (jnp.sin((1 - w) * safe) * a + jnp.sin(w * safe) * b) / jnp.sin(safe)
    return jnp.where(small, (1 - w) * a + w * b, spherical)


def interpolation(
    model: Callable[..., Vector],
    x_a: Vector,
    x_b: Vector,
    weights: Float[ArrayLike, " n"],
    *,
    steps: int = 1,
    cond: Cond = None,
) -> Float[Array, "n dim"]:
    """Interpolate between two data points through noise space: encode both with
    [`fmcalc.invert`][], [`fmcalc.apps.slerp`][] between their noises, decode each
    interpolant with [`fmcalc.sample`][].

    **Arguments:**

    - `model`: the average velocity, called per example as `model(x, s, t, cond=cond)`
      (trained for `t > s` too, to encode).
    - `x_a`, `x_b`: two data examples of shape `(dim,)`.
    - `weights`: the interpolation weights, shape `(n,)`; `0` is `x_a`'s decoded
      noise, `1` is `x_b`'s.
    - `steps`: jumps each way.
    - `cond`: conditioning passed on to every model call (when not `None`).

    **Returns:** the decoded interpolants, shape `(n, dim)`.
    """
    weights = jnp.asarray(weights)
    if weights.ndim != 1:
        raise ValueError(f"`weights` must have shape (n,); got shape {weights.shape}.")
    noise_a = invert(model, x_a, steps=steps, cond=cond)
    noise_b = invert(model, x_b, steps=steps, cond=cond)
    return jax.vmap(
        lambda w: sample(model, slerp(noise_a, noise_b, w), steps=steps, cond=cond)
    )(weights)
