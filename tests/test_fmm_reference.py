"""Flow map matching at its defaults against the loss of its authors' code, read as
jc-bao/flow_map_matching_public at 27a4ada (a runnable fork of the 2024 code:
py/common/losses.py `lagrangian`, py/common/flow_map.py, run.sh)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from helpers import assert_same_loss_and_grads

from fmcalc import methods
from fmcalc.nn import MLP


class _Theirs(eqx.Module):
    """fmcalc's average velocity of a network `φ` in their convention: time runs
    from noise (0) to data (1) and the map is `X_{s,t}(x) = x + (t - s)(φ - x)`, so
    `V(x, s, t) = x - φ(x, 1 - s, 1 - t)`."""

    phi: MLP

    def __call__(self, x, s, t, *, cond=None):
        return x - self.phi(x, 1 - s, 1 - t)


@pytest.mark.slow
def test_fmm_loss_is_the_formula_of_its_authors_code():
    """Row by row in their convention, with their `x0` the noise and `x1` the data:
    `I_t = (1 - t) x0 + t x1`, `X_{s,t}(x) = (1 - (t - s)) x + (t - s) φ(s, t, x)`,
    `L = ‖∂_τ X_{s,τ}(X_{t,s}(I_t))|_{τ=t} - (x1 - x0)‖²` summed over dimensions
    and averaged over the batch, `s` and `t` uniform on the square. fmcalc's `(s, t)`
    is their `(1 - t, 1 - s)`."""
    method = methods.get("fmm")
    phi = MLP(3, width=32, depth=2, key=jax.random.key(1))
    data = jax.random.normal(jax.random.key(2), (32, 3))
    batch = method.batch(jax.random.key(3), data)

    def flow_map(phi, s, t, x):
        return (1 - (t - s)) * x + (t - s) * phi(x, s, t)

    def row(phi, data, noise, s_ours, t_ours):
        t, s = 1 - s_ours, 1 - t_ours  # their (t, s)
        start = (1 - t) * noise + t * data
        back = flow_map(phi, t, s, start)
        _, d_tau = jax.jvp(
            lambda tau: flow_map(phi, s, tau, back), (t,), (jnp.ones_like(t),)
        )
        return jnp.sum((d_tau - (data - noise)) ** 2)

    def by_formula(phi):
        rows = (batch.x0, batch.eps, batch.s, batch.t)
        return jnp.mean(jax.vmap(lambda *a: row(phi, *a))(*rows))

    assert_same_loss_and_grads(
        lambda phi: method.loss(_Theirs(phi), batch)[0], by_formula, phi
    )
