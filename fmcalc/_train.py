"""The training loop behind `fmcalc.train`."""

import contextlib
import dataclasses
import functools
import math
import os
import signal
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jaxtyping import Array, ArrayLike, PRNGKeyArray, PyTree
from tqdm.auto import tqdm

from . import _checkpoint_orbax
from ._batch import NULL_LABEL, Batch
from ._checkpoint import (
    CheckpointError,
    decode,
    describe,
    differences,
    previous_path,
    restore,
    save_checkpoint,
    text,
)
from ._derivative import FiniteDifference
from ._ema import ema_update
from ._expr import Call, Derivative, Network, walk
from ._method import Method, term_loss
from ._parallel import (
    Layout,
    check_mesh,
    constrain,
    fetch,
    fetch_tree,
    place,
    put,
)
from ._precision import Precision
from ._stream import Stream, is_stream
from ._warnings import EMAHorizonWarning


class TrainState(eqx.Module):
    """Everything a run needs to continue: what a checkpoint holds.

    **Arguments:**

    - `model`: the online model.
    - `ema`: the exponential moving average of its parameters (the model itself when
      training without an EMA).
    - `opt_state`: the optimiser's state.
    - `step`: the number of steps taken.
    - `key`: the run's PRNG key; step `i` uses `jax.random.fold_in(key, i)`.
    """

    model: PyTree
    ema: PyTree
    opt_state: PyTree
    step: int
    key: PRNGKeyArray


class TrainResult(eqx.Module):
    """What [`fmcalc.train.fit`][] returns: the final state and the run's history.

    **Arguments:**

    - `model`, `ema`, `opt_state`, `step`, `key`: the final
      [`fmcalc.train.TrainState`][] (also available as `result.state`).
    - `losses`: the loss of every step run in this call, NaN for skipped steps.
    - `metrics`: each metric (`"<term>/loss"`, `"<term>/residual"`, `"grad_norm"`)
      at every step run in this call.
    - `skipped`: how many steps of this call were skipped as non-finite.
    - `evaluations`: `(step, results)` of every call of the `evaluate` hook.
    - `mesh`: the devices the run used (`result.mesh.devices`), as a
      `jax.sharding.Mesh`. The arrays of the state are laid out on it as training
      left them (replicated, or split along `shard_params`), so training or
      sampling can go on there without a copy to one device.
    """

    model: PyTree
    ema: PyTree
    opt_state: PyTree
    step: int
    key: PRNGKeyArray
    losses: np.ndarray
    metrics: dict[str, np.ndarray]
    skipped: int
    evaluations: list[tuple[int, dict[str, float]]]
    mesh: Mesh

    @property
    def state(self) -> TrainState:
        """The final state, e.g. for [`fmcalc.train.save_checkpoint`][]."""
        return TrainState(self.model, self.ema, self.opt_state, self.step, self.key)


class NonFiniteError(FloatingPointError):
    """Training stopped after too many consecutive non-finite steps.

    **Attributes:** `step` (the last step tried), `terms` (the method's terms whose
    loss was non-finite there), `rows` (for each term, the rows of that step's
    batch whose loss or gradient is non-finite) and `leaves` (the parameters and
    optimiser-state arrays that the step's update made non-finite or overflowing,
    when the loss and gradient were finite and the update was not).
    """

    def __init__(
        self,
        message: str,
        *,
        step: int,
        terms: list[str],
        rows: dict,
        leaves: list[str] | None = None,
    ):
        super().__init__(message)
        self.step, self.terms, self.rows = step, terms, rows
        self.leaves = leaves or []


class DivergenceError(FloatingPointError):
    """Training stopped because the smoothed loss rose far above its minimum, or
    the optimiser kept stepping up the gradient.

    **Attributes:** `step` (the step at which it was detected), `loss` and `minimum`
    (the smoothed loss then, and the lowest it had been) and `terms` (the method's
    terms by how far their own smoothed loss had risen, the worst first; empty when
    the updates went uphill).
    """

    def __init__(
        self, message: str, *, step: int, loss: float, minimum: float, terms: list[str]
    ):
        super().__init__(message)
        self.step, self.loss, self.minimum, self.terms = step, loss, minimum, terms


def _as_float(value):
    """Field converter: Python and NumPy numbers to `float`; anything else is left
    for `__check_init__` to reject with a message that names it."""
    if isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool
    ):
        return float(value)
    return value


class Divergence(eqx.Module):
    """When [`fmcalc.train.fit`][] stops a run as diverged.

    After every kept step the loss (and each term's loss) enters an exponential
    moving average, bias-corrected as in Adam, and the lowest value of that average
    is kept. Once `warmup` steps have been seen, a smoothed loss that stands more
    than `factor` units above its minimum stops the run with a
    [`fmcalc.train.DivergenceError`][] that names the terms that rose; the unit is
    the larger of the minimum's and the first loss's magnitudes. The state of that
    step is not saved, so the checkpoint keeps the last state whose loss was seen.
    The check also refuses a first update that points up the gradient
    (`update · gradient > 0`: a negative learning rate), and stops a run whose
    updates have pointed up the gradient for `uphill` kept steps in a row (a
    schedule that turned negative; with a positive learning rate, momentum points
    uphill for a few steps at most). Pass `divergence=None` to `fit` to turn it off.

    Some losses rise while training goes well: a self-consistency term starts near
    0 and grows as the anchor teaches the network a velocity, and SoFlow's loss
    spikes to about 2000 units at a learning rate of 1e-2 on a 2-D mixture. The
    default factor leaves such runs orders of magnitude of room; runaway parameters
    pass it within a few steps.

    **Arguments:**

    - `factor`: how far above its minimum the smoothed loss may rise, in units
      (default `1e6`).
    - `smoothing`: the weight of the past in the moving average, in `[0, 1)`; its
      horizon is `1 / (1 - smoothing)` steps (default `0.98`, 50 steps).
    - `warmup`: how many finite steps to see before checking (default 100).
    - `uphill`: how many uphill updates in a row stop the run (default 50).
    """

    factor: float = eqx.field(static=True, default=1e6, converter=_as_float)
    smoothing: float = eqx.field(static=True, default=0.98, converter=_as_float)
    warmup: int = eqx.field(static=True, default=100)
    uphill: int = eqx.field(static=True, default=50)

    def __check_init__(self):
        if not (isinstance(self.factor, float) and 0 < self.factor < math.inf):
            raise ValueError(
                f"`Divergence(factor=...)` must be a finite positive number; got "
                f"{self.factor!r}."
            )
        if not (isinstance(self.smoothing, float) and 0 <= self.smoothing < 1):
            raise ValueError(
                f"`Divergence(smoothing=...)` must lie in [0, 1); got "
                f"{self.smoothing!r}."
            )
        for name, least in (("warmup", 0), ("uphill", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(
                    f"`Divergence({name}=...)` must be an integer; got {value!r}."
                )
            if value < least:
                raise ValueError(
                    f"`Divergence({name}=...)` must be >= {least}; got {value!r}."
                )


@dataclasses.dataclass
class _Monitor:
    """Bias-corrected moving averages of the losses, with their first values and
    running minima; its state travels in the checkpoint, so a resumed run judges as
    the original would."""

    smoothing: float
    count: int = 0
    uphill: int = 0
    sums: dict[str, float] = dataclasses.field(default_factory=dict)
    first: dict[str, float] = dataclasses.field(default_factory=dict)
    minima: dict[str, float] = dataclasses.field(default_factory=dict)

    def update(self, values: Mapping[str, float], *, uphill: bool) -> None:
        self.count += 1
        self.uphill = self.uphill + 1 if uphill else 0
        for name, value in values.items():
            self.sums[name] = (
                self.smoothing * self.sums.get(name, 0.0) + (1 - self.smoothing) * value
            )
            self.first.setdefault(name, value)
            self.minima[name] = min(self.minima.get(name, math.inf), self[name])

    def __getitem__(self, name: str) -> float:
        return self.sums[name] / (1 - self.smoothing**self.count)

    def rise(self, name: str) -> float:
        """How far the smoothed value stands above its minimum, in units of the
        larger of the minimum's and the first value's magnitudes (a loss that
        crosses zero, as a learned log-variance's can, keeps a sensible unit)."""
        unit = max(abs(self.minima[name]), abs(self.first[name]))
        return (self[name] - self.minima[name]) / unit if unit else 0.0

    def snapshot(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "uphill": self.uphill,
            "sums": dict(self.sums),
            "first": dict(self.first),
            "minima": dict(self.minima),
        }


# --------------------------------------------------------------------------- step


def _finite(tree: PyTree) -> Array:
    """Whether every inexact array of `tree` is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if _inexact(x)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _inexact(x) -> bool:
    return eqx.is_array(x) and jnp.issubdtype(x.dtype, jnp.inexact)


def _bounded(x: Array) -> Array:
    """Whether `x` is finite with a representable sum of squares: parameters past
    the square root of their dtype's largest value have exploded (in float32,
    beyond about 1e19), though each is still finite."""
    return jnp.isfinite(jnp.sum(jnp.square(x)))


def _soundness(model, ema, opt_state) -> PyTree:
    """Per array: whether a state may be kept (parameters bounded, the optimiser's
    state finite; its second moments may legitimately square past float32)."""
    check = lambda bounded: (
        lambda x: (  # noqa: E731
            (_bounded(x) if bounded else jnp.all(jnp.isfinite(x)))
            if _inexact(x)
            else None
        )
    )
    return (
        jax.tree.map(check(True), model),
        jax.tree.map(check(True), ema),
        jax.tree.map(check(False), opt_state),
    )


class _Problem(eqx.Module):
    """The inputs of every step that do not change during training."""

    method: Method
    optimizer: optax.GradientTransformation
    data: Any
    labels: Any
    teacher: Any
    aux: Any
    batch_size: int = eqx.field(static=True)
    ema_decay: float | None = eqx.field(static=True)
    layout: Layout = eqx.field(static=True)
    accumulate: int = eqx.field(static=True)
    precision: Precision | None = eqx.field(static=True)

    def batch(self, key, step, rows=None) -> tuple[Batch, Array | None]:
        """Step `step`'s batch, its rows split over the mesh, and, for an array
        `data`, the indices of its rows. `rows` are the `(x0, labels)` a stream
        gave for this step."""
        k_data, k_batch = jax.random.split(jax.random.fold_in(key, step))
        indices = cond = None
        if rows is not None:
            x0, cond = rows
        elif isinstance(self.data, jax.Array):
            n = self.data.shape[0]
            indices = jax.random.randint(k_data, (self.batch_size,), 0, n)
            x0 = self.data[indices]
            cond = None if self.labels is None else self.labels[indices]
        else:
            x0 = jnp.asarray(self.data(k_data, self.batch_size))
            if x0.ndim != 2 or x0.shape[0] != self.batch_size:
                raise ValueError(
                    f"`data(key, n)` must return an array of shape (n, dim); with "
                    f"n={self.batch_size} it returned shape {x0.shape}."
                )
        rows_sharding = self.layout.rows
        x0 = jax.lax.with_sharding_constraint(x0, rows_sharding)
        batch = self.method.batch(k_batch, x0, cond=cond)
        batch = jax.tree.map(
            lambda a: jax.lax.with_sharding_constraint(a, rows_sharding), batch
        )
        return batch, indices

    def networks(self, model, ema) -> dict[str, Any]:
        if self.ema_decay is None:
            params, static = eqx.partition(model, eqx.is_array)
            ema = eqx.combine(jax.lax.stop_gradient(params), static)
        if self.precision is not None:
            model, ema = self.precision(model), self.precision(ema)
        return {"online": model, "ema": ema, "aux": self.aux}


def _micro_batches(a: Array, k: int) -> Array:
    """Rows `a` as `k` micro-batches along a new leading axis, row `r` in
    micro-batch `r % k`: each device's rows then feed every micro-batch, so no
    rows move between devices."""
    return a.reshape(a.shape[0] // k, k, *a.shape[1:]).swapaxes(0, 1)


def _accumulated(problem: _Problem, model, ema, batch: Batch, step):
    """The loss, metrics and gradient of `batch`, summed over `accumulate`
    micro-batches that each hold an equal share of every term's rows: the same
    sums as one pass over the batch, in another order."""
    method, k = problem.method, problem.accumulate
    pairs = method.term_rows(batch)
    n_data = method.data_rows(batch.x0.shape[0])
    params = method.params(step)
    chunks = [jax.tree.map(lambda a: _micro_batches(a, k), rows) for _, rows in pairs]

    def micro_loss(model, chunk):
        networks = problem.networks(model, ema)
        total = jnp.zeros((), batch.x0.dtype)
        sums = {}
        for (term, _), rows in zip(pairs, chunk, strict=True):
            losses, squared = jax.vmap(
                lambda ex, term=term: term_loss(
                    term, ex, networks, problem.teacher, params
                )
            )(rows)
            total = total + term.weight * jnp.sum(losses) / n_data
            sums[f"{term.name}/loss"] = jnp.sum(losses)
            sums[f"{term.name}/residual"] = jnp.sum(squared)
        return total, sums

    gradient = eqx.filter_value_and_grad(micro_loss, has_aux=True)
    first = gradient(model, jax.tree.map(lambda a: a[0], chunks))

    def body(carry, chunk):
        return jax.tree.map(jnp.add, carry, gradient(model, chunk)), None

    rest = jax.tree.map(lambda a: a[1:], chunks)
    ((loss, sums), grads), _ = jax.lax.scan(body, first, rest)
    counts = {term.name: rows.x0.shape[0] for term, rows in pairs}
    metrics = {
        name: value / counts[name.rpartition("/")[0]] for name, value in sums.items()
    }
    return (loss, metrics), grads


def _candidate(model, ema, opt_state, step, key, problem: _Problem, rows=None):
    """One step's loss, metrics, gradient and update, before anything is kept."""
    batch, _ = problem.batch(key, step, rows)

    def loss_fn(model):
        networks = problem.networks(model, ema)
        return problem.method.loss(
            networks["online"],
            batch,
            teacher=problem.teacher,
            ema=networks["ema"],
            aux=problem.aux,
            step=step,
        )

    if problem.accumulate == 1:
        gradient = eqx.filter_value_and_grad(loss_fn, has_aux=True)
        (loss, metrics), grads = gradient(model)
    else:
        (loss, metrics), grads = _accumulated(problem, model, ema, batch, step)
    params = eqx.filter(model, eqx.is_inexact_array)
    updates, new_opt_state = problem.optimizer.update(grads, opt_state, params)
    new_model = eqx.apply_updates(model, updates)
    if problem.ema_decay is None:
        new_ema = new_model
    else:
        new_ema = ema_update(ema, new_model, problem.ema_decay)
    return loss, metrics, grads, updates, (new_model, new_ema, new_opt_state)


@eqx.filter_jit
def _step(model, ema, opt_state, step, key, problem: _Problem, rows):
    loss, metrics, grads, updates, new = _candidate(
        model, ema, opt_state, step, key, problem, rows
    )
    squares = sum((jnp.sum(g**2) for g in jax.tree.leaves(grads)), jnp.zeros(()))
    metrics = {**metrics, "grad_norm": jnp.sqrt(squares)}
    finite = jnp.isfinite(loss) & _finite(grads)
    sound = jnp.all(jnp.stack([x for x in jax.tree.leaves(_soundness(*new))]))
    keep = finite & sound
    # A skipped step keeps every array as it was; selecting inside the compiled step
    # avoids a second program for the skip.
    updated = jax.tree.map(
        lambda new, old: jnp.where(keep, new, old) if eqx.is_array(new) else new,
        new,
        (model, ema, opt_state),
    )
    # The state leaves the step laid out as it came in: replicated, or split along
    # `shard_params`, whatever layout the partitioner would prefer.
    updated = constrain(updated, problem.layout.state)
    alignment = sum(
        (
            jnp.vdot(u, g)
            for u, g in zip(
                jax.tree.leaves(updates), jax.tree.leaves(grads), strict=True
            )
        ),
        jnp.zeros(()),
    )
    checks = {"finite": finite, "sound": sound, "alignment": alignment}
    return updated, (loss, metrics, checks)


@eqx.filter_jit
def _update_soundness(problem: _Problem, model, ema, opt_state, key, step, rows):
    """Per array, whether step `step`'s update would leave it sound."""
    new = _candidate(model, ema, opt_state, step, key, problem, rows)[-1]
    return _soundness(*new)


_soundness_of = eqx.filter_jit(_soundness)


def _unsound(flags: PyTree, names: tuple[str, ...]) -> list[str]:
    """The paths of the arrays flagged unsound, prefixed by their part's name."""
    return [
        name + jax.tree_util.keystr(path)
        for name, part in zip(names, flags, strict=True)
        for path, ok in jax.tree_util.tree_leaves_with_path(fetch_tree(part))
        if not ok
    ]


@eqx.filter_jit
def _finite_rows(problem: _Problem, model, ema, key, step, rows):
    """For each term, whether each of its rows of step `step`'s batch has a finite
    loss and gradient, and the rows' times; and the data rows drawn."""
    batch, indices = problem.batch(key, step, rows)
    params = problem.method.params(step)
    checks = []
    for term, rows in problem.method.term_rows(batch):

        def row(example, term=term):
            def loss(model):
                networks = problem.networks(model, ema)
                return term_loss(term, example, networks, problem.teacher, params)[0]

            value, grads = eqx.filter_value_and_grad(loss)(model)
            return jnp.isfinite(value), _finite(grads)

        checks.append((*jax.vmap(row)(rows), rows.s, rows.t))
    return checks, indices


def _steps_text(first: int, last: int) -> tuple[str, str]:
    if first < last:
        return f"steps {first} to {last} all had", "their updates were"
    return f"step {last} had", "its update was"


def _diagnose_update(problem: _Problem, state: TrainState, first: int, rows):
    """Name the arrays a finite loss and gradient's update made unsound."""
    flags = _update_soundness(
        problem,
        state.model,
        state.ema,
        state.opt_state,
        state.key,
        _step_number(state.step, problem.layout),
        rows,
    )
    leaves = _unsound(flags, ("model", "ema", "opt_state"))
    steps, skipped = _steps_text(first, state.step)
    shown = ", ".join(f"`{leaf}`" for leaf in leaves[:5])
    more = f" and {len(leaves) - 5} more" if len(leaves) > 5 else ""
    message = (
        f"Training stopped: {steps} a finite loss and gradient but an update that "
        f"made the state non-finite or exploded (parameters past about "
        f"sqrt(max float)), so {skipped} skipped. At step {state.step} the update "
        f"broke {shown}{more}. The data and the model are not at fault: check the "
        "optimiser's learning rate and its schedule (NaN, infinite or far too "
        "large) and its other hyperparameters."
    )
    return NonFiniteError(message, step=state.step, terms=[], rows={}, leaves=leaves)


def _diagnose(
    problem: _Problem,
    state: TrainState,
    metrics,
    first: int,
    initial: TrainState,
    rows,
):
    """Re-evaluate the last step's batch row by row to say where it went wrong, and
    with the parameters the run started from to say whether they ran away."""
    step = _step_number(state.step, problem.layout)
    checks, indices = fetch_tree(
        _finite_rows(problem, state.model, state.ema, state.key, step, rows)
    )
    before, _ = fetch_tree(
        _finite_rows(problem, initial.model, initial.ema, state.key, step, rows)
    )
    ran_away = all(bool(np.all(c[0]) and np.all(c[1])) for c in before)
    terms = problem.method.terms
    bad_terms = [t.name for t in terms if not np.isfinite(metrics[f"{t.name}/loss"])]
    # `fit` gives every term some rows, so the terms line up with the checks.
    counts = [len(check[0]) for check in checks]
    lines, bad_rows = [], {}
    for term, start, check in zip(terms, np.cumsum([0, *counts]), checks, strict=False):
        finite_loss, finite_grad, s, t = map(np.asarray, check)
        bad = np.flatnonzero(~(finite_loss & finite_grad))
        if bad.size == 0:
            continue
        bad_rows[term.name] = (start + bad).tolist()
        shown = bad[:5]
        where = f"batch rows {(start + shown).tolist()}"
        if indices is not None:
            drawn = np.asarray(indices)[(start + shown) % problem.batch_size]
            where += f" (rows {drawn.tolist()} of `data`)"
        s, t = (np.asarray(a, np.float64)[shown].round(3).tolist() for a in (s, t))
        what = "gradient" if finite_loss.all() else "loss"
        lines.append(
            f"  - term {term.name!r}: non-finite {what} on {bad.size} of "
            f"{len(finite_loss)} rows, e.g. {where} at s = {s}, t = {t}."
        )
    if not lines:
        lines.append("  - every row is finite on its own: the sum over rows overflows.")
    steps, skipped = _steps_text(first, state.step)
    advice = (
        f"\nWith the parameters of step {initial.step}, where this call started, "
        "every row of this batch is finite: the parameters have run away since, so "
        "the optimiser is at fault, not the data. Lower the learning rate (check "
        "its schedule), or clip the gradient harder."
        if ran_away
        else "\nCheck the data for NaN or inf rows, the model at these times, the "
        "teacher, or lower the learning rate (or raise `max_nonfinite`)."
    )
    message = (
        f"Training stopped: {steps} a non-finite loss or gradient, so {skipped} "
        f"skipped. At step {state.step} the non-finite term(s) were "
        f"{bad_terms or 'none (only the gradient)'}:\n" + "\n".join(lines) + advice
    )
    return NonFiniteError(message, step=state.step, terms=bad_terms, rows=bad_rows)


# ------------------------------------------------------------------------- checks

_DEFAULT_OPTIMIZER = optax.adam(1e-3)


# Reusing the same transformation lets repeated `fit` calls (a resume in the same
# process, a notebook) hit the step's compilation cache.
@functools.lru_cache(maxsize=16)
def _clipped(optimizer: optax.GradientTransformation, clip_norm: float):
    return optax.chain(optax.clip_by_global_norm(clip_norm), optimizer)


def _num_classes(model: PyTree) -> int | None:
    """The number of classes of the label embeddings in `model` (the fewest, if its
    networks differ), or `None` if none says."""

    def says(node) -> bool:
        value = getattr(node, "num_classes", None)
        return isinstance(value, int) and not isinstance(value, bool)

    found = [n.num_classes for n in jax.tree.leaves(model, is_leaf=says) if says(n)]
    return min(found) if found else None


def _check_labels(labels: Array, model: PyTree) -> None:
    values = np.asarray(labels)
    num_classes = _num_classes(model)
    known = num_classes is not None
    bad = (values < 0) & (values != NULL_LABEL)
    if known:
        bad |= values >= num_classes
    if not bad.any():
        return
    rows = np.flatnonzero(bad)
    allowed = f"[0, {num_classes})" if known else "[0, num_classes)"
    hint = (
        " (labels 1 to num_classes? subtract 1)"
        if known and values.min() >= 1 and values.max() == num_classes
        else ""
    )
    raise ValueError(
        f"`labels` must lie in {allowed}, or be fmcalc.NULL_LABEL = {NULL_LABEL} for a "
        f"row without a label; got {values[rows[:5]].tolist()} at rows "
        f"{rows[:5].tolist()}{hint}."
    )


def _check_data(data, labels, batch_size: int, method: Method, model: PyTree):
    if not callable(data):
        data = jnp.asarray(data)
        if data.ndim != 2 or data.shape[0] < 1:
            raise ValueError(
                "`data` must be an array of shape (N, dim) with N >= 1, or a "
                f"function `data(key, n)`; got an array of shape {data.shape}."
            )
        if not jnp.issubdtype(data.dtype, jnp.floating):
            raise TypeError(f"`data` must be a floating array; got {data.dtype}.")
        if jnp.finfo(data.dtype).bits < 32:
            raise TypeError(
                f"`data` is {data.dtype}: `fit` draws the noise and the times in the "
                "data's dtype, and a 16-bit float resolves times only to about "
                f"{float(jnp.finfo(data.dtype).eps):.0e}. Pass float32 (or float64) "
                "data; lower precision belongs inside the model."
            )
    if labels is not None:
        if callable(data):
            raise ValueError(
                "`labels` go with an array `data` (one label per row); got a "
                "function `data`. Pass the rows and their labels as arrays."
            )
        labels = jnp.asarray(labels)
        if labels.shape != data.shape[:1]:
            raise ValueError(
                f"`labels` must have shape ({data.shape[0]},), one per row of "
                f"`data`; got shape {labels.shape}."
            )
        if not jnp.issubdtype(labels.dtype, jnp.integer):
            raise TypeError(f"`labels` must be integers; got {labels.dtype}.")
        _check_labels(labels, model)
    return data, labels


def _check_batch(method: Method, batch_size: int, accumulate: int) -> None:
    """Every term gets rows, and, with `accumulate`, rows that the micro-batches
    can share equally."""
    rows = batch_size * (len(method.terms) if method.split is None else 1)
    counts = method.row_counts(rows)
    for term, count in zip(method.terms, counts, strict=True):
        if count == 0:
            raise ValueError(
                f"With batch_size={batch_size}, the split {method.split} of method "
                f"{method.name!r} gives the term {term.name!r} no rows; use a larger "
                "`batch_size`."
            )
    uneven = [
        f"{term.name!r} {count}"
        for term, count in zip(method.terms, counts, strict=True)
        if count % accumulate
    ]
    if uneven:
        raise ValueError(
            f"With accumulate={accumulate}, every micro-batch takes an equal share of "
            f"each term's rows, but at batch_size={batch_size} method {method.name!r} "
            f"gives its terms {', '.join(uneven)} rows, not multiples of "
            f"{accumulate}. Use a batch size whose split gives every term a multiple "
            f"of {accumulate} rows (e.g. {batch_size * accumulate})."
        )


def _check_precision(method: Method, precision: Precision) -> None:
    """A finite difference computed in 16 bits must still resolve its step."""
    for term in method.terms:

        def visit(node):
            strategy = getattr(node, "strategy", None)
            if isinstance(node, Derivative) and isinstance(strategy, FiniteDifference):
                strategy.check_dtype(precision.compute)

        walk(term.residual, visit)


def _step_number(step: int, layout: Layout) -> Array:
    """A step number as the compiled step takes it: an array on the run's mesh (a
    Python int would be static, and compile a program per step)."""
    return put(jnp.asarray(step), layout.replicated)


def _global_rows(stream: Stream, layout: Layout) -> tuple[Array, Array | None]:
    """The stream's next batch, this process's rows of the global batch."""
    local = stream.next()
    return tuple(  # pyright: ignore[reportReturnType]
        None
        if a is None
        else jax.make_array_from_process_local_data(
            layout.rows, a, (a.shape[0] * jax.process_count(), *a.shape[1:])
        )
        for a in local
    )


def _gathered(state: TrainState) -> TrainState:
    """`state` with its arrays whole on this host (a collective: every process
    calls it)."""

    def whole(x):
        if not eqx.is_array(x):
            return x
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = jnp.asarray(fetch(jax.random.key_data(x)))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        return fetch(x)

    return jax.tree.map(whole, state)


def _check_options(**options) -> None:
    for name, value in options.items():
        if value is None and name == "eval_every":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            none = " or None" if name == "eval_every" else ""
            raise ValueError(
                f"`{name}` must be an integer >= 1{none}; got {name}={value!r}."
            )


def _check_checkpoint_path(path: str) -> None:
    """Fail now, not after training, if the checkpoint cannot be written: the path
    is a directory, or a probe file cannot be created next to it."""
    if os.path.isdir(path):
        raise ValueError(
            f"`checkpoint` must be a file path; {path!r} is a directory. Pass a file "
            f"in it, e.g. {os.path.join(path, 'run.eqx')!r}."
        )
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, probe = tempfile.mkstemp(
            prefix=f".{os.path.basename(path)}.", suffix=".probe", dir=directory
        )
        os.close(fd)
        os.remove(probe)
    except OSError as error:
        raise type(error)(
            error.errno,
            f"`fit` cannot write its checkpoint {path!r} ({error.strerror}); pass a "
            "`checkpoint` path in a writable directory. Nothing was trained",
        ) from error


def _reads_ema(method: Method) -> list[str]:
    """The names of the terms whose residual calls the EMA network."""
    names = []
    for term in method.terms:
        found = []

        def visit(node, found=found):
            network = (
                node.network
                if isinstance(node, Call)
                else node.function
                if isinstance(node, Derivative)
                else None
            )
            if isinstance(network, Network) and network.role == "ema":
                found.append(node)

        walk(term.residual, visit)
        if found:
            names.append(term.name)
    return names


def _warn_ema_horizon(method: Method, ema_decay: float | None, steps: int) -> None:
    if ema_decay is None:
        return
    horizon = math.inf if ema_decay == 1 else 1 / (1 - ema_decay)
    terms = _reads_ema(method)
    if horizon <= steps / 5 or not terms:
        return
    warnings.warn(
        f"`ema_decay={ema_decay}` averages over about {horizon:.0f} steps, more than "
        f"a fifth of the {steps}-step run, and method {method.name!r} reads the EMA "
        f"network in term(s) {terms}: their targets would lag the online network "
        f"for most of training. Use `ema_decay <= {1 - 5 / steps:.4g}` or more "
        "steps.",
        EMAHorizonWarning,
        stacklevel=3,
    )


def _describe_data(data, stream: Stream | None, processes: int) -> str:
    if stream is not None:
        # Each process reads its own stream, so its position means nothing to a
        # job of another size.
        return f"stream {text(type(stream.iterator))} read by {processes} process(es)"
    if callable(data):
        return f"function {text(data)}"
    return f"{data.dtype}{list(data.shape)}"


def _run_record(
    method: Method,
    data,
    labels,
    batch_size,
    ema_decay,
    clip_norm,
    stream: Stream | None,
    processes: int,
) -> dict[str, Any]:
    """What must be the same for a checkpoint to continue this run."""
    record: dict[str, Any] = {
        "method" + ("" if path == "." else path): text
        for path, text in describe(method).items()
    }
    return record | {
        "batch_size": batch_size,
        "data": _describe_data(data, stream, processes),
        "labels": None if labels is None else _describe_data(labels, None, processes),
        "ema_decay": ema_decay,
        "clip_norm": clip_norm,
    }


def _saves(path: str, fresh: TrainState, shardings, stream: bool) -> Iterator:
    """The checkpoints to resume from, newest first: `(name, read)`, where `read()`
    gives the verified header and a function `load(weights_only)` of the state
    (checked against `fresh`; only its model and EMA, on a fresh optimiser at step
    0, if `weights_only`) and the stream's position."""
    if _checkpoint_orbax.is_directory(path):
        for number in _checkpoint_orbax.saves(path):

            def read(number=number):
                header = _checkpoint_orbax.header(path, number)

                def load(weights_only: bool):
                    fields = ("model", "ema") if weights_only else None
                    parts, position = _checkpoint_orbax.restore(
                        path,
                        number,
                        header,
                        fresh,
                        shardings,
                        fields=fields or ("model", "ema", "opt_state", "key"),
                        stream=stream and not weights_only,
                    )
                    if weights_only:
                        state = TrainState(
                            parts["model"], parts["ema"], fresh.opt_state, 0, fresh.key
                        )
                        return state, None
                    state = TrainState(
                        parts["model"],
                        parts["ema"],
                        parts["opt_state"],
                        header["step"],
                        parts["key"],
                    )
                    return state, position

                return header, load

            yield _checkpoint_orbax.label(path, number), read
        return
    for candidate in (path, previous_path(path)):
        if not os.path.exists(candidate):
            continue

        def read_file(candidate=candidate):
            with open(candidate, "rb") as f:
                header, payload = decode(candidate, f.read())

            def load(weights_only: bool):
                if weights_only:
                    model, ema = restore(
                        candidate, header, payload, fresh, fields=("model", "ema")
                    )
                    return TrainState(model, ema, fresh.opt_state, 0, fresh.key), None
                state = restore(candidate, header, payload, fresh)
                return state, header.get("stream")

            return header, load

        yield candidate, read_file


def _resume(
    path: str,
    fresh: TrainState,
    run: dict[str, Any],
    resume: bool | Literal["weights-only"],
    shardings,
    stream: bool,
) -> tuple[TrainState, dict[str, Any] | None, str | None]:
    """The state to start from, the saved divergence monitor and the stream's
    position: from the newest checkpoint at `path`, or from the one before it if
    the newest is damaged."""
    damaged: list[CheckpointError] = []
    for name, read in _saves(path, fresh, shardings, stream):
        try:
            header, load = read()
            # A checkpoint saved by hand has no record of its run; then only its
            # structure can be checked.
            problems = differences(header["run"], run) if "run" in header else []
            if problems and resume is True:
                # Another model is the first thing to name, and `load` names it.
                load(False)
                raise CheckpointError(
                    f"The checkpoint {name!r} was written by another run: "
                    + "; ".join(problems)
                    + ". Pass the same method, batch size, data and options to "
                    "continue it; `resume='weights-only'` to start a new run from "
                    "its weights (fine-tuning); or a new path (or `resume=False`) to "
                    "start afresh.",
                    path=name,
                    problems=problems,
                    damaged=False,
                )
            state, position = load(bool(problems))
        except CheckpointError as error:
            if not error.damaged:
                raise
            damaged.append(error)
            continue
        if damaged:
            warnings.warn(
                f"{damaged[0]} Resuming from the previous checkpoint {name!r} "
                f"(step {header.get('step')}) instead.",
                RuntimeWarning,
                stacklevel=3,
            )
        monitor = None if problems else header.get("monitor")
        return state, monitor, position
    if damaged:
        raise damaged[0]
    return fresh, None, None


@contextlib.contextmanager
def _catch_sigterm(catch: bool) -> Iterator[list[int]]:
    """Turn SIGTERM into a flag that the loop polls, so the run can be saved before
    the process ends. Only if `catch`, where SIGTERM still has its default action
    (terminate), and only in the main thread, where Python runs signal handlers."""
    received: list[int] = []
    if (
        not catch
        or threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield received
        return
    signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


# ---------------------------------------------------------------------------- fit


def fit(
    method: Method,
    model: PyTree,
    data: ArrayLike | Callable[..., Any] | Iterable[Any],
    *,
    key: PRNGKeyArray,
    steps: int,
    batch_size: int,
    optimizer: optax.GradientTransformation | None = None,
    labels: ArrayLike | None = None,
    teacher: Any = None,
    aux: Any = None,
    ema_decay: float | None = 0.999,
    clip_norm: float | None = 1.0,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 1000,
    resume: bool | Literal["weights-only"] = True,
    divergence: Divergence | None = Divergence(),
    evaluate: Callable[[TrainState], Mapping[str, Any]] | None = None,
    eval_every: int | None = None,
    max_nonfinite: int = 10,
    progress: bool = True,
    mesh: Mesh | None = None,
    shard_params: str | None = None,
    accumulate: int = 1,
    precision: Precision | None = None,
) -> TrainResult:
    """Train `model` with `method`.

    Each step draws `batch_size` data rows, lets `method.batch` draw noise and times,
    and takes one optimiser step on `method.loss`. The step is compiled once; step
    `i` uses the key `jax.random.fold_in(key, i)` and passes `step=i` to the loss
    (curricula), so a run resumed from a checkpoint reproduces the uninterrupted run
    exactly.

    **Devices and processes.** The step runs on every device of `mesh` (by default
    every device of every process): each device takes an equal share of the
    batch's rows; the parameters, EMA and optimiser state are replicated (or split
    along `shard_params`), and the gradient is summed across devices by the
    compiled program. The batch is the one a single device would draw, so a run on
    N devices equals the 1-device run up to the order of floating-point sums. In a
    job of several processes (`jax.distributed.initialize`), call `fit` the same way
    in every process: an array `data` (the same in every process) or a sampling
    function gives each device only its own rows of the global batch; an iterable
    gives each process its own rows. Progress bars and warnings come from process 0.

    **Failure behaviour.**

    - A step whose loss or gradient is non-finite, or whose update would make the
      parameters, EMA or optimiser state non-finite (or the parameters explode past
      the square root of their dtype's largest value), is skipped (the state stays
      as it was) with a warning; `max_nonfinite` such steps in a row raise
      [`fmcalc.train.NonFiniteError`][], which names the terms and batch rows at
      fault, or the arrays the update broke (then the optimiser is at fault).
    - `divergence` stops a run whose smoothed loss rises far above its minimum
      ([`fmcalc.train.DivergenceError`][]).
    - A checkpoint is written only for a state whose own loss was seen finite and
      not diverged, atomically, keeping the one it replaces as `checkpoint + ".prev"`.
      Before training, `fit` checks that the checkpoint path can be written.
    - On `KeyboardInterrupt` (SIGINT) the state is saved, then the exception goes
      on; on SIGTERM the state is saved and the process ends by the signal (when
      `fit` runs in the main thread and SIGTERM has its default action; a handler
      of your own is left alone). In a run of several processes, where a save is
      collective and a signal reaches one process, neither is caught: the job
      resumes from its last periodic checkpoint.

    **Main arguments:**

    - `method`: the [`fmcalc.Method`][].
    - `model`: the model, called per example as `model(x, s, t, cond=cond)`.
    - `data`: an `(N, dim)` float32 or float64 array whose rows are drawn uniformly
      with replacement; a function `data(key, n)` returning `(n, dim)` samples,
      traceable by JAX (e.g. an analytic flow's `flow.sample`); or an iterable of
      batches (a generator, a grain `DataLoader` or dataset iterator), one per step,
      each this process's `batch_size / jax.process_count()` rows: an array
      `(rows, dim)` or a pair `(x0, labels)`. A resumed run continues from the
      position in the stream that the checkpoint recorded: the iterator's own state
      when it has `get_state`/`set_state` (grain's do), else the number of batches
      drawn, which the resumed run skips in the stream it is given from its start.
    - `key`: the run's PRNG key (on resume, the checkpoint's key is used).
    - `steps`: the total number of steps; a resumed run continues up to it.
    - `batch_size`: data rows per step (the method's split gives them to its terms).
    - `optimizer`: an optax transformation; `optax.adam(1e-3)` if `None`.

    **Other arguments:**

    - `labels`: `(N,)` integer class labels of the rows of an array `data`, in
      `[0, num_classes)` or [`fmcalc.NULL_LABEL`][] for an unlabelled row, passed to
      the networks as `cond`; `None` for unconditional training.
    - `teacher`, `aux`: passed on to `method.loss`.
    - `ema_decay`: the decay of the parameters' EMA, the loss's `ema` network; with
      `None` the loss gets the model under a stop-gradient instead. An
      [`fmcalc.EMAHorizonWarning`][] says when the method reads the EMA and its
      horizon `1 / (1 - ema_decay)` exceeds a fifth of `steps`.
    - `clip_norm`: clip the gradient to this global norm before the optimiser;
      `None` for no clipping.
    - `checkpoint`: a file to save the state to, or `None`. Its header records the
      model's structure, the method, the batch size and the data
      ([`fmcalc.train.checkpoint_header`][]). A run of several processes writes a
      directory there instead, with orbax-checkpoint: each process writes the
      shards it holds, the header is written once, and the directory keeps the last
      two saves (its `.prev`). Either kind resumes in a run of any number of
      processes and devices, which then goes on writing that kind.
    - `checkpoint_every`: save every this many steps (and at the end).
    - `resume`: `True` to continue from `checkpoint` if the file exists (it must
      have been written by the same run: same model structure, method, batch size,
      data and options, else a [`fmcalc.train.CheckpointError`][]); `False` to
      start afresh; `"weights-only"` to start a new run (fresh optimiser, step 0)
      from the checkpoint's model and EMA, e.g. to fine-tune with another method,
      unless the checkpoint was written by this same run, which then continues.
    - `divergence`: a [`fmcalc.train.Divergence`][], or `None` to turn the check
      off.
    - `evaluate`: a function of the [`fmcalc.train.TrainState`][] returning a dict
      of floats, called every `eval_every` steps and at the end.
    - `eval_every`: how often to call `evaluate`; `None` for only at the end.
    - `max_nonfinite`: how many consecutive skipped steps stop the run.
    - `progress`: whether to show a progress bar with the loss and steps/s.
    - `mesh`: a `jax.sharding.Mesh` of the devices to train on, e.g.
      `jax.sharding.Mesh(jax.devices()[:4], ("data",))`; the batch's rows are split
      over all its axes, so `batch_size / accumulate` must be a multiple of its
      size. `None` for every device, on one axis `"data"`.
    - `shard_params`: a mesh axis along which to split the parameters, the EMA and
      the optimiser's state (each array along its largest dimension that the axis
      divides; the others stay replicated), for a model whose state does not fit
      one device: the devices gather each weight when they use it. `None`
      replicates them.
    - `accumulate`: split each step's batch into this many micro-batches, each
      with an equal share of every term's rows, and sum their gradients: the same
      update as one pass over the batch, with a micro-batch's activations in
      memory.
    - `precision`: a [`fmcalc.train.Precision`][] policy to run the online and EMA
      networks in bfloat16 or float16 (optionally their JVPs in float32), or
      `None` to compute in the parameters' dtype.

    **Returns:** a [`fmcalc.train.TrainResult`][].
    """
    if not isinstance(method, Method):
        raise TypeError(f"`method` must be an fmcalc.Method; got {method!r}.")
    _check_options(
        steps=steps,
        batch_size=batch_size,
        checkpoint_every=checkpoint_every,
        max_nonfinite=max_nonfinite,
        eval_every=eval_every,
        accumulate=accumulate,
    )
    if precision is not None and not isinstance(precision, Precision):
        raise TypeError(
            "`precision` must be an fmcalc.train.Precision (or None to compute in "
            f"the parameters' dtype); got {precision!r}."
        )
    mesh = check_mesh(mesh, batch_size, accumulate, shard_params)
    processes = jax.process_count()
    lead = jax.process_index() == 0
    if ema_decay is not None and not 0 <= ema_decay <= 1:
        raise ValueError(f"`ema_decay` must lie in [0, 1] or be None; got {ema_decay}.")
    if clip_norm is not None and not clip_norm > 0:
        raise ValueError(f"`clip_norm` must be positive or None; got {clip_norm}.")
    if resume not in (True, False, "weights-only"):
        raise ValueError(
            f"`resume` must be True, False or 'weights-only'; got {resume!r}."
        )
    if divergence is not None and not isinstance(divergence, Divergence):
        raise TypeError(
            "`divergence` must be an fmcalc.train.Divergence (or None to turn the "
            f"check off); got {divergence!r}."
        )
    if optimizer is None:
        optimizer = _DEFAULT_OPTIMIZER
    elif not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            "`optimizer` must be an optax.GradientTransformation such as "
            f"`optax.adam(1e-3)`; got {optimizer!r}."
        )
    if clip_norm is not None:
        optimizer = _clipped(optimizer, clip_norm)
    stream = None
    if is_stream(data):
        if labels is not None:
            raise ValueError(
                "`labels` go with an array `data`; a stream of batches yields its "
                "labels with its rows, as pairs `(x0, labels)`."
            )
        stream = Stream(data, batch_size // processes)  # pyright: ignore[reportArgumentType]
    else:
        data, labels = _check_data(data, labels, batch_size, method, model)
    _check_batch(method, batch_size, accumulate)
    if precision is not None:
        _check_precision(method, precision)
    broken = _unsound(_soundness_of(model, None, None), ("", "", ""))
    if broken:
        raise ValueError(
            "The initial `model` has non-finite or exploded parameters: "
            f"{broken[:5]} (of {len(broken)}). Initialise them finite."
        )
    if lead:
        _warn_ema_horizon(method, ema_decay, steps)
    directory = False
    if checkpoint is not None:
        checkpoint = os.fspath(checkpoint)
        directory = _checkpoint_orbax.is_directory(checkpoint) or (
            processes > 1 and not os.path.isfile(checkpoint)
        )
        if not directory:
            _check_checkpoint_path(checkpoint)
        if stream is not None and processes > 1 and not directory:
            raise ValueError(
                f"The checkpoint {checkpoint!r} is a file, written by a run of one "
                "process; a run of several processes fed by streams keeps each "
                "process's position in a checkpoint directory. Pass a new path."
            )
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    parts = {"model": model, "ema": model, "opt_state": opt_state}
    shardings = {
        name: Layout.of(mesh, shard_params, part).state for name, part in parts.items()
    }
    layout = Layout(
        mesh,
        shard_params,
        shardings["model"] + shardings["ema"] + shardings["opt_state"],
    )
    shardings["key"] = (layout.replicated,)
    if stream is None and not callable(data):
        data = put(data, layout.replicated)
        labels = None if labels is None else put(labels, layout.replicated)
    # The teacher's and aux network's arrays are read by every device.
    teacher, aux = jax.tree.map(
        lambda x: put(x, layout.replicated) if eqx.is_array(x) else x, (teacher, aux)
    )
    problem = _Problem(
        method,
        optimizer,
        # A stream's rows reach each step as arguments; the iterator itself is
        # not part of the compiled problem.
        None if stream is not None else data,
        labels,
        teacher,
        aux,
        batch_size,
        ema_decay,
        layout,
        accumulate,
        precision,
    )

    def placed(state: TrainState) -> TrainState:
        return TrainState(
            *(place(getattr(state, name), shardings[name]) for name in parts),
            step=state.step,
            key=put(state.key, layout.replicated),
        )

    state = placed(TrainState(model, model, opt_state, 0, key))
    run = _run_record(
        method, data, labels, batch_size, ema_decay, clip_norm, stream, processes
    )
    monitor = _Monitor(0.0 if divergence is None else divergence.smoothing)
    if checkpoint is not None and resume:
        state, saved_monitor, position = _resume(
            checkpoint, state, run, resume, shardings, stream is not None
        )
        state = placed(state)
        if position is not None:
            stream.seek(position)  # pyright: ignore[reportOptionalMemberAccess]
        if saved_monitor is not None and divergence is not None:
            monitor = _Monitor(divergence.smoothing, **saved_monitor)

    losses, history, evaluations = [], [], []
    skipped = consecutive = 0
    initial = state
    start = saved = state.step

    def save(state: TrainState, monitor_state: dict[str, Any]) -> None:
        """Save `state`, which must be sound (checked again here)."""
        nonlocal saved
        assert checkpoint is not None
        broken = _unsound(
            _soundness_of(state.model, state.ema, state.opt_state),
            ("model", "ema", "opt_state"),
        )
        if broken:
            raise NonFiniteError(
                f"Refusing to save step {state.step}: {broken[:5]} are non-finite or "
                f"exploded. The checkpoint {checkpoint!r} keeps step {saved}.",
                step=state.step,
                terms=[],
                rows={},
                leaves=broken,
            )
        record: dict[str, Any] = {"run": run, "monitor": monitor_state}
        position = None if stream is None else stream.position_at(state.step)
        if directory:
            _checkpoint_orbax.save(checkpoint, state, record, position)
        elif processes == 1:
            if position is not None:
                record["stream"] = position
            save_checkpoint(checkpoint, state, record=record)
        else:
            # A file is written by one process, after every process has helped
            # gather the arrays it holds a part of.
            local = _gathered(state)
            if lead:
                save_checkpoint(checkpoint, local, record=record)
            multihost_utils.sync_global_devices(f"fmcalc saved step {state.step}")
        saved = state.step

    def run_evaluation():
        results = evaluate(state)  # pyright: ignore[reportOptionalCall]
        if not isinstance(results, Mapping):
            raise TypeError(
                f"`evaluate` must return a dict of floats; got {results!r}."
            )
        evaluations.append((state.step, {k: float(v) for k, v in results.items()}))

    def check_divergence(step: int) -> None:
        assert divergence is not None
        if monitor.uphill >= divergence.uphill:
            raise DivergenceError(
                f"Training stopped at step {step}: the optimiser's update has pointed "
                f"up the gradient (update · gradient > 0) for {monitor.uphill} steps "
                "in a row, so it raises the loss: has the learning rate or its "
                "schedule turned negative? Pass `divergence=None` if this optimiser "
                "means it.",
                step=step,
                loss=monitor["loss"],
                minimum=monitor.minima["loss"],
                terms=[],
            )
        if (
            monitor.count <= divergence.warmup
            or monitor.rise("loss") <= divergence.factor
        ):
            return
        terms = sorted(
            (name for name in monitor.sums if name != "loss"),
            key=monitor.rise,
            reverse=True,
        )
        rises = ", ".join(
            f"{name!r} {monitor.minima[name]:.3g} -> {monitor[name]:.3g}"
            for name in terms
        )
        where = (
            f"The checkpoint {checkpoint!r} keeps step {saved} (and the one before "
            f"it, {previous_path(checkpoint)!r})."
            if checkpoint is not None and saved > start
            else "No checkpoint was written in this call."
        )
        raise DivergenceError(
            f"Training diverged at step {step}: the smoothed loss rose from its "
            f"minimum {monitor.minima['loss']:.3g} to {monitor['loss']:.3g}, more "
            f"than {divergence.factor:g} times the larger of the minimum's and the "
            "first loss's magnitudes above it. "
            f"Smoothed term losses (minimum -> now): {rises}. Lower the learning "
            f"rate, lower `clip_norm`, or check the data; pass "
            f"`divergence=fmcalc.train.Divergence(factor=...)` to allow more, or "
            f"`divergence=None` to turn the check off. {where}",
            step=step,
            loss=monitor["loss"],
            minimum=monitor.minima["loss"],
            terms=terms,
        )

    def record(before: TrainState, outputs, rows) -> None:
        """Read one step's loss, metrics and checks back from the device; save the
        state the step started from if it is due, now that its loss is known."""
        nonlocal skipped, consecutive
        loss, metrics, checks = fetch_tree(outputs)
        kept = checks["finite"] and checks["sound"]
        if divergence is not None and before.step == 0 and kept:
            if checks["alignment"] > 0:
                raise ValueError(
                    "The optimiser's first update points up the gradient (update · "
                    f"gradient = {float(checks['alignment']):.3g} > 0), so every "
                    "step would raise the loss: is the learning rate negative? "
                    "Pass `divergence=None` if this optimiser means it."
                )
        if kept:
            consecutive = 0
            snapshot = monitor.snapshot()
            if divergence is not None:
                terms = {t.name: float(metrics[f"{t.name}/loss"]) for t in method.terms}
                uphill = bool(checks["alignment"] > 0)
                monitor.update({"loss": float(loss), **terms}, uphill=uphill)
                check_divergence(before.step)
            due = checkpoint is not None and before.step % checkpoint_every == 0
            if due and before.step > saved:
                save(before, snapshot)
        else:
            skipped, consecutive, loss = skipped + 1, consecutive + 1, math.nan
            if consecutive >= max_nonfinite:
                first = before.step - consecutive + 1
                if checks["finite"]:
                    raise _diagnose_update(problem, before, first, rows)
                raise _diagnose(problem, before, metrics, first, initial, rows)
            what = (
                "an update that breaks the state"
                if checks["finite"]
                else "non-finite loss or gradient (non-finite metrics: "
                f"{[k for k, v in metrics.items() if not np.isfinite(v)]})"
            )
            if lead:
                warnings.warn(
                    f"Step {before.step} skipped: {what}.",
                    RuntimeWarning,
                    stacklevel=3,
                )
        losses.append(float(loss))
        history.append(metrics)
        bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
        bar.update()

    bar = tqdm(
        total=steps, initial=state.step, disable=not (progress and lead), unit="step"
    )
    # In a job of several processes a save is collective, and a signal reaches
    # one process only: the job resumes from its last periodic checkpoint.
    catch = processes == 1
    with _catch_sigterm(catch) as terminated, bar:
        try:
            # Step i's outputs are read after step i + 1 has been dispatched, so the
            # host's bookkeeping overlaps the device's work instead of idling it.
            pending = None
            while state.step < steps and not terminated:
                before = state
                rows = None if stream is None else _global_rows(stream, layout)
                updated, outputs = _step(
                    before.model,
                    before.ema,
                    before.opt_state,
                    _step_number(before.step, layout),
                    before.key,
                    problem,
                    rows,
                )
                state = TrainState(*updated, step=before.step + 1, key=before.key)
                if pending is not None:
                    record(*pending)
                pending = (before, outputs, rows)
                if checkpoint is not None and before.step % checkpoint_every == 0:
                    # Read at once, so a save is never more than `checkpoint_every`
                    # steps behind the run.
                    record(*pending)
                    pending = None
                if evaluate is not None and eval_every and state.step % eval_every == 0:
                    run_evaluation()
            if pending is not None:
                record(*pending)
        except KeyboardInterrupt:
            if catch and checkpoint is not None and state.step > saved:
                save(state, monitor.snapshot())
            raise
        if checkpoint is not None and state.step > saved:
            save(state, monitor.snapshot())
    if terminated:
        # The default action, restored on leaving `_catch_sigterm`, ends the process
        # with the signal's status, as if the run had never caught it.
        signal.raise_signal(terminated[0])
    if evaluate is not None and (not evaluations or evaluations[-1][0] != state.step):
        run_evaluation()
    names = history[0] if history else {}
    return TrainResult(
        state.model,
        state.ema,
        state.opt_state,
        state.step,
        state.key,
        losses=np.asarray(losses, dtype=np.float64),
        metrics={k: np.asarray([m[k] for m in history]) for k in names},
        skipped=skipped,
        evaluations=evaluations,
        mesh=mesh,
    )
