"""fmcalc's conventions, in one place.

- Time runs from data to noise: `t = 0` is data, `t = 1` is noise.
- Linear interpolant `x_t = (1 - t) x0 + t eps` with `eps ~ N(0, I)`.
- Conditional velocity `eps - x0`; marginal velocity `v(x, t) = E[eps - x0 | x_t = x]`.
- `s` is the source time, `t` the target time: `F(x_s, s, t) = x_t`.
- Average velocity `V`; flow map `F(x, s, t) = x + (t - s) V(x, s, t)`;
  `V(x, t, t) = v(x, t)`.

Every other parameterisation is converted to these by the functions below.
"""

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from ._custom_types import Time, Vector


def interpolate(
    x0: Float[Array, "*batch dim"],
    eps: Float[Array, "*batch dim"],
    t: Float[ArrayLike, "*batch"],
) -> Float[Array, "*batch dim"]:
    """The linear interpolant `x_t = (1 - t) x0 + t eps`.

    **Arguments:**

    - `x0`: data (`t = 0`), one example `(dim,)` or a batch `(*batch, dim)`.
    - `eps`: noise (`t = 1`), the same shape.
    - `t`: the times, one per example: shape `(*batch,)`.

    **Returns:** `x_t`, shaped like `x0`.
    """
    t = jnp.asarray(t)[..., None]
    return (1 - t) * x0 + t * eps


def conditional_velocity(x0: Vector, eps: Vector) -> Vector:
    """The conditional velocity `d x_t / dt = eps - x0` of the linear interpolant.

    Its expectation given `x_t` is the marginal velocity `v(x_t, t)`.
    """
    return eps - x0


def flow_map_from_average_velocity(x: Vector, s: Time, t: Time, V: Vector) -> Vector:
    """`F(x, s, t) = x + (t - s) V(x, s, t)`."""
    return x + (t - s) * V


def average_velocity_from_flow_map(x: Vector, s: Time, t: Time, F: Vector) -> Vector:
    """`V(x, s, t) = (F(x, s, t) - x) / (t - s)`.

    !!! warning

        This division cancels catastrophically as `t -> s` (in float32 the error is
        ~1e-2 at `t - s = 1e-5`) and is undefined at `t = s`. Parameterise networks by
        `V` (or by the denoised field) instead of converting an `F` output.
    """
    return (F - x) / (t - s)


def average_velocity_from_denoised(x: Vector, s: Time, x_hat: Vector) -> Vector:
    """Average velocity from pixel MeanFlow's denoised field `x_hat`.

    Pixel MeanFlow (Lu et al. 2026) writes `F = (t / s) x + (1 - t / s) x_hat`;
    substituting into `F = x + (t - s) V` gives `V = (x - x_hat) / s`, free of any
    division by `t - s`. Undefined at `s = 0`, where `x` is already data.
    """
    return (x - x_hat) / s


def denoised_from_average_velocity(x: Vector, s: Time, V: Vector) -> Vector:
    """Inverse of [`fmcalc.average_velocity_from_denoised`][]: `x_hat = x - s V`."""
    return x - s * V


def flow_map_from_denoised(x: Vector, s: Time, t: Time, x_hat: Vector) -> Vector:
    """Pixel MeanFlow's flow map `F = (t / s) x + (1 - t / s) x_hat`."""
    return flow_map_from_average_velocity(
        x, s, t, average_velocity_from_denoised(x, s, x_hat)
    )


def denoiser_from_velocity(x: Vector, t: Time, v: Vector) -> Vector:
    """The denoiser `x0_hat = E[x0 | x_t = x] = x - t v(x, t)`."""
    return x - t * v


def velocity_from_denoiser(x: Vector, t: Time, x0_hat: Vector) -> Vector:
    """The velocity `v(x, t) = (x - x0_hat) / t`; undefined at `t = 0`."""
    return (x - x0_hat) / t


def score_from_velocity(x: Vector, t: Time, v: Vector) -> Vector:
    """The score `∇ log p_t(x) = -(x + (1 - t) v(x, t)) / t`.

    From `E[eps | x_t] = (x - (1 - t) x0_hat) / t` and `score = -E[eps | x_t] / t`;
    undefined at `t = 0`.
    """
    return -(x + (1 - t) * v) / t


def velocity_from_score(x: Vector, t: Time, score: Vector) -> Vector:
    """The velocity `v(x, t) = -(x + t score(x, t)) / (1 - t)`; undefined at `t = 1`."""
    return -(x + t * score) / (1 - t)
