"""Four flow-map losses written directly in JAX, as references for the overhead
benchmark (`overhead.py`).

Each function computes one method's training loss from plain arrays, with no
expression trees and no interpreter: the code a JAX user would write from the
paper's formula. Conventions: `t = 0` is data, `t = 1` noise,
`x_s = (1 - s) x0 + s eps`; a model is called per example as
`model(x, s, t, cond=...)` and returns the average velocity `V(x, s, t)`; the flow
map is `F(x, s, t) = x + (t - s) V(x, s, t)`.

Arguments shared by every loss:

- `model`: the online network (the one differentiated).
- `x0`, `eps`: data and noise, shape `(n, dim)`.
- `s`, `t`: source and target times, shape `(n,)`.
- `cond`: optional labels, shape `(n,)`, passed to every network call.

The intermediate time `u` of a batch is not an argument: none of these four methods
reads it (the shortcut model's midpoint is computed from `s` and `t`).

Rows are laid out as `fmcalc.Method.batch` draws them: with a split, the first
`round(fraction * n)` rows are the flow-matching anchor and the rest the
self-distillation term. Every loss is the sum of the per-row losses of all terms
divided by the number of rows.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


Model = Callable[..., Float[Array, " dim"]]


def _interpolate(x0, eps, s):
    return (1 - s) * x0 + s * eps


def _flow_matching(model: Model, x0, eps, s, cond):
    """Per-row flow-matching losses `‖V(x_s, s, s) - (eps - x0)‖²`."""

    def per_example(x0, eps, s, cond):
        x = _interpolate(x0, eps, s)
        residual = model(x, s, s, cond=cond) - (eps - x0)
        return jnp.sum(residual**2)

    return jax.vmap(per_example)(x0, eps, s, cond)


def _split(fraction: float, *arrays):
    """The first `round(fraction * n)` rows of each array, and the rest."""
    k = int(round(fraction * arrays[0].shape[0]))
    head = tuple(None if a is None else a[:k] for a in arrays)
    tail = tuple(None if a is None else a[k:] for a in arrays)
    return head, tail


def meanflow_loss(
    model: Model,
    x0: Float[Array, "n dim"],
    eps: Float[Array, "n dim"],
    s: Float[Array, " n"],
    t: Float[Array, " n"],
    cond: Int[Array, " n"] | None = None,
    *,
    c: float = 1e-3,
    p: float = 1.0,
) -> Float[Array, ""]:
    """MeanFlow (Geng et al. 2025) with its adaptive weight.

    `v = eps - x0`, `(V, dV) = jvp(V(·, ·, t), (x, s), (v, 1))`,
    `R = V - sg[v + (t - s) dV]`, loss `‖R‖² / sg((‖R‖² + c)^p)` averaged over rows.
    """

    def per_example(x0, eps, s, t, cond):
        x = _interpolate(x0, eps, s)
        v = eps - x0
        velocity, dv = jax.jvp(
            lambda x, s: model(x, s, t, cond=cond), (x, s), (v, jnp.ones_like(s))
        )
        target = jax.lax.stop_gradient(v + (t - s) * dv)
        squared = jnp.sum((velocity - target) ** 2)
        return squared / jax.lax.stop_gradient((squared + c) ** p)

    return jnp.sum(jax.vmap(per_example)(x0, eps, s, t, cond)) / x0.shape[0]


def shortcut_loss(
    model: Model,
    ema: Model,
    x0: Float[Array, "n dim"],
    eps: Float[Array, "n dim"],
    s: Float[Array, " n"],
    t: Float[Array, " n"],
    cond: Int[Array, " n"] | None = None,
    *,
    anchor_fraction: float = 7 / 8,
) -> Float[Array, ""]:
    """Shortcut models (Frans et al. 2025).

    Flow matching on the first `anchor_fraction` of the rows; on the rest, with the
    midpoint `m = s + (t - s) / 2` and the EMA network `V_ema`,
    `R = V(x, s, t) - sg[½ V_ema(x, s, m) + ½ V_ema(x + (m - s) V_ema(x, s, m), m, t)]`.
    """
    (x0_a, eps_a, s_a, _, cond_a), (x0_b, eps_b, s_b, t_b, cond_b) = _split(
        anchor_fraction, x0, eps, s, t, cond
    )

    def per_example(x0, eps, s, t, cond):
        x = _interpolate(x0, eps, s)
        mid = s + 0.5 * (t - s)
        first = ema(x, s, mid, cond=cond)
        second = ema(x + (mid - s) * first, mid, t, cond=cond)
        target = jax.lax.stop_gradient(0.5 * first + 0.5 * second)
        return jnp.sum((model(x, s, t, cond=cond) - target) ** 2)

    anchor = _flow_matching(model, x0_a, eps_a, s_a, cond_a)
    bootstrap = jax.vmap(per_example)(x0_b, eps_b, s_b, t_b, cond_b)
    return (jnp.sum(anchor) + jnp.sum(bootstrap)) / x0.shape[0]


def lsd_loss(
    model: Model,
    x0: Float[Array, "n dim"],
    eps: Float[Array, "n dim"],
    s: Float[Array, " n"],
    t: Float[Array, " n"],
    cond: Int[Array, " n"] | None = None,
    *,
    anchor_fraction: float = 0.75,
) -> Float[Array, ""]:
    """Lagrangian self-distillation (Boffi et al. 2025).

    Flow matching on the first `anchor_fraction` of the rows; on the rest
    `R = ∂_t F(x, s, t) - sg[V(sg[F(x, s, t)], t, t)]`, with
    `∂_t F = V + (t - s) ∂_t V` from one JVP in `t`, backpropagated through.
    """
    (x0_a, eps_a, s_a, _, cond_a), (x0_b, eps_b, s_b, t_b, cond_b) = _split(
        anchor_fraction, x0, eps, s, t, cond
    )

    def per_example(x0, eps, s, t, cond):
        x = _interpolate(x0, eps, s)
        velocity, dv = jax.jvp(
            lambda t: model(x, s, t, cond=cond), (t,), (jnp.ones_like(t),)
        )
        end = jax.lax.stop_gradient(x + (t - s) * velocity)
        target = jax.lax.stop_gradient(model(end, t, t, cond=cond))
        return jnp.sum((velocity + (t - s) * dv - target) ** 2)

    anchor = _flow_matching(model, x0_a, eps_a, s_a, cond_a)
    lagrangian = jax.vmap(per_example)(x0_b, eps_b, s_b, t_b, cond_b)
    return (jnp.sum(anchor) + jnp.sum(lagrangian)) / x0.shape[0]


def sct_loss(
    model: Model,
    x0: Float[Array, "n dim"],
    eps: Float[Array, "n dim"],
    s: Float[Array, " n"],
    t: Float[Array, " n"],
    r: Float[Array, ""],
    cond: Int[Array, " n"] | None = None,
    *,
    c: float = 0.1,
) -> Float[Array, ""]:
    """Continuous-time consistency training (Lu & Song 2025), tangent form.

    `v = eps - x0`, `(V, dV) = jvp(V(·, ·, t), (x, s), (v, 1))`,
    `g = V - v - r (t - s) dV`, `R = V - sg[V - g / (‖g‖ + c)]`, with `r` the
    tangent warm-up factor; loss `‖R‖²` averaged over rows.
    """

    def per_example(x0, eps, s, t, cond):
        x = _interpolate(x0, eps, s)
        v = eps - x0
        velocity, dv = jax.jvp(
            lambda x, s: model(x, s, t, cond=cond), (x, s), (v, jnp.ones_like(s))
        )
        g = velocity - v - r * (t - s) * dv
        target = jax.lax.stop_gradient(velocity - g / (jnp.linalg.norm(g) + c))
        return jnp.sum((velocity - target) ** 2)

    return jnp.sum(jax.vmap(per_example)(x0, eps, s, t, cond)) / x0.shape[0]
