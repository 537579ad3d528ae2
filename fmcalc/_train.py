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
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, ArrayLike, PRNGKeyArray, PyTree
from tqdm.auto import tqdm

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
from ._ema import ema_update
from ._expr import Call, Derivative, Network, walk
from ._method import Method, term_loss
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

    def batch(self, key, step) -> tuple[Batch, Array | None]:
        """Step `step`'s batch and, for an array `data`, the indices of its rows."""
        k_data, k_batch = jax.random.split(jax.random.fold_in(key, step))
        if isinstance(self.data, jax.Array):
            n = self.data.shape[0]
            indices = jax.random.randint(k_data, (self.batch_size,), 0, n)
            x0 = self.data[indices]
        else:
            indices = None
            x0 = jnp.asarray(self.data(k_data, self.batch_size))
            if x0.ndim != 2 or x0.shape[0] != self.batch_size:
                raise ValueError(
                    f"`data(key, n)` must return an array of shape (n, dim); with "
                    f"n={self.batch_size} it returned shape {x0.shape}."
                )
        cond = None if self.labels is None else self.labels[indices]
        return self.method.batch(k_batch, x0, cond=cond), indices

    def networks(self, model, ema) -> dict[str, Any]:
        if self.ema_decay is None:
            params, static = eqx.partition(model, eqx.is_array)
            ema = eqx.combine(jax.lax.stop_gradient(params), static)
        return {"online": model, "ema": ema, "aux": self.aux}


def _candidate(model, ema, opt_state, step, key, problem: _Problem):
    """One step's loss, metrics, gradient and update, before anything is kept."""
    batch, _ = problem.batch(key, step)

    def loss_fn(model):
        return problem.method.loss(
            model,
            batch,
            teacher=problem.teacher,
            ema=problem.networks(model, ema)["ema"],
            aux=problem.aux,
            step=step,
        )

    (loss, metrics), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model)
    params = eqx.filter(model, eqx.is_inexact_array)
    updates, new_opt_state = problem.optimizer.update(grads, opt_state, params)
    new_model = eqx.apply_updates(model, updates)
    if problem.ema_decay is None:
        new_ema = new_model
    else:
        new_ema = ema_update(ema, new_model, problem.ema_decay)
    return loss, metrics, grads, updates, (new_model, new_ema, new_opt_state)


@eqx.filter_jit
def _step(model, ema, opt_state, step, key, problem: _Problem):
    loss, metrics, grads, updates, new = _candidate(
        model, ema, opt_state, step, key, problem
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
def _update_soundness(problem: _Problem, model, ema, opt_state, key, step):
    """Per array, whether step `step`'s update would leave it sound."""
    new = _candidate(model, ema, opt_state, step, key, problem)[-1]
    return _soundness(*new)


_soundness_of = eqx.filter_jit(_soundness)


def _unsound(flags: PyTree, names: tuple[str, ...]) -> list[str]:
    """The paths of the arrays flagged unsound, prefixed by their part's name."""
    return [
        name + jax.tree_util.keystr(path)
        for name, part in zip(names, jax.device_get(flags), strict=True)
        for path, ok in jax.tree_util.tree_leaves_with_path(part)
        if not ok
    ]


@eqx.filter_jit
def _finite_rows(problem: _Problem, model, ema, key, step):
    """For each term, whether each of its rows of step `step`'s batch has a finite
    loss and gradient, and the rows' times; and the data rows drawn."""
    batch, indices = problem.batch(key, step)
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


def _diagnose_update(problem: _Problem, state: TrainState, first: int):
    """Name the arrays a finite loss and gradient's update made unsound."""
    flags = _update_soundness(
        problem,
        state.model,
        state.ema,
        state.opt_state,
        state.key,
        jnp.asarray(state.step),
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
    problem: _Problem, state: TrainState, metrics, first: int, initial: TrainState
):
    """Re-evaluate the last step's batch row by row to say where it went wrong, and
    with the parameters the run started from to say whether they ran away."""
    step = jnp.asarray(state.step)
    checks, indices = jax.device_get(
        _finite_rows(problem, state.model, state.ema, state.key, step)
    )
    before, _ = jax.device_get(
        _finite_rows(problem, initial.model, initial.ema, state.key, step)
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
    rows = batch_size * (len(method.terms) if method.split is None else 1)
    for term, count in zip(method.terms, method.row_counts(rows), strict=True):
        if count == 0:
            raise ValueError(
                f"With batch_size={batch_size}, the split {method.split} of method "
                f"{method.name!r} gives the term {term.name!r} no rows; use a larger "
                "`batch_size`."
            )
    return data, labels


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


def _describe_data(data) -> str:
    if callable(data):
        return f"function {text(data)}"
    return f"{data.dtype}{list(data.shape)}"


def _run_record(
    method: Method, data, labels, batch_size, ema_decay, clip_norm
) -> dict[str, Any]:
    """What must be the same for a checkpoint to continue this run."""
    record: dict[str, Any] = {
        "method" + ("" if path == "." else path): text
        for path, text in describe(method).items()
    }
    return record | {
        "batch_size": batch_size,
        "data": _describe_data(data),
        "labels": None if labels is None else _describe_data(labels),
        "ema_decay": ema_decay,
        "clip_norm": clip_norm,
    }


def _resume(
    path: str,
    fresh: TrainState,
    run: dict[str, Any],
    resume: bool | Literal["weights-only"],
) -> tuple[TrainState, dict[str, Any] | None]:
    """The state to start from (and the saved divergence monitor): from `path`, or
    from the previous checkpoint if `path` is damaged."""
    damaged = []
    for candidate in (path, previous_path(path)):
        if not os.path.exists(candidate):
            continue
        try:
            with open(candidate, "rb") as f:
                header, payload = decode(candidate, f.read())
        except CheckpointError as error:
            damaged.append(error)
            continue
        if damaged:
            warnings.warn(
                f"{damaged[0]} Resuming from the previous checkpoint {candidate!r} "
                f"(step {header.get('step')}) instead.",
                RuntimeWarning,
                stacklevel=3,
            )
        # A checkpoint saved by hand has no record of its run; then only its
        # structure can be checked.
        problems = differences(header["run"], run) if "run" in header else []
        if not problems:
            return restore(candidate, header, payload, fresh), header.get("monitor")
        if resume is True:
            # Another model is the first thing to name, and `restore` names it.
            restore(candidate, header, payload, fresh)
            raise CheckpointError(
                f"The checkpoint {candidate!r} was written by another run: "
                + "; ".join(problems)
                + ". Pass the same method, batch size, data and options to continue "
                "it; `resume='weights-only'` to start a new run from its weights "
                "(fine-tuning); or a new path (or `resume=False`) to start afresh.",
                path=candidate,
                problems=problems,
                damaged=False,
            )
        model, ema = restore(candidate, header, payload, fresh, fields=("model", "ema"))
        return TrainState(model, ema, fresh.opt_state, 0, fresh.key), None
    if damaged:
        raise damaged[0]
    return fresh, None


@contextlib.contextmanager
def _catch_sigterm() -> Iterator[list[int]]:
    """Turn SIGTERM into a flag that the loop polls, so the run can be saved before
    the process ends. Only where SIGTERM still has its default action (terminate),
    and only in the main thread, where Python runs signal handlers."""
    received: list[int] = []
    if (
        threading.current_thread() is not threading.main_thread()
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
    data: ArrayLike | Callable[..., Any],
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
) -> TrainResult:
    """Train `model` with `method`.

    Each step draws `batch_size` data rows, lets `method.batch` draw noise and times,
    and takes one optimiser step on `method.loss`. The step is compiled once; step
    `i` uses the key `jax.random.fold_in(key, i)` and passes `step=i` to the loss
    (curricula), so a run resumed from a checkpoint reproduces the uninterrupted run
    exactly.

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
      of your own is left alone).

    **Main arguments:**

    - `method`: the [`fmcalc.Method`][].
    - `model`: the model, called per example as `model(x, s, t, cond=cond)`.
    - `data`: an `(N, dim)` float32 or float64 array whose rows are drawn uniformly
      with replacement, or a function `data(key, n)` returning `(n, dim)` samples,
      traceable by JAX (e.g. an analytic flow's `flow.sample`).
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
      ([`fmcalc.train.checkpoint_header`][]).
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
    )
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
    data, labels = _check_data(data, labels, batch_size, method, model)
    broken = _unsound(_soundness_of(model, None, None), ("", "", ""))
    if broken:
        raise ValueError(
            "The initial `model` has non-finite or exploded parameters: "
            f"{broken[:5]} (of {len(broken)}). Initialise them finite."
        )
    _warn_ema_horizon(method, ema_decay, steps)
    if checkpoint is not None:
        checkpoint = os.fspath(checkpoint)
        _check_checkpoint_path(checkpoint)
    problem = _Problem(
        method, optimizer, data, labels, teacher, aux, batch_size, ema_decay
    )
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    state = TrainState(model, model, opt_state, 0, key)
    run = _run_record(method, data, labels, batch_size, ema_decay, clip_norm)
    monitor = _Monitor(0.0 if divergence is None else divergence.smoothing)
    if checkpoint is not None and resume:
        state, saved_monitor = _resume(checkpoint, state, run, resume)
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
        record = {"run": run, "monitor": monitor_state}
        save_checkpoint(checkpoint, state, record=record)
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

    def record(before: TrainState, outputs) -> None:
        """Read one step's loss, metrics and checks back from the device; save the
        state the step started from if it is due, now that its loss is known."""
        nonlocal skipped, consecutive
        loss, metrics, checks = jax.device_get(outputs)
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
                    raise _diagnose_update(problem, before, first)
                raise _diagnose(problem, before, metrics, first, initial)
            what = (
                "an update that breaks the state"
                if checks["finite"]
                else "non-finite loss or gradient (non-finite metrics: "
                f"{[k for k, v in metrics.items() if not np.isfinite(v)]})"
            )
            warnings.warn(
                f"Step {before.step} skipped: {what}.", RuntimeWarning, stacklevel=3
            )
        losses.append(float(loss))
        history.append(metrics)
        bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
        bar.update()

    bar = tqdm(total=steps, initial=state.step, disable=not progress, unit="step")
    with _catch_sigterm() as terminated, bar:
        try:
            # Step i's outputs are read after step i + 1 has been dispatched, so the
            # host's bookkeeping overlaps the device's work instead of idling it.
            pending = None
            while state.step < steps and not terminated:
                before = state
                updated, outputs = _step(
                    before.model,
                    before.ema,
                    before.opt_state,
                    jnp.asarray(before.step),
                    before.key,
                    problem,
                )
                state = TrainState(*updated, step=before.step + 1, key=before.key)
                if pending is not None:
                    record(*pending)
                pending = (before, outputs)
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
            if checkpoint is not None and state.step > saved:
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
    )
