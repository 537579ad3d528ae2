import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest

import fmcalc.cost
from fmcalc.cost import Cost, Memory, flops, forward_pass_equivalents, measure, memory
from fmcalc.cost._meter import _flops_of
from fmcalc.nn import MLP, Transformer


BATCH = 16


# Float32 throughout (x64 is on in the tests), as in the measurements of
# reference/measurements.md §3; FLOP counts do not depend on the dtype.
@functools.cache
def _mlp():
    # Width 256: at width 128 biases and SiLUs add ~2 % on top of the matmuls.
    return MLP(16, width=256, depth=4, time_features=32, dtype=jnp.float32,
               key=jr.key(0))  # fmt: skip


@functools.cache
def _transformer():
    return Transformer(64, patch_size=2, width=64, depth=2, heads=4,
                       time_features=64, dtype=jnp.float32, key=jr.key(0))  # fmt: skip


def _batch(dim):
    k1, k2, k3 = jr.split(jr.key(1), 3)
    x0 = jr.normal(k1, (BATCH, dim), jnp.float32)
    eps = jr.normal(k2, (BATCH, dim), jnp.float32)
    t = jr.uniform(k3, (BATCH,), jnp.float32)
    return x0, eps, t


def forward(model, x, s, t):
    return jax.vmap(model)(x, s, t)


def flow_matching_step(model, x0, eps, t):
    def loss(model):
        x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
        prediction = jax.vmap(model)(x_t, t, t)
        return jnp.mean(jnp.sum((prediction - (eps - x0)) ** 2, axis=-1))

    return eqx.filter_value_and_grad(loss)(model)


def jvp_of_forward(model, x, s, t):
    return jax.jvp(
        lambda x, s, t: forward(model, x, s, t),
        (x, s, t),
        (x, jnp.ones_like(s), jnp.zeros_like(t)),
    )


def _ratios(model, dim):
    x0, eps, t = _batch(dim)
    forward_args = (model, x0, t, t)
    fm = forward_pass_equivalents(
        flow_matching_step, (model, x0, eps, t),
        forward=forward, forward_args=forward_args,
    )  # fmt: skip
    jvp = forward_pass_equivalents(
        jvp_of_forward, (model, x0, t, t), forward=forward, forward_args=forward_args
    )
    return fm, jvp


def test_public_names():
    for name in ["Cost", "Memory", "flops", "forward_pass_equivalents", "measure"]:
        assert hasattr(fmcalc.cost, name)
    assert fmcalc.cost.memory is memory


def test_matmul_flops_are_exact():
    a = jnp.ones((256, 512), jnp.float32)
    b = jnp.ones((512, 128), jnp.float32)
    assert flops(jnp.matmul, a, b) == 2 * 256 * 512 * 128
    assert flops(lambda a, *, b: a @ b, a, b=b) == 2 * 256 * 512 * 128


def test_mlp_forward_matches_analytic():
    model = _mlp()
    x0, _, t = _batch(model.dim)
    analytic = 2 * BATCH * sum(layer.weight.size for layer in model.layers)
    measured = flops(forward, model, x0, t, t)
    assert analytic <= measured <= 1.02 * analytic


def test_mlp_forward_pass_equivalents():
    fm, jvp = _ratios(_mlp(), 16)
    assert 2.8 <= fm <= 3.1
    assert jvp == pytest.approx(2.0, abs=0.05)


@pytest.mark.slow
def test_transformer_forward_pass_equivalents():
    fm, jvp = _ratios(_transformer(), 64)
    assert fm == pytest.approx(3.0, abs=0.2)
    assert jvp == pytest.approx(2.0, abs=0.1)


def test_loops_are_refused():
    def scanned(x, w):
        return jax.lax.scan(lambda h, _: (jnp.tanh(h @ w), None), x, length=3)[0]

    x = jnp.ones((8, 32), jnp.float32)
    w = jnp.ones((32, 32), jnp.float32)
    with pytest.raises(ValueError, match="while.*[Uu]nroll"):
        flops(scanned, x, w)
    unrolled = lambda x, w: jax.lax.scan(
        lambda h, _: (jnp.tanh(h @ w), None), x, length=3, unroll=True
    )[0]
    assert flops(unrolled, x, w) >= 3 * 2 * 8 * 32 * 32
    # A function whose name contains "while" is not mistaken for a loop.
    while_named = jax.named_call(lambda x, w: x @ w, name="while")
    assert flops(while_named, x, w) == 2 * 8 * 32 * 32


def test_memory():
    model = _mlp()
    x0, eps, t = _batch(model.dim)
    stats = memory(flow_matching_step, model, x0, eps, t)
    assert isinstance(stats, Memory)
    assert stats.temp_bytes > 0
    assert stats.argument_bytes >= x0.nbytes + eps.nbytes + t.nbytes
    assert stats.peak_bytes == (
        stats.argument_bytes + stats.output_bytes + stats.temp_bytes - stats.alias_bytes
    )
    assert stats.peak_bytes > stats.temp_bytes


def test_measure_and_pytree_arguments():
    model = _mlp()
    x0, eps, t = _batch(model.dim)
    cost = measure(
        flow_matching_step, (model, x0, eps, t),
        forward=forward, forward_args=(model, x0, t, t),
    )  # fmt: skip
    assert isinstance(cost, Cost)
    assert cost.flops == flops(flow_matching_step, model, x0, eps, t)
    assert cost.forward_flops == flops(forward, model, x0, t, t)
    assert cost.forward_pass_equivalents == cost.flops / cost.forward_flops
    assert cost.memory == memory(flow_matching_step, model, x0, eps, t)
    # Shape-only placeholders (no allocation) give the same count.
    abstract = eqx.filter_eval_shape(lambda: (model, x0))
    assert flops(forward, *abstract, t, t) == cost.forward_flops


def test_cost_analysis_formats_and_fallback(monkeypatch):
    assert _flops_of({"flops": 3.0, "bytes accessed": 1.0}) == 3.0
    assert _flops_of([{"flops": 3.0}, {"flops": 2.0}]) == 5.0
    assert _flops_of(None) is None
    assert _flops_of([{"bytes accessed": 1.0}]) is None

    a = jnp.ones((64, 32), jnp.float32)
    b = jnp.ones((32, 16), jnp.float32)
    # jax 0.4.30 on CPU: compiled matmuls counted as -1, in a list of dicts.
    monkeypatch.setattr(
        jax.stages.Compiled, "cost_analysis", lambda self: [{"flops": -1.0}]
    )
    with pytest.warns(UserWarning, match="lowered"):
        assert flops(jnp.matmul, a, b) == 2 * 64 * 32 * 16
    monkeypatch.setattr(jax.stages.Lowered, "cost_analysis", lambda self: None)
    with pytest.raises(ValueError, match="no positive"):
        flops(jnp.matmul, a, b)
