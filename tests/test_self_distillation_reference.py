"""The self-distillation methods (LSD, PSD, ESD) under `preset="reference"`: the
learned log-variance weight and the noise scale of their authors' code
(nmboffi/flow-maps, read as roni-dot/regularized-loss-flow-maps at afdaefa,
py/common/losses.py), and the checks on both options."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_same_loss_and_grads, without_runtime_typechecks

import fmcalc
from fmcalc import methods
from fmcalc.nn import MLP, LogVarianceMLP, WithLogVariance


SIGMA = 0.5


def _model(key=1):
    """An MLP and a log-variance whose last layer is moved off zero, so that `w`
    depends on both times."""
    k_net, k_w, k_last = jax.random.split(jax.random.key(key), 3)
    weight = LogVarianceMLP(width=16, time_features=8, key=k_w)
    last = weight.layers[-1]
    moved = jax.tree.map(lambda a: 0.3 * jax.random.normal(k_last, a.shape), last)
    weight = eqx.tree_at(lambda w: w.layers[-1], weight, moved)
    return WithLogVariance(MLP(3, width=32, depth=2, key=k_net), weight)


def _jump(model, x, s, t):
    return x + (t - s) * model(x, s, t)


# The off-diagonal residual of each method, written from the paper and their code:
# the teacher is the online network under stop-gradient.
def _lsd(model, x, s, t, u):
    end, d_t = jax.jvp(lambda t: _jump(model, x, s, t), (t,), (jnp.ones_like(t),))
    end = jax.lax.stop_gradient(end)
    return d_t - jax.lax.stop_gradient(model(end, t, t))


def _psd(model, x, s, t, u):
    r = (u - s) / (t - s)
    mid = _jump(model, x, s, u)
    target = r * model(x, s, u) + (1 - r) * model(mid, u, t)
    return model(x, s, t) - jax.lax.stop_gradient(target)


def _esd(model, x, s, t, u):
    jump = lambda x, s: _jump(model, x, s, t)  # noqa: E731
    _, d_s = jax.jvp(lambda s: jump(x, s), (s,), (jnp.ones_like(s),))
    velocity = jax.lax.stop_gradient(model(x, s, s))
    _, advection = jax.jvp(lambda x: jump(x, s), (x,), (velocity,))
    return d_s + jax.lax.stop_gradient(advection)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, off_diagonal", [("lsd", _lsd), ("psd", _psd), ("esd", _esd)]
)
def test_reference_loss_is_the_formula_of_their_code(name, off_diagonal):
    """`x_s = (1 - s) x0 + s σ eps` with `σ = 0.5`; on the diagonal rows (`s = t`)
    `e^{-w(t, t)} ‖V(x_t, t, t) - (σ eps - x0)‖² + w(t, t)`, on the others
    `e^{-w(s, t)} ‖R‖² + w(s, t)` with the method's residual `R`, both summed over
    dimensions and averaged over the batch; the gradient reaches both networks."""
    method = methods.get(name, preset="reference")
    assert method.noise_scale == SIGMA
    model = _model()
    x0 = jax.random.normal(jax.random.key(2), (24, 3))
    batch = method.batch(jax.random.key(3), x0)
    u = batch.s if batch.u is None else batch.u

    def row(model, x0, eps, s, t, u):
        x = (1 - s) * x0 + s * eps
        w = model.log_variance(s, t)
        diagonal = model(x, t, t) - (eps - x0)
        residual = jax.lax.cond(
            s == t, lambda: diagonal, lambda: off_diagonal(model, x, s, t, u)
        )
        return jnp.exp(-w) * jnp.sum(residual**2) + w

    def by_formula(model):
        rows = (batch.x0, batch.eps, batch.s, batch.t, u)
        return jnp.mean(jax.vmap(lambda *a: row(model, *a))(*rows))

    eps_scale = float(np.std(np.asarray(batch.eps)))
    assert 0.35 < eps_scale < 0.65, eps_scale  # noise of scale σ, not 1
    grads = assert_same_loss_and_grads(
        lambda m: method.loss(m, batch)[0], by_formula, model
    )
    weight_grads = jax.tree.leaves(grads.weight)
    assert any(np.abs(g).max() > 0 for g in weight_grads), "w is not trained"


@pytest.mark.slow
def test_a_constant_weight_is_their_mlp_and_is_not_trained():
    """Their MLPs return `w = 1`: the loss is `e^{-1} L + 1` of the plain one."""
    net = MLP(3, width=16, depth=1, key=jax.random.key(0))
    x0 = jax.random.normal(jax.random.key(1), (16, 3))
    reference = methods.get("lsd", preset="reference")
    plain = methods.get("lsd", noise_scale=SIGMA)
    batch = reference.batch(jax.random.key(2), x0)
    weighted, grads = eqx.filter_value_and_grad(lambda m: reference.loss(m, batch)[0])(
        WithLogVariance(net, 1.0)
    )
    unweighted = plain.loss(net, batch)[0]
    np.testing.assert_allclose(weighted, np.exp(-1) * unweighted + 1, rtol=1e-12)
    assert grads.weight is None or not jax.tree.leaves(grads.weight)


def test_the_weight_needs_a_model_that_has_one():
    method = methods.get("lsd", preset="reference")
    batch = method.batch(jax.random.key(0), jnp.zeros((8, 3)))
    net = MLP(3, width=8, depth=1, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"model \(MLP\) has none: wrap it"):
        method.loss(net, batch)
    with (
        without_runtime_typechecks(),
        pytest.raises(ValueError, match=r"must be 'aux' or 'model'; got 'online'"),
    ):
        fmcalc.LogVariance(source="online")  # pyright: ignore[reportArgumentType]
    both = fmcalc.Sum(fmcalc.LogVariance(), fmcalc.LogVariance(source="model"))
    with pytest.raises(ValueError, match="from both the model and `aux`"):
        method.replace(loss=both).loss(WithLogVariance(net, 1.0), batch)
    with (
        without_runtime_typechecks(),
        pytest.raises(TypeError, match=r"a function `w\(s, t\)` or a constant"),
    ):
        WithLogVariance(net, "one")  # pyright: ignore[reportArgumentType]


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_noise_scale_is_checked(bad):
    with pytest.raises(ValueError, match=rf"`noise_scale` must be a positive.*{bad}"):
        methods.get("lsd", noise_scale=bad)
    with pytest.raises(ValueError, match=r"sample_batch\(noise_scale=...\)"):
        fmcalc.sample_batch(
            lambda x, s, t: x, jnp.zeros((2, 2)), steps=1, kind="two-time",
            noise_scale=bad,
        )  # fmt: skip


def test_the_kit_refuses_a_scaled_noise_and_says_what_to_check():
    method = methods.get("lsd", preset="reference")
    for check in (fmcalc.testing.check_fixed_point, fmcalc.testing.check_stability):
        with pytest.raises(ValueError, match=r"noise_scale=0.5.*replace\(noise_scale"):
            check(method, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"check_training.*noise_scale=0.5"):
        fmcalc.testing.check_training(method, key=jax.random.key(0))


def test_consistency_sampling_renoises_at_the_noise_scale():
    """With `V = 0` (`F(x, s, t) = x`), two jumps give `x̂ = ½ noise + ½ σ eps`: the
    re-noising part scales with `σ`."""
    noise = jax.random.normal(jax.random.key(0), (64, 2))
    drawn = {
        scale: fmcalc.sample_batch(
            lambda x, s, t: jnp.zeros_like(x), noise, steps=2, kind="to-data",
            key=jax.random.key(1), noise_scale=scale,
        ) - 0.5 * np.asarray(noise)
        for scale in (1.0, 2.0)
    }  # fmt: skip
    assert np.abs(drawn[1.0]).max() > 0.1
    np.testing.assert_allclose(drawn[2.0], 2 * drawn[1.0], rtol=1e-12)


@pytest.mark.slow
def test_fit_trains_the_weight_with_the_network():
    method = methods.get("lsd", preset="reference")
    model = WithLogVariance(
        MLP(2, width=32, depth=2, key=jax.random.key(0)),
        LogVarianceMLP(width=16, key=jax.random.key(1)),
    )
    data = jax.random.normal(jax.random.key(2), (256, 2)) * 0.5
    result = fmcalc.train.fit(
        method, model, data, key=jax.random.key(3), steps=50, batch_size=64
    )
    w = jax.vmap(result.model.log_variance)(jnp.linspace(0, 1, 5), jnp.zeros(5))
    assert np.isfinite(np.asarray(w)).all()
    assert np.abs(np.asarray(w)).max() > 1e-4, "the log-variance did not move"
    assert np.isfinite(result.losses).all()


def test_a_cast_network_keeps_its_learned_weight():
    """Under mixed precision the networks are wrapped to compute in 16 bits; the
    log-variance is read through the wrapper, in that dtype, and returned in the
    dtype of the times."""
    weight = LogVarianceMLP(width=8, key=jax.random.key(0))
    moved = eqx.tree_at(lambda w: w.layers[-1].bias, weight, jnp.asarray(0.75))
    model = WithLogVariance(MLP(2, width=8, depth=1, key=jax.random.key(1)), moved)
    cast = fmcalc.train.Precision(jnp.bfloat16)(model)
    s, t = jnp.asarray(0.5), jnp.asarray(0.25)
    w = cast.log_variance(s, t)
    assert w.dtype == s.dtype
    assert w == pytest.approx(float(model.log_variance(s, t)), abs=2e-2)
    plain = fmcalc.train.Precision(jnp.bfloat16)(model.network)
    assert getattr(plain, "log_variance", None) is None
