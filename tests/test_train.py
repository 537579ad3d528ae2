"""The training loop: bit-for-bit resumption, the non-finite guard, atomic
checkpoints, interruption, hooks and argument checks.

Models are small float32 MLPs on 2-D data; every test of one configuration reuses the
same optimiser object, so the step compiles once per configuration and worker.
"""

import os
import re
import warnings
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import fit

import fmcalc
from fmcalc import train
from fmcalc.nn import MLP


DTYPE = jnp.float32
OPTIMIZER = optax.adam(1e-2)
FLOW_MATCHING = fmcalc.methods.get("flow-matching")
SHORTCUT = fmcalc.methods.get("shortcut")


def _model(key=0, **kwargs) -> MLP:
    options = dict(width=16, depth=2, time_features=8, dtype=DTYPE) | kwargs
    return MLP(2, key=jax.random.key(key), **options)


def _data(n: int = 64) -> jax.Array:
    return jax.random.normal(jax.random.key(1), (n, 2), DTYPE)


def _fit(method=FLOW_MATCHING, model=None, data=None, **kwargs) -> train.TrainResult:
    """`fit` on the small model and data, without a progress bar; the fields of
    `train.Options` may be passed as keywords."""
    arguments: dict[str, Any] = dict(
        key=jax.random.key(2),
        steps=20,
        batch_size=16,
        optimizer=OPTIMIZER,
        ema=train.EMA(decay=0.999),
    )
    model = _model() if model is None else model
    data = _data() if data is None else data
    return fit(method, model, data, **(arguments | kwargs))


def _state(model: MLP, step: int = 1) -> train.TrainState:
    """A state as `fit` builds it (gradient clipping keeps no arrays of its own)."""
    opt_state = OPTIMIZER.init(eqx.filter(model, eqx.is_inexact_array))
    return train.TrainState(model, model, opt_state, step, jax.random.key(0))


def _leaves(tree) -> list[np.ndarray]:
    def as_numpy(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x)

    return [as_numpy(x) for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array))]


def _assert_trees_equal(a, b):
    left, right = _leaves(a), _leaves(b)
    assert len(left) == len(right)
    for x, y in zip(left, right, strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y)


@pytest.fixture(scope="module")
def straight():
    """20 uninterrupted steps of the shortcut method (an EMA target)."""
    return _fit(SHORTCUT)


def test_public_names_are_documented():
    for name in [
        "fit",
        "TrainState",
        "TrainResult",
        "NonFiniteError",
        "save_checkpoint",
        "load_checkpoint",
        "checkpoint_header",
        "CheckpointError",
        "Divergence",
        "DivergenceError",
    ]:
        assert (getattr(fmcalc.train, name).__doc__ or "").strip(), name
    assert fmcalc.train.__doc__ and "fit(" in fmcalc.train.__doc__


@pytest.mark.slow
def test_fit_records_every_step():
    result = _fit(
        evaluation=train.Evaluation(lambda state: {"step": state.step}, every=8)
    )
    assert result.step == 20 and result.skipped == 0
    assert result.losses.shape == (20,) and np.isfinite(result.losses).all()
    assert set(result.metrics) == {
        "flow-matching/loss",
        "flow-matching/residual",
        "grad_norm",
    }
    assert all(v.shape == (20,) for v in result.metrics.values())
    np.testing.assert_allclose(result.metrics["flow-matching/loss"], result.losses)
    assert result.evaluations == [
        (8, {"step": 8.0}),
        (16, {"step": 16.0}),
        (20, {"step": 20.0}),
    ]
    # The EMA lags the model.
    model, ema = _leaves(result.model), _leaves(result.ema)
    assert not all(np.array_equal(m, e) for m, e in zip(model, ema, strict=True))
    _assert_trees_equal(result.state.model, result.model)


@pytest.mark.slow
def test_step_compiles_once():
    traces = []
    flow = fmcalc.flows.Gaussian(jnp.zeros(2, DTYPE), jnp.eye(2, dtype=DTYPE))

    def data(key, n):
        traces.append(n)
        return flow.sample(key, n)

    result = _fit(data=data, steps=6)
    assert traces == [16] and np.isfinite(result.losses).all()


@pytest.mark.slow
def test_no_ema_tracks_the_model():
    result = _fit(ema=None, steps=5, clip_norm=None)
    _assert_trees_equal(result.ema, result.model)


@pytest.mark.slow
def test_labels_reach_the_model():
    class NeedsLabel(eqx.Module):
        inner: MLP

        def __call__(self, x, s, t, *, cond=None):
            if cond is None:
                raise AssertionError("no label passed")
            return self.inner(x, s, t, cond=cond)

    labels = jnp.arange(64) % 3
    model = NeedsLabel(_model(num_classes=3))
    result = _fit(model=model, labels=labels, steps=3)
    assert np.isfinite(result.losses).all()


@pytest.mark.slow
def test_resume_is_bit_for_bit(straight, tmp_path):
    path = tmp_path / "run.eqx"
    first = _fit(SHORTCUT, steps=10, checkpoint=train.Checkpoint(path, every=4))
    assert train.load_checkpoint(path, first.state).step == 10
    # A different key is ignored in favour of the checkpoint's.
    second = _fit(SHORTCUT, steps=20, checkpoint=path, key=jax.random.key(9))
    losses = np.concatenate([first.losses, second.losses])
    assert np.array_equal(losses, straight.losses)
    for name, values in straight.metrics.items():
        both = np.concatenate([first.metrics[name], second.metrics[name]])
        assert np.array_equal(both, values), name
    assert second.step == 20
    _assert_trees_equal(second.state, straight.state)
    done = _fit(SHORTCUT, steps=20, checkpoint=path)
    assert done.losses.shape == (0,) and done.step == 20


@pytest.mark.slow
def test_interrupt_saves_and_resumes(straight, tmp_path):
    path = tmp_path / "run.eqx"

    def interrupt(state):
        if state.step == 7:
            raise KeyboardInterrupt
        return {}

    with pytest.raises(KeyboardInterrupt):
        _fit(SHORTCUT, checkpoint=path, evaluation=train.Evaluation(interrupt, every=1))
    saved = train.load_checkpoint(path, straight.state)
    assert saved.step == 7
    resumed = _fit(SHORTCUT, checkpoint=path)
    assert np.array_equal(resumed.losses, straight.losses[7:])
    _assert_trees_equal(resumed.state, straight.state)


@pytest.mark.slow
def test_nonfinite_rows_are_skipped():
    data = _data().at[5].set(jnp.nan)
    snapshots = []

    def record(state):
        snapshots.append(_leaves((state.model, state.ema, state.opt_state)))
        return {}

    with pytest.warns(RuntimeWarning, match="skipped"):
        result = _fit(data=data, steps=30, evaluation=train.Evaluation(record, every=1))
    skipped = np.flatnonzero(np.isnan(result.losses))
    assert 0 < result.skipped == skipped.size < 30
    assert np.isfinite(np.delete(result.losses, skipped)).all()
    initial = _state(_model())
    before = [_leaves((initial.model, initial.ema, initial.opt_state)), *snapshots]
    for i in skipped:
        for x, y in zip(before[i], before[i + 1], strict=True):
            assert np.array_equal(x, y), f"step {i} changed the state"


@pytest.mark.slow
def test_nonfinite_data_rows_are_named():
    data = _data().at[3::4].set(jnp.nan).at[7].set(jnp.inf)
    with pytest.raises(train.NonFiniteError) as error:
        with pytest.warns(RuntimeWarning):
            _fit(data=data, max_nonfinite=3)
    assert isinstance(error.value, FloatingPointError)
    message = str(error.value)
    assert error.value.terms == ["flow-matching"] and error.value.step == 2
    assert "steps 0 to 2" in message and "'flow-matching'" in message
    named = re.search(r"rows \[([\d, ]+)\] of `data`", message)
    assert named is not None, message
    assert all(int(row) % 4 == 3 for row in named.group(1).split(","))


@pytest.mark.slow
def test_nonfinite_model_times_are_named():
    class NaNLate(eqx.Module):
        inner: MLP

        def __call__(self, x, s, t, *, cond=None):
            out = self.inner(x, s, t, cond=cond)
            return jnp.where(s > 0.7, jnp.nan, out)

    with pytest.raises(train.NonFiniteError) as error:
        with pytest.warns(RuntimeWarning):
            _fit(model=NaNLate(_model()), max_nonfinite=2)
    message = str(error.value)
    assert "'flow-matching'" in message and "loss" in message
    times = re.search(r"at s = \[([\d., ]+)\]", message)
    assert times is not None, message
    assert all(float(s) > 0.7 for s in times.group(1).split(","))
    assert error.value.rows["flow-matching"]


@pytest.mark.parametrize("key", [jax.random.key(3), jax.random.PRNGKey(3)])
def test_checkpoint_round_trip(tmp_path, key):
    state = eqx.tree_at(lambda s: s.key, _state(_model(), step=12), key)
    path = tmp_path / "sub" / "state.eqx"
    train.save_checkpoint(path, state)
    like = eqx.tree_at(lambda s: s.key, _state(_model(5), step=0), key)
    loaded = train.load_checkpoint(str(path), like)
    assert loaded.step == 12 and type(loaded.step) is int
    _assert_trees_equal(loaded, state)
    assert loaded.key.dtype == key.dtype
    assert np.array_equal(jax.random.normal(loaded.key), jax.random.normal(key))


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "state.eqx"
    first = _state(_model())
    train.save_checkpoint(path, first)
    contents = path.read_bytes()

    import errno

    from fmcalc.train import _file

    real_fsync = os.fsync
    for code, cause in ((errno.ENOSPC, "No space left"), (errno.EFBIG, "too large")):

        def refuse(fd, code=code):
            # The file system refuses the data once written (disk full, file-size
            # limit); the directory sync afterwards is left alone.
            if os.path.isdir(f"/proc/self/fd/{fd}"):
                return real_fsync(fd)
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(_file.os, "fsync", refuse)
        later = _state(_model(4), step=2)
        with pytest.raises(train.CheckpointError, match=cause) as caught:
            train.save_checkpoint(path, later)
        assert caught.value.path == str(path) and "kept unchanged" in str(caught.value)
        assert path.read_bytes() == contents
        assert os.listdir(tmp_path) == ["state.eqx"]


@pytest.mark.parametrize(
    "change, match",
    [
        (
            dict(model=_model(width=8)),
            r"`\.model\.layers\[0\]\.weight` is float32\[16, 18\] there but "
            r"float32\[8, 18\] here",
        ),
        (
            dict(model=_model(depth=3)),
            r"`\.model\.layers\[3\]\.weight` \(float32\[2, 16\]\) is missing there",
        ),
        (dict(model=_model(dtype=jnp.float64)), "float32.* there but float64.* here"),
        (
            dict(optimizer=optax.sgd(1e-2)),
            r"`\.opt_state\[0\]\.mu` .* is there but not",
        ),
    ],
)
def test_checkpoint_of_another_model_is_rejected(tmp_path, change, match):
    path = tmp_path / "state.eqx"
    state = _state(_model())
    train.save_checkpoint(path, state)
    with pytest.raises(
        train.CheckpointError, match="another model or optimiser"
    ) as error:
        _fit(checkpoint=path, **change)
    assert re.search(match, str(error.value)), error.value
    assert not error.value.damaged


def test_damaged_checkpoint_is_rejected(tmp_path):
    path = tmp_path / "state.eqx"
    state = _state(_model())
    train.save_checkpoint(path, state)
    contents = path.read_bytes()
    path.write_bytes(contents[: len(contents) // 2])
    with pytest.raises(train.CheckpointError, match="is damaged.*truncated") as error:
        train.load_checkpoint(path, state)
    assert error.value.damaged
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(train.CheckpointError, match="not a checkpoint written by"):
        train.load_checkpoint(path, state)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(steps=0), ValueError, "steps=0"),
        (dict(batch_size=-2), ValueError, "batch_size=-2"),
        (dict(ema=0.999), TypeError, r"EMA\(decay=0.999\)|parameter 'ema'"),
        (
            dict(options=dict(progress=False)),
            TypeError,
            "fmcalc.train.Options|parameter 'options'",
        ),
        (dict(data=jnp.zeros((4, 2, 2))), ValueError, r"\(4, 2, 2\)"),
        (dict(data=jnp.zeros((0, 2))), ValueError, r"\(0, 2\)"),
        (dict(data=jnp.zeros((4, 2), int)), TypeError, "int"),
        (dict(labels=jnp.zeros(5, int)), ValueError, r"\(64,\).*\(5,\)"),
        (dict(labels=jnp.zeros(64)), TypeError, "float"),
        (
            dict(data=lambda k, n: jnp.zeros((n, 2)), labels=jnp.zeros(3, int)),
            ValueError,
            "function",
        ),
        (dict(method=SHORTCUT, batch_size=4), ValueError, "'compositional' no rows"),
        (dict(method="shortcut"), TypeError, "'shortcut'"),
        (dict(optimizer="adam"), TypeError, "'adam'"),
    ],
)
def test_bad_arguments(change, error, match):
    with pytest.raises(error, match=match):
        _fit(**change)


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda: train.Checkpoint("run.eqx", every=0), ValueError, r"every=\.\.\.\)"),
        (lambda: train.Checkpoint("run.eqx", keep=0), ValueError, "keep"),
        (
            lambda: train.Checkpoint("run.eqx", resume="yes"),
            Exception,
            "'yes'|parameter 'resume'",
        ),
        (lambda: train.Evaluation(lambda s: {}, every=0), ValueError, "every"),
        (lambda: train.Evaluation("fn"), TypeError, "'fn'"),
        (lambda: train.EMA(decay=1.5), ValueError, "1.5"),
        (lambda: train.EMA(horizon=0.0), ValueError, "horizon"),
        (lambda: train.EMA(decay=0.9, horizon=0.1), ValueError, "not both"),
        (lambda: train.Devices(accumulate=0), ValueError, "accumulate"),
        (lambda: train.Devices(mesh="cpu"), TypeError, "Mesh"),
        (lambda: train.Options(max_nonfinite=0), ValueError, "max_nonfinite"),
        (lambda: train.Options(clip_norm=0.0), ValueError, "0.0"),
        (
            lambda: train.Options(schedules="papers"),
            Exception,
            "'papers'|parameter 'schedules'",
        ),
        (lambda: train.Options(divergence=1e3), TypeError, "1000.0"),
        (lambda: train.Options(progress="no"), TypeError, "'no'"),
    ],
)
def test_bad_options(build, error, match):
    with pytest.raises(error, match=match):
        build()


@pytest.mark.parametrize(
    "old, new",
    [
        ("ema_decay", "EMA(decay=...)"),
        ("checkpoint", "Checkpoint("),
        ("checkpoint_every", "Checkpoint(path, every=...)"),
        ("resume", "resume=..."),
        ("evaluate", "Evaluation(fn, every=...)"),
        ("mesh", "Devices(mesh=...)"),
        ("accumulate", "Devices(accumulate=...)"),
        ("precision", "Options(precision=...)"),
        ("progress", "Options(progress=...)"),
        ("max_nonfinite", "Options(max_nonfinite=...)"),
    ],
)
def test_moved_keywords_name_their_option(old, new):
    with pytest.raises(TypeError, match=re.escape(new)):
        train.fit(
            FLOW_MATCHING, _model(), _data(), key=jax.random.key(0), steps=1,
            batch_size=16, **{old: None},
        )  # fmt: skip


def test_fit_takes_at_most_twelve_parameters():
    import inspect

    assert len(inspect.signature(train.fit).parameters) <= 12
    assert "for_run" in (train.fit.__doc__ or "")


def test_bad_callable_data():
    with pytest.raises(ValueError, match=r"shape \(16, 2, 1\)"):
        _fit(data=lambda key, n: jnp.zeros((n, 2, 1), DTYPE), steps=1)


@pytest.mark.slow
def test_progress_bar(capsys):
    _fit(steps=2, progress=True)  # an `Options` field, passed on by `_fit`
    assert "2/2" in capsys.readouterr().err


@pytest.mark.slow
def test_fit_sizes_curricula_for_the_run_unless_told_not_to():
    sct = fmcalc.methods.get("sct")  # a tangent warm-up over 10k steps
    default = _fit(sct, steps=6)
    by_hand = _fit(sct.for_run(6), steps=6, schedules="paper")
    paper = _fit(sct, steps=6, schedules="paper")
    np.testing.assert_array_equal(default.losses, by_hand.losses)
    assert not np.array_equal(default.losses[1:], paper.losses[1:])


def test_ema_horizon_is_a_share_of_the_run():
    assert train.EMA(horizon=0.1).decay_for(200) == pytest.approx(0.95)
    assert train.EMA(horizon=0.1).decay_for(5) == 0.0  # under one step: no average
    assert train.EMA(decay=0.999).decay_for(200) == 0.999
    assert train.EMA().decay_for(1000) == train.EMA(horizon=0.1).decay_for(1000)


@pytest.mark.slow
def test_checkpoint_keeps_as_many_saves_as_asked(tmp_path):
    path = tmp_path / "run.eqx"
    _fit(steps=12, checkpoint=train.Checkpoint(path, every=4, keep=3))
    steps = [
        train.checkpoint_header(tmp_path / name)["step"]
        for name in ("run.eqx", "run.eqx.prev", "run.eqx.prev2")
    ]
    assert steps == [12, 8, 4] and not (tmp_path / "run.eqx.prev3").exists()
    # The two newest damaged: the run resumes from the oldest kept.
    for name in ("run.eqx", "run.eqx.prev"):
        (tmp_path / name).write_bytes(b"damaged")
    with pytest.warns(RuntimeWarning, match="previous checkpoint"):
        resumed = _fit(steps=12, checkpoint=train.Checkpoint(path, every=4, keep=3))
    assert resumed.losses.shape == (8,)


def test_classes_that_moved_within_fmcalc_are_the_same_classes():
    from fmcalc.train._header import differences

    old = {".": "fmcalc._train.TrainState()", ".model": "fmcalc.nn._mlp.MLP(dim=2)"}
    new = {".": "fmcalc.train._state.TrainState()", ".model": "fmcalc.nn.MLP(dim=2)"}
    assert differences(old, new) == []
    other = {".": "fmcalc.train._state.TrainResult()", ".model": "fmcalc.nn.MLP(dim=3)"}
    assert len(differences(old, other)) == 2
    # Another package's class of the same name is another class.
    assert differences(old, {**new, ".": "mylib.TrainState()"})


def test_a_field_added_since_a_checkpoint_is_the_same_while_it_holds_its_default():
    from fmcalc.train._header import defaults, describe, differences

    loss = fmcalc.SquaredError()
    here = describe(loss)
    known = defaults(loss)
    # Written before `reduction` existed: the same loss while it is the default.
    before = {".": "fmcalc._losses.SquaredError()"}
    assert differences(before, here, defaults=known) == []
    # Not without the defaults, and not when the new field is set otherwise.
    assert differences(before, here)
    other = describe(fmcalc.SquaredError(reduction="mean"))
    (problem,) = differences(before, other, defaults=known)
    assert "reduction='mean'" in problem
    # A field the record has must still match, and the class must too.
    changed = {".": "fmcalc._losses.SquaredError(reduction='mean')"}
    assert differences(changed, here, defaults=known)
    assert differences({".": "fmcalc._losses.PseudoHuber()"}, here, defaults=known)


def test_descriptions_with_nested_values_are_compared_field_by_field():
    from fmcalc.train._header import _call

    assert _call("a.B(x='p, q)', y=(1, (2, 3)), z=[4])") == (
        "a.B",
        {"x": "'p, q)'", "y": "(1, (2, 3))", "z": "[4]"},
    )
    assert _call("a.B()") == ("a.B", {})
    assert _call("a.B(1, 2)") is None
    assert _call("float32[3]") is None


def test_train_step_needs_the_run_length_for_an_ema_horizon():
    with pytest.raises(ValueError, match="steps=..."):
        train.TrainStep(
            FLOW_MATCHING, _model(), _data(), key=jax.random.key(0), batch_size=16,
            ema=train.EMA(horizon=0.1),
        )  # fmt: skip
    step = train.TrainStep(
        FLOW_MATCHING, _model(), _data(), key=jax.random.key(0), batch_size=16,
        ema=train.EMA(horizon=0.1), steps=200,
    )  # fmt: skip
    assert step.problem.ema_decay == pytest.approx(0.95)


@pytest.mark.slow
def test_load_model_reads_the_weights_of_a_fit_checkpoint(tmp_path):
    """A checkpoint of `fit` holds the whole state; `load_model` reads its EMA or
    online weights with only a model of the same structure."""
    path = tmp_path / "run.eqx"
    result = _fit(SHORTCUT, steps=6, checkpoint=train.Checkpoint(path, every=3))
    fresh = _model(key=7)
    for ema, expected in ((True, result.ema), (False, result.model)):
        loaded = train.load_model(path, fresh, ema=ema)
        for a, b in zip(_leaves(loaded), _leaves(expected), strict=True):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(train.CheckpointError, match="another model"):
        train.load_model(path, _model(width=8))
    directory = tmp_path / "several"
    directory.mkdir()
    with pytest.raises(train.CheckpointError, match="is a checkpoint directory"):
        train.load_model(directory, fresh)


def test_data_far_from_unit_scale_warns_with_its_scale():
    data = np.asarray(_data())
    with pytest.warns(
        fmcalc.DataScaleWarning, match=r"standard deviation of [0-9.]+e\+0?4"
    ):
        _fit(data=jnp.asarray(1e4 * data / data.std()), steps=2)
    with pytest.warns(fmcalc.DataScaleWarning, match="Standardise it") as caught:
        _fit(data=jnp.asarray(1e-3 * data / data.std()), steps=2)
    # Attributed to the test code that called `fit`, not to fmcalc or a wrapper.
    assert os.path.dirname(caught[0].filename) == os.path.dirname(__file__)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fmcalc.DataScaleWarning)
        _fit(data=jnp.asarray(data / data.std()), steps=2)


@pytest.mark.slow
def test_a_second_run_on_a_held_checkpoint_path_is_refused(tmp_path):
    """Two runs saving to one path would interleave their saves: while one holds
    the path, another is refused with the holder named; the lock goes with the
    process that held it, so a killed run leaves no stale lock behind."""
    import subprocess
    import sys

    from fmcalc.train import _store

    path = tmp_path / "run.eqx"
    hold = (
        "import sys, time\n"
        "from fmcalc.train import _store\n"
        f"with _store.locked({str(path)!r}):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(600)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(
            train.CheckpointError, match=rf"in use by another run \(pid {holder.pid} on"
        ):
            _fit(checkpoint=train.Checkpoint(path, every=5), progress=False)
        assert not path.exists()
    finally:
        holder.kill()
        holder.wait()
    # Killed while holding it: the next run takes the path, and frees it again.
    result = _fit(checkpoint=train.Checkpoint(path, every=5), progress=False)
    assert result.step == 20 and path.exists()
    with _store.locked(str(path)):
        pass


class _Ignores(eqx.Module):
    """A model whose output does not depend on its parameters."""

    weight: jax.Array

    def __call__(self, x, s, t, *, cond=None):
        return -x


def test_a_gradient_that_stays_zero_is_warned_about_once():
    model = _Ignores(jnp.ones((2, 2), jnp.float32))
    with pytest.warns(
        RuntimeWarning, match=r"exactly zero for 10 steps \(steps 0 to 9\)"
    ) as caught:
        result = _fit(model=model, steps=30, progress=False)
    assert result.step == 30
    assert sum("exactly zero" in str(w.message) for w in caught) == 1
    # A model that trains raises no such warning.
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*exactly zero.*")
        _fit(steps=12, progress=False)


def test_the_progress_rate_leaves_out_the_first_step(monkeypatch):
    """The first step compiles the program; timed from the start, the bar would
    show an hour's estimate for a run of seconds."""
    import io

    import tqdm.std

    from fmcalc.train._loop import restart_clock

    clock = [0.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: clock[0])
    bar = tqdm.std.tqdm(total=1000, file=io.StringIO(), mininterval=0, smoothing=0)
    clock[0] = 60.0  # a minute of compiling
    bar.update()
    restart_clock(bar)
    clock[0] += 1.0  # then 100 steps a second
    bar.update(100)
    shown = bar.format_dict
    rate = (shown["n"] - shown["initial"]) / shown["elapsed"]
    assert bar.n == 101 and rate == pytest.approx(100)
    # Without the restart the rate would be about 101 steps in 61 s.
    assert "[00:01<00:08" in str(bar)
