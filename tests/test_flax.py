"""A Flax network (NNX or Linen) trains with fmcalc's losses through
`fmcalc.nn.from_flax`, checkpoints, and comes back as a Flax network."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx

import fmcalc


class Velocity(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(4, 32, rngs=rngs)
        self.out = nnx.Linear(32, 2, rngs=rngs)

    def __call__(self, x, s, t):
        h = jnp.concatenate([x, s[:, None], t[:, None]], axis=-1)
        return self.out(nnx.silu(self.hidden(h)))


class LinenVelocity(linen.Module):
    @linen.compact
    def __call__(self, x, s, t, cond=None):
        h = jnp.concatenate([x, s[:, None], t[:, None]], axis=-1)
        if cond is not None:
            h = h + linen.Embed(3, h.shape[-1])(cond)
        return linen.Dense(2)(linen.silu(linen.Dense(32)(h)))


def _flow():
    return fmcalc.flows.Gaussian(jnp.array([1.0, -1.0]), 0.3 * jnp.eye(2))


@pytest.mark.slow
def test_nnx_output_is_the_network_output():
    net = Velocity(nnx.Rngs(0))
    model = fmcalc.nn.from_flax(net)
    x = jnp.array([0.3, -0.2])
    expected = net(x[None], jnp.array([0.7]), jnp.array([0.1]))[0]
    assert jnp.allclose(model(x, 0.7, 0.1), expected)
    # Batched by an outer vmap, as every fmcalc model.
    xs = jnp.ones((5, 2))
    assert jax.vmap(model)(xs, jnp.full(5, 0.5), jnp.zeros(5)).shape == (5, 2)


@pytest.mark.slow
def test_nnx_trains_checkpoints_and_comes_back(tmp_path):
    model = fmcalc.nn.from_flax(Velocity(nnx.Rngs(0)))
    result = fmcalc.train.fit(
        fmcalc.methods.get("lsd"),
        model,
        _flow().sample,
        key=jax.random.key(0),
        steps=60,
        batch_size=64,
        options=fmcalc.train.Options(checkpoint=tmp_path / "run.eqx", progress=False),
    )
    assert np.isfinite(result.losses).all()
    assert result.losses[-10:].mean() < result.losses[:10].mean()
    fmcalc.train.save_checkpoint(tmp_path / "model.eqx", result.ema)
    loaded = fmcalc.train.load_checkpoint(tmp_path / "model.eqx", model)
    x = jnp.array([0.1, 0.2])
    assert jnp.allclose(loaded(x, 0.9, 0.0), result.ema(x, 0.9, 0.0))
    back = result.ema.to_flax()
    assert isinstance(back, Velocity)
    assert jnp.allclose(
        back(x[None], jnp.array([0.9]), jnp.array([0.0]))[0], result.ema(x, 0.9, 0.0)
    )


@pytest.mark.slow
def test_linen_with_labels():
    net = LinenVelocity()
    variables = net.init(
        jax.random.key(0),
        jnp.zeros((1, 2)),
        jnp.zeros(1),
        jnp.zeros(1),
        jnp.zeros(1, int),
    )
    model = fmcalc.nn.from_flax(net, variables)
    data = _flow().sample(jax.random.key(1), 256)
    labels = jnp.arange(256) % 3
    result = fmcalc.train.fit(
        fmcalc.methods.get("flow-matching"),
        model,
        data,
        labels=labels,
        key=jax.random.key(2),
        steps=30,
        batch_size=32,
        options=fmcalc.train.Options(progress=False),
    )
    assert np.isfinite(result.losses).all()
    module, params = result.model.to_flax()
    assert module is net and jax.tree.structure(params) == jax.tree.structure(variables)


def test_wrong_arguments_are_refused():
    with pytest.raises(TypeError, match="without `variables`"):
        fmcalc.nn.from_flax(Velocity(nnx.Rngs(0)), {"params": {}})
    with pytest.raises(TypeError, match="needs its `variables`"):
        fmcalc.nn.from_flax(LinenVelocity())
    with pytest.raises(TypeError, match="nnx.Module"):
        fmcalc.nn.from_flax(lambda x, s, t: x)
