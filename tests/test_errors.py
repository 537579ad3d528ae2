"""Bad input gets a clear error that names the value and what would be right, and
a fault is survived: the catalogue of what fmcalc refuses and why.

Faults that need a subprocess (signals) and every damaged part of a checkpoint are
in `test_faults.py`.
"""

import re
import subprocess
import sys
import warnings
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import fit, random_batch, random_gaussian

import fmcalc
from fmcalc import (
    JVP,
    ConditionalVelocity,
    D,
    FiniteDifference,
    FlowMap,
    Network,
    S,
    T,
    Teacher,
    U,
    X,
    sg,
    train,
)
from fmcalc.flows import Gaussian, GaussianMixture, PointCloud
from fmcalc.nn import MLP


V = Network()
F = FlowMap(V)
v_c = ConditionalVelocity()


@pytest.fixture(scope="module")
def flow():
    return random_gaussian(jax.random.PRNGKey(0), 3)


def _example(flow):
    batch = random_batch(jax.random.PRNGKey(1), flow, 4)
    return jax.tree.map(lambda a: a[0], batch)


# Batches -----------------------------------------------------------------------


def test_batch_shape_mismatch():
    with pytest.raises(ValueError, match=r"same shape; got \(4, 3\) and \(4, 2\)"):
        fmcalc.Batch(jnp.zeros((4, 3)), jnp.zeros((4, 2)), jnp.zeros(4), jnp.zeros(4))


def test_batch_time_shape():
    with pytest.raises(ValueError, match=r"batch shape \(4,\).*got shape \(4, 1\)"):
        fmcalc.Batch(
            jnp.zeros((4, 3)), jnp.zeros((4, 3)), jnp.zeros((4, 1)), jnp.zeros(4)
        )


def test_batch_times_outside_unit_interval():
    with pytest.raises(ValueError, match=r"`t` must lie in \[0, 1\].*1\.5"):
        fmcalc.Batch(
            jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.ones(2), jnp.array([0.5, 1.5])
        )


def test_batch_integer_data():
    with pytest.raises(TypeError, match="`x0` must be a floating array; got int"):
        fmcalc.Batch(
            jnp.zeros((2, 3), int), jnp.zeros((2, 3), int), jnp.ones(2), jnp.ones(2)
        )


# Analytic flows ----------------------------------------------------------------


def test_gaussian_cov_shape():
    with pytest.raises(ValueError, match=r"`cov` must have shape \(3, 3\).*\(2, 2\)"):
        Gaussian(jnp.zeros(3), jnp.eye(2))


def test_gaussian_non_symmetric():
    with pytest.raises(ValueError, match="must be symmetric"):
        Gaussian(jnp.zeros(2), jnp.array([[1.0, 0.5], [0.0, 1.0]]))


def test_gaussian_not_psd():
    with pytest.raises(ValueError, match="positive semi-definite.*-1"):
        Gaussian(jnp.zeros(2), jnp.diag(jnp.array([1.0, -1.0])))


def test_point_mass_from_s_zero():
    point = Gaussian(jnp.ones(2), jnp.zeros((2, 2)))
    flow_map = jax.jit(lambda x, s, t: point.flow_map(x, s, t))
    with pytest.raises(Exception, match="singular covariance.*s = 0"):
        flow_map(jnp.ones(2), 0.0, 0.5).block_until_ready()


def test_gaussian_wrong_point_shape(flow):
    with pytest.raises(ValueError, match=r"one example of shape \(3,\).*\(2,\)"):
        flow.velocity(jnp.zeros(2), 0.5)


# Derivative strategies ---------------------------------------------------------


def test_unknown_scheme():
    with pytest.raises(ValueError, match="Unknown finite-difference scheme 'backward'"):
        FiniteDifference(1e-3, "backward")  # pyright: ignore[reportArgumentType]


def test_non_positive_step():
    with pytest.raises(ValueError, match="finite positive number.*got -0.1"):
        FiniteDifference(-0.1)


@pytest.mark.slow
def test_step_below_dtype_resolution(flow):
    flow32 = Gaussian(flow.mean.astype(jnp.float32), jnp.eye(3, dtype=jnp.float32))
    batch = random_batch(jax.random.PRNGKey(2), flow32, 4)
    batch = jax.tree.map(lambda a: a.astype(jnp.float32), batch)
    expr = fmcalc.meanflow(derivative=FiniteDifference(1e-9), velocity=Teacher())
    with pytest.raises(
        ValueError, match="step 1e-09 is at or below the resolution of float32"
    ):
        fmcalc.residual_loss(expr, flow32, batch, teacher=flow32.velocity)


def test_unknown_derivative_strategy():
    # Under the test suite's jaxtyping hook the annotation check answers first.
    with pytest.raises(
        TypeError, match="`by` must be a derivative strategy|parameter 'by'"
    ):
        D(V, at=(X, S, T), along=(0, 1, 0), by="jvp")  # pyright: ignore[reportArgumentType]


# Builders and strategy names ---------------------------------------------------


def test_unknown_form():
    with pytest.raises(ValueError, match="Unknown form 'G'; expected one of"):
        fmcalc.eulerian(form="G")  # pyright: ignore[reportArgumentType]


def test_unknown_stop_gradient_placement():
    with pytest.raises(ValueError, match="Unknown stop_gradient.*'full'"):
        fmcalc.lagrangian(stop_gradient="full")  # pyright: ignore[reportArgumentType]


def test_unknown_network_role():
    with pytest.raises(ValueError, match="Unknown network role 'teacher'"):
        Network("teacher")


def test_fraction_outside_unit_interval():
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\); got 1.5"):
        fmcalc.compositional(u=1.5)


def test_ema_decay_out_of_range(flow):
    with pytest.raises(ValueError, match=r"decay` must lie in \[0, 1\]; got 1.5"):
        fmcalc.ema_update(flow, flow, 1.5)


# Invalid expression trees ------------------------------------------------------


def test_vector_plus_time():
    with pytest.raises(TypeError, match="Cannot add a vector .*`x`.* and a time"):
        X + S


def test_arguments_in_wrong_order():
    with pytest.raises(TypeError, match="first argument of V.*must be a vector"):
        V(S, X, T)


def test_divide_by_vector():
    with pytest.raises(TypeError, match="Can only divide by a time"):
        S / X


def test_non_numeric_leaf():
    with pytest.raises(TypeError, match="Cannot use 'x'"):
        V(X, S, T) + "x"  # pyright: ignore[reportOperatorIssue]


def test_derivative_point_arity():
    with pytest.raises(ValueError, match="three entries"):
        D(V, at=(X, S), along=(0, 1, 0))


def test_conditional_velocity_away_from_x_s():
    with pytest.raises(ValueError, match=r"called at \(F\(x, s, t\), t\).*biased"):
        v_c(F(X, S, T), T)


def test_conditional_velocity_squared():
    with pytest.raises(ValueError, match="non-linear in the conditional velocity"):
        fmcalc.validate(V(X, S, T) - sg(v_c(X, S) * v_c(X, S)))


def test_conditional_velocity_through_network():
    with pytest.raises(ValueError, match="evaluates a network at a point that depends"):
        fmcalc.validate(V(X, S, T) - sg(V(X + v_c(X, S), S, T)))


def test_conditional_velocity_outside_stop_gradient():
    with pytest.raises(ValueError, match="not under a stop-gradient"):
        fmcalc.eulerian(stop_gradient="none", velocity=v_c)


def test_conditional_velocity_times_prediction():
    with pytest.raises(ValueError, match="multiplies a term that carries gradient"):
        fmcalc.validate(V(X, S, T) * v_c(X, S))


def test_conditional_velocity_finite_difference():
    with pytest.raises(ValueError, match="finite difference along the conditional"):
        fmcalc.meanflow(derivative=FiniteDifference(1e-3))


def test_residual_must_be_a_vector():
    with pytest.raises(TypeError, match="must be a vector shaped like x"):
        fmcalc.validate(T - S)


def test_jvp_tangent_from_own_primal(flow):
    expr = D(V, at=(X, S, T), along=(V(X, S, T), 1, 0), by=JVP())
    with pytest.raises(ValueError, match="depends on its own primal"):
        fmcalc.evaluate(expr, _example(flow), model=flow)


def test_missing_teacher(flow):
    with pytest.raises(ValueError, match="`teacher=None`"):
        fmcalc.evaluate(fmcalc.lagrangian(), _example(flow), model=flow)


def test_missing_network(flow):
    expr = fmcalc.meanflow(target_network=Network("ema"))
    with pytest.raises(ValueError, match="role 'ema', but none was passed"):
        fmcalc.evaluate(expr, _example(flow), model=flow)


def test_missing_intermediate_time(flow):
    batch = random_batch(jax.random.PRNGKey(1), flow, 4, with_u=False)
    with pytest.raises(ValueError, match="uses the time `u`"):
        fmcalc.residual_loss(fmcalc.compositional(u=U), flow, batch)


def test_evaluate_takes_one_example(flow):
    batch = random_batch(jax.random.PRNGKey(1), flow, 4)
    with pytest.raises(ValueError, match="acts on one example"):
        fmcalc.evaluate(fmcalc.meanflow(), batch, model=flow)


# Training: no broken state is kept or saved --------------------------------------

FLOW_MATCHING = fmcalc.methods.get("flow-matching")
OPTIMIZER = optax.adam(1e-2)


def _mlp(key: int = 0, **options) -> MLP:
    options = dict(width=16, depth=2, time_features=8, dtype=jnp.float32) | options
    return MLP(2, key=jax.random.key(key), **options)


def _data(n: int = 64) -> jax.Array:
    return jax.random.normal(jax.random.key(1), (n, 2), jnp.float32)


def _fit(method=FLOW_MATCHING, model=None, data=None, **options) -> train.TrainResult:
    defaults: dict[str, Any] = dict(
        key=jax.random.key(2),
        steps=20,
        batch_size=16,
        optimizer=OPTIMIZER,
        ema=train.EMA(decay=0.999),
    )
    model = _mlp() if model is None else model
    data = _data() if data is None else data
    return fit(method, model, data, **(defaults | options))


def _params(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array))]


@pytest.mark.slow
def test_nan_learning_rate_never_reaches_the_checkpoint(tmp_path):
    path = tmp_path / "c.eqx"
    with pytest.warns(RuntimeWarning, match="breaks the state"):
        with pytest.raises(train.NonFiniteError, match="learning rate") as error:
            _fit(
                optimizer=optax.adam(float("nan")),
                steps=30,
                checkpoint=train.Checkpoint(path, every=1),
            )
    assert "finite loss and gradient but an update" in str(error.value)
    assert "`model.layers[0].weight`" in str(error.value)
    assert error.value.leaves and not error.value.rows
    assert not path.exists()


@pytest.mark.slow
def test_exploding_update_keeps_the_good_checkpoint(tmp_path):
    path = tmp_path / "c.eqx"
    good = _fit(steps=20, checkpoint=train.Checkpoint(path, every=10))
    with pytest.warns(RuntimeWarning, match="skipped"):
        with pytest.raises(train.NonFiniteError, match="update"):
            _fit(
                steps=30,
                checkpoint=train.Checkpoint(path, every=10),
                optimizer=optax.adam(1e30),
            )
    kept = train.load_checkpoint(path, good.state)
    assert kept.step == 20
    for x, y in zip(_params(kept.model), _params(good.model), strict=True):
        assert np.array_equal(x, y)


@pytest.mark.slow
def test_nan_in_a_learning_rate_schedule_blames_the_optimiser():
    schedule = lambda step: jnp.where(step < 3, 1e-3, jnp.nan)  # noqa: E731
    with pytest.warns(RuntimeWarning):
        with pytest.raises(train.NonFiniteError, match="learning rate") as error:
            _fit(optimizer=optax.adam(schedule), steps=30, max_nonfinite=3)
    assert error.value.step == 5 and error.value.rows == {}
    assert "The data and the model are not at fault" in str(error.value)


@pytest.mark.slow
def test_negative_learning_rate_is_refused():
    with pytest.raises(ValueError, match="points up the gradient.*negative"):
        _fit(optimizer=optax.adam(-1e-3))


@pytest.mark.slow
def test_learning_rate_schedule_turning_negative_stops_the_run():
    schedule = optax.linear_schedule(1e-3, -1e-3, 20)
    with pytest.raises(train.DivergenceError, match="up the gradient .* negative"):
        _fit(
            optimizer=optax.adam(schedule),
            steps=100,
            divergence=train.Divergence(uphill=5),
        )


@pytest.mark.slow
def test_runaway_parameters_are_blamed_not_the_data():
    with pytest.warns(RuntimeWarning):
        with pytest.raises(train.NonFiniteError, match="run away since") as error:
            _fit(optimizer=optax.adam(1e10), max_nonfinite=3)
    assert "optimiser is at fault, not the data" in str(error.value)


@pytest.mark.slow
def test_divergence_stops_the_run_and_names_the_term():
    model = _mlp(dtype=jnp.float64)
    schedule = optax.piecewise_constant_schedule(1e-2, {15: 300.0})
    with pytest.raises(train.DivergenceError, match="diverged at step") as error:
        _fit(
            model=model,
            data=_data().astype(jnp.float64),
            optimizer=optax.sgd(schedule),
            clip_norm=None,
            steps=200,
            divergence=train.Divergence(warmup=10),
        )
    assert error.value.terms == ["flow-matching"]
    assert "'flow-matching' " in str(error.value)
    assert error.value.loss > 1e6 * error.value.minimum


@pytest.mark.parametrize(
    "options, error, match",
    [
        (dict(factor=-1.0), ValueError, "finite positive number; got -1.0"),
        (dict(factor=float("inf")), ValueError, "finite positive number; got inf"),
        (dict(smoothing=1.0), ValueError, r"must lie in \[0, 1\); got 1.0"),
        (dict(warmup=1.5), TypeError, "must be an integer; got 1.5|parameter 'warmup'"),
        (dict(warmup=-1), ValueError, "must be >= 0; got -1"),
        (dict(uphill=0), ValueError, "must be >= 1; got 0"),
    ],
)
def test_bad_divergence_options(options, error, match):
    with pytest.raises(error, match=match):
        train.Divergence(**options)


def test_bad_resume_option(tmp_path):
    with pytest.raises(
        (ValueError, TypeError), match="or 'weights-only'; got 'yes'|parameter 'resume'"
    ):
        _fit(checkpoint=train.Checkpoint(tmp_path / "run.eqx", resume="yes"))  # pyright: ignore[reportArgumentType]


def test_bad_divergence_option():
    with pytest.raises(
        TypeError, match="Divergence.*or None; got 1000.0|parameter 'divergence'"
    ):
        _fit(divergence=1e3)  # pyright: ignore[reportArgumentType]


def test_checkpoint_path_that_is_a_directory_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match="must be a file path; .* is a directory"):
        _fit(steps=10**9, checkpoint=tmp_path)


def test_unwritable_checkpoint_path_fails_before_training(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(OSError, match="cannot write its checkpoint.*Nothing was"):
        _fit(steps=10**9, checkpoint=tmp_path / "file" / "run.eqx")


class _Wrapped(eqx.Module):
    """An `eqx.nn.MLP` as a model: its activation is a field, not a shape."""

    mlp: eqx.nn.MLP

    def __call__(self, x, s, t, *, cond=None):
        return self.mlp(jnp.concatenate([x, jnp.stack([s, t]).astype(x.dtype)]))


@pytest.mark.slow
def test_resume_refuses_another_activation(tmp_path):
    path = tmp_path / "c.eqx"

    def model(activation):
        mlp = eqx.nn.MLP(4, 2, 8, 1, activation=activation, key=jax.random.key(0))
        return _Wrapped(eqx.tree_at(lambda m: m.layers, mlp, replace_fn=_as_float32))

    _fit(model=model(jax.nn.silu), steps=2, checkpoint=path)
    with pytest.raises(train.CheckpointError, match="another model") as error:
        _fit(model=model(jax.nn.relu), steps=4, checkpoint=path)
    assert "`.model.mlp.activation` is jax._src.nn.functions.silu there but " in str(
        error.value
    )


def _as_float32(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


@pytest.mark.slow
def test_resume_refuses_another_method(tmp_path):
    path = tmp_path / "c.eqx"
    _fit(steps=2, checkpoint=path)
    with pytest.raises(train.CheckpointError, match="another run: `method`") as error:
        _fit(fmcalc.methods.get("lsd"), steps=4, checkpoint=path)
    assert "name='flow-matching'" in str(error.value)
    assert "resume='weights-only'" in str(error.value)


@pytest.mark.slow
def test_resume_refuses_another_batch_size(tmp_path):
    path = tmp_path / "c.eqx"
    _fit(steps=2, checkpoint=path)
    with pytest.raises(train.CheckpointError, match="`batch_size` is 16 there but 8"):
        _fit(steps=4, batch_size=8, checkpoint=path)


@pytest.mark.slow
def test_weights_only_resume_starts_a_new_run_from_the_weights(tmp_path):
    path = tmp_path / "c.eqx"
    first = _fit(steps=6, checkpoint=path)
    tuned = _fit(
        steps=3, batch_size=8, checkpoint=train.Checkpoint(path, resume="weights-only")
    )
    assert tuned.step == 3 and tuned.losses.shape == (3,)
    assert train.checkpoint_header(path)["run"]["batch_size"] == 8
    # Rerun, the same call continues its own run rather than starting over.
    again = _fit(
        steps=3, batch_size=8, checkpoint=train.Checkpoint(path, resume="weights-only")
    )
    assert again.losses.shape == (0,)
    assert not all(
        np.array_equal(x, y)
        for x, y in zip(_params(first.model), _params(tuned.model), strict=True)
    )


@pytest.mark.slow
def test_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path):
    path = tmp_path / "c.eqx"
    _fit(steps=10, checkpoint=train.Checkpoint(path, every=5))
    contents = path.read_bytes()
    path.write_bytes(contents[:-10])
    with pytest.warns(RuntimeWarning, match="is damaged.*previous checkpoint"):
        resumed = _fit(steps=10, checkpoint=train.Checkpoint(path, every=5))
    assert resumed.losses.shape == (5,) and resumed.step == 10


def test_flipped_data_byte_is_refused(tmp_path):
    path = tmp_path / "c.eqx"
    result = _fit(steps=2, checkpoint=path)
    contents = bytearray(path.read_bytes())
    contents[-3] ^= 0x40
    path.write_bytes(bytes(contents))
    with pytest.raises(train.CheckpointError, match="arrays do not match"):
        train.load_checkpoint(path, result.state)


@pytest.mark.slow
def test_flipped_header_byte_is_refused(tmp_path):
    path = tmp_path / "c.eqx"
    result = _fit(steps=2, checkpoint=path)
    contents = bytearray(path.read_bytes())
    contents[100] ^= 0x01
    path.write_bytes(bytes(contents))
    with pytest.raises(train.CheckpointError, match="header does not match"):
        train.load_checkpoint(path, result.state)


def test_save_checkpoint_to_a_directory(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory; pass a file path"):
        train.save_checkpoint(tmp_path, {"a": jnp.zeros(2)})


def test_float16_data_is_refused():
    with pytest.raises(TypeError, match="`data` is float16.*Pass float32"):
        _fit(data=_data().astype(jnp.float16))


def test_one_indexed_labels_are_refused():
    labels = jnp.arange(64) % 3 + 1
    with pytest.raises(ValueError, match=r"\[0, 3\).*got \[3.*subtract 1"):
        _fit(model=_mlp(num_classes=3), labels=labels)


def test_labels_are_checked_against_a_wrapped_model():
    class Wrapper(eqx.Module):
        inner: MLP

        def __call__(self, x, s, t, *, cond=None):
            return self.inner(x, s, t, cond=cond)

    labels = jnp.arange(64) % 4
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\).*got \[3"):
        _fit(model=Wrapper(_mlp(num_classes=3)), labels=labels)


def test_negative_labels_other_than_the_null_label_are_refused():
    labels = (jnp.arange(64) % 3).at[5].set(-2)
    with pytest.raises(ValueError, match=r"NULL_LABEL = -1.*got \[-2\] at rows \[5\]"):
        _fit(model=_mlp(num_classes=3), labels=labels)


@pytest.mark.slow
def test_null_labels_train():
    labels = (jnp.arange(64) % 3).at[::4].set(fmcalc.NULL_LABEL)
    result = _fit(model=_mlp(num_classes=3), labels=labels, steps=3)
    assert np.isfinite(result.losses).all()


def test_nonfinite_initial_model_is_refused():
    model = _mlp()
    bias = model.layers[1].bias
    model = eqx.tree_at(lambda m: m.layers[1].bias, model, bias * jnp.nan)
    with pytest.raises(ValueError, match=r"non-finite .*\['\.layers\[1\]\.bias'\]"):
        _fit(model=model)


def test_ema_horizon_longer_than_the_run_warns(tmp_path):
    with pytest.warns(fmcalc.EMAHorizonWarning, match="about 1000 steps.*'shortcut'"):
        # The warning comes before anything is trained (here: nothing is).
        with pytest.raises(ValueError, match="is a directory"):
            _fit(fmcalc.methods.get("shortcut"), steps=100, checkpoint=tmp_path)


@pytest.mark.parametrize("steps", [331, 1000, 4999])
def test_ema_horizon_of_a_fifth_of_the_run_is_quiet_and_more_warns(tmp_path, steps):
    shortcut = fmcalc.methods.get("shortcut")
    with warnings.catch_warnings():
        warnings.simplefilter("error", fmcalc.EMAHorizonWarning)
        with pytest.raises(ValueError, match="is a directory"):
            _fit(shortcut, steps=steps, checkpoint=tmp_path, ema=train.EMA(horizon=0.2))
    with pytest.warns(fmcalc.EMAHorizonWarning, match=r"a decay <= \S+, or more"):
        with pytest.raises(ValueError, match="is a directory"):
            _fit(
                shortcut, steps=steps, checkpoint=tmp_path, ema=train.EMA(horizon=0.21)
            )


def test_ema_horizon_of_a_method_without_ema_is_quiet(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", fmcalc.EMAHorizonWarning)
        with pytest.raises(ValueError, match="is a directory"):
            _fit(steps=100, checkpoint=tmp_path)


# Model and teacher outputs --------------------------------------------------------


class _Shaped(eqx.Module):
    """A model whose output has the wrong shape or dtype."""

    reshape: Any = eqx.field(static=True)

    def __call__(self, x, s, t, *, cond=None):
        return self.reshape(x * s + t)


def _loss(model, method=FLOW_MATCHING, **networks):
    x0 = jax.random.normal(jax.random.key(0), (4, 3))
    batch = method.batch(jax.random.key(1), x0)
    return method.loss(model, batch, **networks)


@pytest.mark.parametrize(
    "reshape, shape",
    [
        (lambda v: v[:, None], r"\(3, 1\)"),
        (lambda v: jnp.sum(v), r"\(\)"),
        (lambda v: v[:1], r"\(1,\)"),
    ],
    ids=["trailing axis", "scalar", "one entry"],
)
def test_model_output_of_the_wrong_shape(reshape, shape):
    with pytest.raises(
        ValueError, match=f"online network `V` .*_Shaped.* shape {shape}"
    ):
        _loss(_Shaped(reshape))


def test_model_output_of_the_wrong_shape_under_a_jvp():
    method = fmcalc.methods.get("meanflow")
    with pytest.raises(ValueError, match=r"returned shape \(3, 1\).*\(3,\)"):
        _loss(_Shaped(lambda v: v[:, None]), method)


def test_integer_model_output():
    with pytest.raises(TypeError, match="returned dtype int.*real floating"):
        _loss(_Shaped(lambda v: v.astype(jnp.int32)))


@pytest.mark.slow
def test_teacher_output_of_the_wrong_shape(flow):
    expr = fmcalc.lagrangian()
    with pytest.raises(ValueError, match=r"teacher `.*<lambda>` returned shape \(\)"):
        fmcalc.evaluate(
            expr, _example(flow), model=flow, teacher=lambda x, t: jnp.sum(x)
        )


@jax.custom_vjp
def _fused(x):
    return x


_fused.defvjp(lambda x: (x, None), lambda _, g: (g,))


class _CustomVJP(eqx.Module):
    def __call__(self, x, s, t, *, cond=None):
        return _fused(x * (1 + s - t))


@pytest.mark.slow
def test_jvp_through_a_custom_vjp_network_suggests_a_finite_difference():
    method = fmcalc.methods.get("lsd")
    with pytest.raises(TypeError, match="custom_vjp.*FiniteDifference") as error:
        _loss(_CustomVJP(), method, teacher=lambda x, t: x)
    assert str(error.value).count("FiniteDifference") == 1
    # The suggestion works.
    fd = method.replace(derivative=FiniteDifference(1e-3))
    loss, _ = _loss(_CustomVJP(), fd, teacher=lambda x, t: x)
    assert jnp.isfinite(loss)


# Finite-difference steps ----------------------------------------------------------


@pytest.mark.parametrize(
    "step, error, match",
    [
        (float("inf"), ValueError, "finite positive number.*got inf"),
        (float("nan"), ValueError, "finite positive number.*got nan"),
        (0.0, ValueError, "finite positive number.*got 0.0"),
        (0.5, ValueError, "at most 0.25.*got 0.5"),
        (True, TypeError, r"real number such as 1e-3; got True \(bool\)"),
        ("1e-3", TypeError, r"got '1e-3' \(str\)"),
    ],
)
def test_bad_finite_difference_step(step, error, match):
    with pytest.raises(error, match=match):
        FiniteDifference(step)


def test_numpy_finite_difference_step_is_accepted():
    strategy = FiniteDifference(np.float32(1e-3), "central")
    assert type(strategy.step) is float and strategy.order == 2


class _Recording(eqx.Module):
    """A model that records the times it is called at (eagerly)."""

    inner: Any
    calls: list = eqx.field(static=True)

    def __call__(self, x, s, t, *, cond=None):
        self.calls.append((float(s), float(t)))
        return self.inner(x, s, t)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["forward", "central"])
@pytest.mark.parametrize("along", [(0, 0, 1), (0, 1, 0), (0, 1, 1)])
def test_finite_difference_stays_in_the_unit_interval(flow, scheme, along):
    """At every corner of the time square the model is only called inside it, and
    the stencil keeps its order: halving the step divides the error by 2^order."""
    model = _Recording(flow, [])
    exact = D(F, at=(X, S, T), along=along, by=JVP())
    for s, t in [(1.0, 1.0), (0.0, 0.0), (1.0, 0.0), (0.0, 1.0)]:
        example = fmcalc.Batch(
            jnp.ones(3), -jnp.ones(3), jnp.asarray(s), jnp.asarray(t)
        )
        reference = fmcalc.evaluate(exact, example, model=flow)
        errors = []
        for h in (2e-3, 1e-3):
            expr = D(F, at=(X, S, T), along=along, by=FiniteDifference(h, scheme))
            value = fmcalc.evaluate(expr, example, model=model)
            errors.append(float(jnp.max(jnp.abs(value - reference))))
        order = FiniteDifference(1e-3, scheme).order
        assert errors[0] / errors[1] > 0.8 * 2**order, (s, t, errors)
    assert all(0 <= a <= 1 and 0 <= b <= 1 for a, b in model.calls)


def test_finite_difference_strategy_stays_in_the_unit_interval(flow):
    x, calls = jnp.ones(3), []

    def flow_map(x, s, t):
        calls.append((float(s), float(t)))
        return flow.flow_map(x, s, t)

    for scheme in ("forward", "central"):
        strategy = FiniteDifference(1e-4, scheme)
        _, approx = strategy(flow_map, (x, 1.0, 1.0), (0, 1.0, 1.0))
        _, exact = JVP()(flow.flow_map, (x, 1.0, 1.0), (jnp.zeros(3), 1.0, 1.0))
        assert float(jnp.max(jnp.abs(approx - exact))) < 1e-2
    assert all(0 <= s <= 1 and 0 <= t <= 1 for s, t in calls)


@pytest.mark.slow
@pytest.mark.parametrize(
    "scheme, step", [("forward", 1e-5), ("central", 1e-3)], ids=["forward", "central"]
)
def test_finite_difference_step_below_round_off_warns(scheme, step):
    flow32 = Gaussian(jnp.zeros(3, jnp.float32), jnp.eye(3, dtype=jnp.float32))
    batch = random_batch(jax.random.PRNGKey(2), flow32, 4)
    batch = jax.tree.map(lambda a: a.astype(jnp.float32), batch)
    expr = fmcalc.lagrangian(derivative=FiniteDifference(step, scheme))
    with pytest.warns(fmcalc.FiniteDifferenceStepWarning, match="below (sqrt|cbrt)"):
        fmcalc.residual_loss(expr, flow32, batch, teacher=flow32.velocity)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fmcalc.FiniteDifferenceStepWarning)
        batch64 = jax.tree.map(lambda a: a.astype(jnp.float64), batch)
        fmcalc.residual_loss(expr, flow32, batch64, teacher=flow32.velocity)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("scheme", ["forward", "central"])
def test_the_suggested_step_is_one_that_does_not_warn(dtype, scheme):
    """The warning's "use at least h" names a step at or above its own bound: taking
    it is quiet."""
    with pytest.warns(fmcalc.FiniteDifferenceStepWarning) as caught:
        FiniteDifference(1e-12 if dtype == jnp.float64 else 1e-6, scheme).check_dtype(
            dtype
        )
    message = str(caught[0].message)
    assert caught[0].filename == __file__  # the caller's line, not a wrapper's
    bound = float(re.search(r"\(eps\) = ([0-9.e+-]+) for", message).group(1))
    suggested = float(re.search(r"at least ([0-9.e+-]+),", message).group(1))
    assert suggested >= bound, message
    with warnings.catch_warnings():
        warnings.simplefilter("error", fmcalc.FiniteDifferenceStepWarning)
        FiniteDifference(suggested, scheme).check_dtype(dtype)


# Times ------------------------------------------------------------------------------


def test_batch_time_outside_unit_interval_under_jit():
    x0 = jnp.zeros((2, 3))

    @eqx.filter_jit
    def loss(t):
        batch = fmcalc.Batch(x0, jnp.ones((2, 3)), jnp.full(2, 0.5), t)
        return residual_loss_of(batch)

    def residual_loss_of(batch):
        return fmcalc.residual_loss(fmcalc.meanflow(), _Shaped(lambda v: v), batch)

    assert jnp.isfinite(loss(jnp.array([0.2, 0.4])))
    with pytest.raises(RuntimeError, match=r"Time `t` must lie in \[0, 1\]"):
        loss(jnp.array([0.2, 1.5]))


def test_batch_intermediate_time_outside_unit_interval():
    with pytest.raises(ValueError, match=r"Time `u` must lie in \[0, 1\].*-0.1"):
        fmcalc.Batch(
            jnp.zeros((2, 3)),
            jnp.zeros((2, 3)),
            jnp.ones(2),
            jnp.zeros(2),
            jnp.array([0.5, -0.1]),
        )


@pytest.mark.parametrize(
    "call",
    [
        lambda f, x: f.velocity(x, 1.5),
        lambda f, x: f.flow_map(x, 0.5, -0.2),
        lambda f, x: f.average_velocity(x, 1.01, 0.5),
    ],
    ids=["velocity", "flow_map", "average_velocity"],
)
def test_gaussian_time_outside_unit_interval(flow, call):
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        call(flow, jnp.zeros(3))


def test_gaussian_time_outside_unit_interval_under_jit(flow):
    flow_map = eqx.filter_jit(lambda t: flow.flow_map(jnp.zeros(3), 0.5, t))
    assert jnp.isfinite(flow_map(jnp.asarray(0.2))).all()
    with pytest.raises(RuntimeError, match=r"Time `t` must lie in \[0, 1\]"):
        flow_map(jnp.asarray(-0.1))


@pytest.fixture(scope="module")
def mixture():
    return GaussianMixture(
        jnp.array([0.5, 0.5]),
        jnp.array([[-1.0, 0.0], [1.0, 0.0]]),
        jnp.stack([jnp.eye(2) * 0.1] * 2),
        labels=jnp.array([0, 1]),
    )


def test_mixture_time_outside_unit_interval(mixture):
    with pytest.raises(ValueError, match=r"Time `t` must lie in \[0, 1\].*; got \[2\."):
        mixture.velocity(jnp.zeros(2), 2.0)


def test_point_cloud_time_outside_unit_interval():
    cloud = PointCloud(jnp.eye(2))
    with pytest.raises(
        ValueError, match=r"Time `s` must lie in \[0, 1\].*; got \[1\.2"
    ):
        cloud.average_velocity(jnp.zeros(2), 1.2, 0.5)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_flow_input_is_refused(flow, dtype):
    with pytest.raises(TypeError, match="analytic flows compute in float32"):
        flow.velocity(jnp.zeros(3, dtype), 0.5)


def test_integer_flow_input_is_refused(flow):
    with pytest.raises(TypeError, match="floating array; got dtype int|parameter 'x'"):
        flow.flow_map(jnp.zeros(3, jnp.int32), 0.5, 0.2)


# Labels -----------------------------------------------------------------------------


def test_mixture_component_with_the_null_label_is_refused():
    with pytest.raises(ValueError, match=r"labels >= 0 .*got \[-1, 0\]"):
        GaussianMixture(
            jnp.array([0.5, 0.5]),
            jnp.zeros((2, 2)),
            jnp.stack([jnp.eye(2)] * 2),
            labels=jnp.array([-1, 0]),
        )


def test_mixture_label_below_the_null_label_is_refused(mixture):
    velocity = eqx.filter_jit(lambda c: mixture.velocity(jnp.zeros(2), 0.5, cond=c))
    with pytest.raises(RuntimeError, match=r"not a class.*\(0, 1\).*NULL_LABEL"):
        velocity(jnp.asarray(-2))


def test_mixture_null_label_is_the_whole_mixture(mixture):
    x = jnp.array([0.3, 0.1])
    unlabelled = mixture.velocity(x, 0.5, cond=jnp.asarray(fmcalc.NULL_LABEL))
    np.testing.assert_allclose(unlabelled, mixture.velocity(x, 0.5), rtol=1e-12)


def test_model_label_equal_to_num_classes_under_jit():
    model = _mlp(num_classes=3)
    call = eqx.filter_jit(
        jax.vmap(lambda c: model(jnp.zeros(2, jnp.float32), 0.5, 0.2, cond=c))
    )
    assert call(jnp.array([0, 2, fmcalc.NULL_LABEL])).shape == (3, 2)
    with pytest.raises(RuntimeError, match=r"class label in \[0, 3\) or .*NULL_LABEL"):
        call(jnp.array([0, 3]))


def test_batch_labels_of_the_wrong_length():
    with pytest.raises(ValueError, match=r"batch shape \(4,\).*got shape \(3,\)"):
        fmcalc.Batch(
            jnp.zeros((4, 2)),
            jnp.zeros((4, 2)),
            jnp.ones(4),
            jnp.zeros(4),
            cond=jnp.zeros(3, int),
        )


def test_method_batch_labels_of_the_wrong_length():
    with pytest.raises(ValueError, match=r"batch shape \(4,\).*got shape \(3,\)"):
        FLOW_MATCHING.batch(
            jax.random.key(0), jnp.zeros((4, 2)), cond=jnp.zeros(3, int)
        )


def test_batch_label_below_the_null_label():
    with pytest.raises(ValueError, match=r"NULL_LABEL = -1 \(no label\); got \[-3\]"):
        fmcalc.Batch(
            jnp.zeros((2, 2)),
            jnp.zeros((2, 2)),
            jnp.ones(2),
            jnp.zeros(2),
            cond=jnp.array([0, -3]),
        )


def test_batch_label_below_the_null_label_under_jit():
    @eqx.filter_jit
    def build(cond):
        return fmcalc.Batch(
            jnp.zeros((2, 2)), jnp.zeros((2, 2)), jnp.ones(2), jnp.zeros(2), cond=cond
        ).cond

    assert build(jnp.array([0, -1])).shape == (2,)
    with pytest.raises(RuntimeError, match="NULL_LABEL = -1"):
        build(jnp.array([0, -3]))


# No NaN where the true value is finite ----------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "cov",
    [jnp.zeros((2, 2)), jnp.diag(jnp.array([0.0, 1.0]))],
    ids=["point mass", "rank deficient"],
)
def test_maps_to_the_data_end_have_finite_derivatives(cov):
    flow = Gaussian(jnp.array([1.0, -0.5]), cov)
    x, s = jnp.array([0.3, -0.2]), 0.5
    for fn in (flow.flow_map, flow.average_velocity):
        value, tangent = jax.jvp(lambda t, fn=fn: fn(x, s, t), (0.0,), (1.0,))
        h = 1e-6
        ahead = fn(x, s, h)
        assert jnp.isfinite(tangent).all()
        np.testing.assert_allclose(tangent, (ahead - value) / h, atol=1e-5)
        grad = jax.grad(lambda t, fn=fn: jnp.sum(fn(x, s, t)))(0.0)
        assert jnp.isfinite(grad)


def test_point_mass_flow_map_to_data_is_the_point():
    flow = Gaussian(jnp.array([1.0, -0.5]), jnp.zeros((2, 2)))
    x = jnp.array([0.3, -0.2])
    np.testing.assert_allclose(flow.flow_map(x, 0.7, 0.0), flow.mean, atol=1e-15)


def test_point_mass_velocity_near_the_data_end_in_float32():
    flow = Gaussian(jnp.zeros(2, jnp.float32), jnp.zeros((2, 2), jnp.float32))
    t = jnp.float32(1e-20)
    noise = jnp.array([0.5, -1.0], jnp.float32)
    np.testing.assert_allclose(flow.velocity(t * noise, t), noise, rtol=1e-6)


@pytest.mark.slow
def test_point_cloud_velocity_near_the_data_end_in_float32():
    cloud = PointCloud(jnp.array([[0.0, 1.0], [1.0, 0.0]], jnp.float32))
    t = jnp.float32(1e-20)
    x = jnp.array([1e-21, 1.0], jnp.float32)
    v = cloud.velocity(x, t)
    np.testing.assert_allclose(v, jnp.array([0.1, 0.0]), atol=1e-6)
    ones = jnp.ones(2, jnp.float32)
    _, tangent = jax.jvp(lambda x: cloud.velocity(x, t), (x,), (ones,))
    assert jnp.isfinite(tangent).all()


# Batches ----------------------------------------------------------------------------


def test_empty_batch():
    with pytest.raises(ValueError, match=r"at least one example.*\(0, 3\)"):
        fmcalc.Batch(jnp.zeros((0, 3)), jnp.zeros((0, 3)), jnp.zeros(0), jnp.zeros(0))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_batch_is_refused(dtype):
    x0 = jnp.zeros((2, 3), dtype)
    with pytest.raises(TypeError, match="`x0` is .*16.*pass float32 or float64"):
        fmcalc.Batch(x0, x0, jnp.ones(2), jnp.zeros(2))


def test_one_row_batch_with_a_split():
    method = fmcalc.methods.get("shortcut")
    with pytest.raises(ValueError, match="With 1 rows, .* gives the term .* no rows"):
        method.batch(jax.random.key(0), jnp.zeros((1, 2)))


# The command line -------------------------------------------------------------------


def _fmcalc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fmcalc", *args], capture_output=True, text=True
    )


@pytest.mark.slow
def test_cli_version():
    done = _fmcalc("--version")
    assert done.returncode == 0
    assert done.stdout.startswith(f"fmcalc {fmcalc.__version__} (jax ")


@pytest.mark.slow
def test_cli_unknown_command():
    done = _fmcalc("chek")
    assert done.returncode == 2 and "invalid choice: 'chek'" in done.stderr


@pytest.mark.slow
def test_cli_output_into_a_closed_pipe():
    def piped(reader):
        command = f"{sys.executable} -m fmcalc methods -v | {reader}"
        return subprocess.run(
            f"{command}; exit ${{PIPESTATUS[0]}}",
            shell=True,
            executable="/bin/bash",
            capture_output=True,
            text=True,
        )

    # `head` may read everything before it exits (the output fits a pipe's buffer).
    done = piped("head -1")
    assert done.stdout.startswith("method ")
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr
    assert done.returncode in (0, 141)
    # `true` exits before Python has started, so every write meets a closed pipe.
    done = piped("true")
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr
    assert done.returncode == 141


def test_distillation_without_a_teacher_is_refused():
    """`learning="distillation"` needs a teacher or a pre-trained map in a residual;
    the registry's distillation methods all read one."""
    terms = fmcalc.methods.get("lsd").terms
    with pytest.raises(
        ValueError, match=r"'distillation', but no term reads a teacher"
    ):
        fmcalc.Method("no-teacher", "lagrangian", "distillation", "V", terms)
    assert fmcalc.Method("lsd-again", "lagrangian", "self-distillation", "V", terms)
    for name in fmcalc.methods.names():
        method = fmcalc.methods.get(name)
        if method.learning == "distillation":
            assert method.networks & {"teacher", "aux"}, name


def test_data_files_that_are_not_npy_and_one_bad_row_are_named(tmp_path):
    from fmcalc.datasets import from_file

    text = tmp_path / "points.txt"
    text.write_text("0.1 0.2\n0.3 0.4\n")
    with pytest.raises(ValueError, match=r"points.txt' is not a .npy file.*loadtxt"):
        from_file(text)
    bad = tmp_path / "bad.npy"
    np.save(bad, np.array([[0.0, 1.0], [np.nan, 2.0], [3.0, 4.0]]))
    with pytest.raises(ValueError, match=r"has 1 row with NaN or infinity"):
        from_file(bad)
