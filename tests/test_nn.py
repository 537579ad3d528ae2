import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import fmcalc
import fmcalc.nn
from fmcalc.nn import MLP, Transformer, sinusoidal_embedding


DIM = 64  # an 8×8 single-channel image for the transformer


# Cached: building a model op by op costs seconds, and modules are immutable.
@functools.cache
def _mlp(dtype=jnp.float64, num_classes=None):
    return MLP(
        DIM, width=32, depth=2, time_features=16, num_classes=num_classes,
        dtype=dtype, key=jr.key(0),
    )  # fmt: skip


@functools.cache
def _transformer(dtype=jnp.float64, num_classes=None, perturb=True):
    model = Transformer(
        DIM, patch_size=2, width=32, depth=2, heads=4, time_features=16,
        num_classes=num_classes, dtype=dtype, key=jr.key(0),
    )  # fmt: skip
    if not perturb:
        return model
    # adaLN-Zero makes the untrained transformer exactly zero; move off that point
    # so derivative checks are informative.
    params, static = eqx.partition(model, eqx.is_inexact_array)
    leaves, treedef = jax.tree.flatten(params)
    keys = jr.split(jr.key(1), len(leaves))
    leaves = [
        leaf + 0.1 * jr.normal(k, leaf.shape, leaf.dtype)
        for leaf, k in zip(leaves, keys, strict=True)
    ]
    return eqx.combine(jax.tree.unflatten(treedef, leaves), static)


MODELS = {"mlp": _mlp, "transformer": _transformer}


@eqx.filter_jit
def _call(model, *args, **kwargs):
    # Compiled, because op-by-op dispatch of the transformer is several times slower.
    return model(*args, **kwargs)


@eqx.filter_jit
def _call_batched(model, *args):
    return jax.vmap(model)(*args)


def _inputs(dtype, batch=None):
    k1, k2, k3 = jr.split(jr.key(2), 3)
    shape = () if batch is None else (batch,)
    x = jr.normal(k1, shape + (DIM,), dtype)
    s = jr.uniform(k2, shape, dtype)
    t = jr.uniform(k3, shape, dtype)
    return x, s, t


def test_public_names():
    assert fmcalc.nn.MLP is MLP
    assert fmcalc.nn.Transformer is Transformer
    assert fmcalc.nn.sinusoidal_embedding is sinusoidal_embedding


def test_sinusoidal_embedding():
    emb = sinusoidal_embedding(0.0, 8)
    np.testing.assert_array_equal(emb, np.array([1.0] * 4 + [0.0] * 4))
    emb = sinusoidal_embedding(jnp.float32(0.5), 8, max_frequency=8.0)
    assert emb.shape == (8,) and emb.dtype == jnp.float32
    expected_angles = 0.5 * np.array([1.0, 2.0, 4.0, 8.0])
    np.testing.assert_allclose(
        emb, np.concatenate([np.cos(expected_angles), np.sin(expected_angles)]),
        rtol=1e-6,
    )  # fmt: skip
    with pytest.raises(ValueError, match="features=7"):
        sinusoidal_embedding(0.5, 7)
    # A TypeError when the jaxtyping hook checks the annotation, else a ValueError.
    with pytest.raises((ValueError, TypeError), match="scalar|parameter 't'"):
        sinusoidal_embedding(jnp.zeros(2), 8)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_shapes_per_example_and_vmap(name, dtype):
    model = MODELS[name](dtype)
    x, s, t = _inputs(dtype)
    out = _call(model, x, s, t)
    assert out.shape == (DIM,) and out.dtype == dtype
    xb, sb, tb = _inputs(dtype, batch=5)
    batched = _call_batched(model, xb, sb, tb)
    assert batched.shape == (5, DIM) and batched.dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 1e-12
    np.testing.assert_allclose(
        batched[0], _call(model, xb[0], sb[0], tb[0]), rtol=tol, atol=tol
    )
    assert _call(model, x, 0.3, 0.7).shape == (DIM,)  # Python-float times


@pytest.mark.slow
def test_transformer_is_zero_at_initialisation():
    model = _transformer(perturb=False)
    x, s, t = _inputs(jnp.float64)
    np.testing.assert_array_equal(_call(model, x, s, t), np.zeros(DIM))


@pytest.mark.slow
def test_transformer_channels_and_patches():
    model = Transformer(3 * 16 * 16, patch_size=4, channels=3, width=16, depth=1,
                        heads=2, time_features=8, key=jr.key(0))  # fmt: skip
    assert _call(model, jnp.ones(3 * 16 * 16), 0.5, 0.2).shape == (768,)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_class_conditioning(name):
    model = MODELS[name](num_classes=3)
    x, s, t = _inputs(jnp.float64)
    labels = [0, 1, 2, fmcalc.NULL_LABEL]
    outputs = [_call(model, x, s, t, cond=jnp.asarray(c)) for c in labels]
    for i in range(4):
        for j in range(i):
            assert not np.allclose(outputs[i], outputs[j])
    # `cond=None` is the null label.
    np.testing.assert_array_equal(_call(model, x, s, t), outputs[3])
    xb, sb, tb = _inputs(jnp.float64, batch=4)
    batched = eqx.filter_jit(jax.vmap(lambda x, s, t, c: model(x, s, t, cond=c)))(
        xb, sb, tb, jnp.array(labels)
    )
    assert batched.shape == (4, DIM)
    # `num_classes` is a label out of range, not "no label" (1-indexed labels would
    # lose their last class), and so is any negative label but the null one.
    for label in (3, -2):
        with pytest.raises(RuntimeError, match=r"class label in \[0, 3\) or"):
            _call(model, x, s, t, cond=jnp.asarray(label))
    with pytest.raises((ValueError, TypeError), match="scalar integer label|cond"):
        model(x, s, t, cond=jnp.array([0, 1]))


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_bad_calls(name):
    model = MODELS[name]()
    x, s, t = _inputs(jnp.float64)
    with pytest.raises(ValueError, match=r"unconditional.*cond=1"):
        model(x, s, t, cond=1)
    # A TypeError when the jaxtyping hook checks the annotation, else a ValueError.
    with pytest.raises((ValueError, TypeError), match=r"shape \(2, 64\)|f64\[2,64\]"):
        model(jnp.zeros((2, DIM)), s, t)
    with pytest.raises(ValueError, match=r"shape \(63,\)"):
        model(jnp.zeros(DIM - 1), s, t)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dim=60, patch_size=2), "not a perfect square"),
        (dict(dim=64, patch_size=3), "patch_size=3"),
        (dict(dim=65, patch_size=1, channels=2), "channels=2"),
        (dict(dim=64, patch_size=2, width=30, heads=4), "width=30, heads=4"),
        (dict(dim=64, patch_size=2, time_features=5), "time_features=5"),
        (dict(dim=64, patch_size=2, depth=0), "depth=0"),
        (dict(dim=64, patch_size=2, num_classes=0), "num_classes=0"),
    ],
)
def test_transformer_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Transformer(**kwargs, key=jr.key(0))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(width=0), "width=0"),
        (dict(depth=0), "depth=0"),
        (dict(time_features=3), "time_features=3"),
        (dict(num_classes=0), "num_classes=0"),
    ],
)
def test_mlp_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MLP(DIM, **kwargs, key=jr.key(0))


# The transformer's case compiles for about 14 s: in the full suite only.
@pytest.mark.parametrize(
    "name", ["mlp", pytest.param("transformer", marks=pytest.mark.slow)]
)
def test_jvp_matches_finite_difference(name):
    model = MODELS[name]()
    primals = _inputs(jnp.float64)
    tangents = (
        jr.normal(jr.key(3), (DIM,), jnp.float64),
        jnp.array(1.0),
        jnp.array(-0.5),
    )
    out, tangent_out = eqx.filter_jit(jax.jvp)(model, primals, tangents)
    np.testing.assert_allclose(out, _call(model, *primals))

    def shifted(h):
        moved = (p + h * d for p, d in zip(primals, tangents, strict=True))
        return _call(model, *moved)

    h = 1e-6
    central = (shifted(h) - shifted(-h)) / (2 * h)
    scale = np.max(np.abs(central))
    np.testing.assert_allclose(tangent_out, central, rtol=1e-6, atol=1e-6 * scale)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_grad_through_jvp_matches_finite_difference(name):
    # A loss of the Eulerian kind: the jvp's tangent is differentiated (second order).
    x, s, t = _inputs(jnp.float64)

    def loss(model):
        _, dV = jax.jvp(lambda s: model(x, s, t), (s,), (jnp.ones_like(s),))
        return jnp.sum(dV**2)

    model = MODELS[name]()
    grads = eqx.filter_jit(eqx.filter_grad(loss))(model)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    leaves, treedef = jax.tree.flatten(params)
    keys = jr.split(jr.key(4), len(leaves))
    direction = jax.tree.unflatten(
        treedef,
        [
            jr.normal(k, leaf.shape, leaf.dtype)
            for leaf, k in zip(leaves, keys, strict=True)
        ],
    )

    @eqx.filter_jit
    def along(h):
        moved = jax.tree.map(lambda p, d: p + h * d, params, direction)
        return loss(eqx.combine(moved, static))

    h = 1e-5
    central = (along(h) - along(-h)) / (2 * h)
    directional = sum(
        jnp.vdot(g, d)
        for g, d in zip(jax.tree.leaves(eqx.filter(grads, eqx.is_inexact_array)),
                        jax.tree.leaves(direction), strict=True)
    )  # fmt: skip
    np.testing.assert_allclose(directional, central, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_float32_jvp_and_second_order(name):
    model = MODELS[name](jnp.float32)
    x, s, t = _inputs(jnp.float32, batch=4)

    def loss(model):
        def per_example(x, s, t):
            V, dV = jax.jvp(lambda x, s: model(x, s, t), (x, s), (x, jnp.ones_like(s)))
            return jnp.sum(V**2) + jnp.sum(dV**2)

        return jnp.mean(jax.vmap(per_example)(x, s, t))

    value, grads = eqx.filter_jit(eqx.filter_value_and_grad(loss))(model)
    assert value.dtype == jnp.float32 and jnp.isfinite(value)
    for g in jax.tree.leaves(eqx.filter(grads, eqx.is_inexact_array)):
        assert g.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g)))


@pytest.mark.slow
def test_mlp_skip_gates_the_input_through():
    plain = MLP(DIM, width=8, depth=2, time_features=16, key=jr.key(0))
    gated = MLP(DIM, width=8, depth=2, time_features=16, skip=True, key=jr.key(0))
    # The gate has a key of its own: the shared layers start the same.
    assert plain.gate is None
    for a, b in zip(plain.layers, gated.layers, strict=True):
        np.testing.assert_array_equal(a.weight, b.weight)
    x = jr.normal(jr.key(1), (DIM,))
    gate = gated.gate
    assert gate is not None
    times = jnp.concatenate(
        [sinusoidal_embedding(t, 16, dtype=x.dtype) for t in (0.9, 0.3)]
    )
    expected = plain(x, 0.9, 0.3) + gate(times) * x
    np.testing.assert_allclose(gated(x, 0.9, 0.3), expected, rtol=1e-6, atol=1e-6)
    # Width 8 < dim 64: only the gate can return x itself. Zero the MLP's output
    # layer and the network is g(s, t) x, proportional to its input.
    last = gated.layers[-1]
    zeroed = eqx.tree_at(
        lambda m: (m.layers[-1].weight, m.layers[-1].bias),
        gated,
        (jnp.zeros_like(last.weight), jnp.zeros_like(last.bias)),
    )
    out = zeroed(x, 0.9, 0.3)
    np.testing.assert_allclose(out, gate(times) * x, rtol=1e-6)
    assert float(jnp.abs(gate(times))) > 0
