"""The training loop behind `fmcalc.train`."""

import contextlib
import functools
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, ArrayLike, PRNGKeyArray, PyTree
from tqdm.auto import tqdm

from ._batch import Batch
from ._ema import ema_update
from ._method import Method, term_loss


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
    loss was non-finite there) and `rows` (for each term, the rows of that step's
    batch whose loss or gradient is non-finite).
    """

    def __init__(self, message: str, *, step: int, terms: list[str], rows: dict):
        super().__init__(message)
        self.step, self.terms, self.rows = step, terms, rows


# ------------------------------------------------------------------- checkpoints


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _raw_keys(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def save_checkpoint(path: str | os.PathLike, state: PyTree) -> None:
    """Save a training state atomically.

    The leaves are written by `eqx.tree_serialise_leaves` (typed PRNG keys as their
    key data) to a temporary file next to `path`, flushed to disk and then renamed
    onto `path`, so an interrupted save leaves the previous checkpoint intact.

    **Arguments:**

    - `path`: the checkpoint file; its directory is created if need be.
    - `state`: a [`fmcalc.train.TrainState`][] (or any pytree).

    **Returns:** nothing.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, temporary = tempfile.mkstemp(
        prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory
    )
    try:
        with os.fdopen(fd, "wb") as f:
            # `mkstemp` makes the file private; give it the mode `open` would.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(temporary, 0o666 & ~umask)
            eqx.tree_serialise_leaves(f, _raw_keys(state))
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def _mismatch(path: str, like: PyTree) -> str | None:
    """How the arrays stored at `path` differ from those of `like`, read from the
    arrays' headers alone; `None` if they agree."""
    expected = [
        (jax.tree_util.keystr(where), np.shape(leaf), getattr(leaf, "dtype", None))
        for where, leaf in jax.tree_util.tree_leaves_with_path(like)
        if eqx.is_array_like(leaf)
    ]
    readers = {
        (1, 0): np.lib.format.read_array_header_1_0,
        (2, 0): np.lib.format.read_array_header_2_0,
    }
    stored = []
    with open(path, "rb") as f:
        try:
            while f.peek(1):
                shape, _, dtype = readers[np.lib.format.read_magic(f)](f)
                f.seek(math.prod(shape) * dtype.itemsize, os.SEEK_CUR)
                stored.append((tuple(shape), dtype))
        except (ValueError, KeyError):
            return "it is not a file of arrays written by `save_checkpoint`"
    for (where, shape, dtype), (found, found_dtype) in zip(
        expected, stored, strict=False
    ):
        if tuple(shape) != found:
            return f"`{where}` has shape {found} there but {tuple(shape)} here"
        # Python scalars (the step) are stored in JAX's default precision and
        # bfloat16 as raw bytes ("V2"): neither is compared here.
        if dtype is not None and found_dtype.kind != "V" and dtype != found_dtype:
            return f"`{where}` has dtype {found_dtype} there but {dtype} here"
    if len(stored) != len(expected):
        return f"it holds {len(stored)} arrays, not {len(expected)}"
    return None


def load_checkpoint(path: str | os.PathLike, like: PyTree) -> PyTree:
    """Load a checkpoint written by [`fmcalc.train.save_checkpoint`][].

    **Arguments:**

    - `path`: the checkpoint file.
    - `like`: a pytree of the same structure, shapes and dtypes (e.g. a
      [`fmcalc.train.TrainState`][] of the same model and optimiser).

    **Returns:** `like` with the saved values.
    """
    path = os.fspath(path)
    raw = _raw_keys(like)
    problem = _mismatch(path, raw)
    if problem is None:
        try:
            with open(path, "rb") as f:
                loaded = eqx.tree_deserialise_leaves(f, raw)
        except Exception as error:
            problem = f"{error} ({error.__cause__})" if error.__cause__ else error
        else:
            return jax.tree.map(
                lambda new, old: (
                    jax.random.wrap_key_data(new, impl=jax.random.key_impl(old))
                    if _is_key(old)
                    else new
                ),
                loaded,
                like,
            )
    raise ValueError(
        f"The checkpoint {path!r} does not fit the model and optimiser given: "
        f"{problem}. It was written for another model, optimiser or dtype (or is "
        "damaged); pass the ones it was written with, or a new checkpoint path (or "
        "`resume=False`) to start afresh."
    )


# --------------------------------------------------------------------------- step


def _all_finite(tree: PyTree) -> Array:
    leaves = [
        jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if eqx.is_array(x)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


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


@eqx.filter_jit
def _step(model, ema, opt_state, step, key, problem: _Problem):
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
    squares = sum((jnp.sum(g**2) for g in jax.tree.leaves(grads)), jnp.zeros(()))
    metrics = {**metrics, "grad_norm": jnp.sqrt(squares)}
    # A skipped step keeps every array as it was; selecting inside the compiled step
    # avoids a second program for the skip.
    finite = jnp.isfinite(loss) & _all_finite(grads)
    updated = jax.tree.map(
        lambda new, old: jnp.where(finite, new, old) if eqx.is_array(new) else new,
        (new_model, new_ema, new_opt_state),
        (model, ema, opt_state),
    )
    return updated, (loss, metrics, finite)


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
            return jnp.isfinite(value), _all_finite(grads)

        checks.append((*jax.vmap(row)(rows), rows.s, rows.t))
    return checks, indices


def _diagnose(problem: _Problem, state: TrainState, metrics, first: int):
    """Re-evaluate the last step's batch row by row to say where it went wrong."""
    step = jnp.asarray(state.step)
    checks, indices = jax.device_get(
        _finite_rows(problem, state.model, state.ema, state.key, step)
    )
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
    if first < state.step:
        steps = f"steps {first} to {state.step} all had"
        skipped = "their updates were"
    else:
        steps, skipped = f"step {state.step} had", "its update was"
    message = (
        f"Training stopped: {steps} a non-finite loss or gradient, so {skipped} "
        f"skipped. At step {state.step} the non-finite term(s) were "
        f"{bad_terms or 'none (only the gradient)'}:\n"
        + "\n".join(lines)
        + "\nCheck the data for NaN or inf rows, the model at these times, the "
        "teacher, or lower the learning rate (or raise `max_nonfinite`)."
    )
    return NonFiniteError(message, step=state.step, terms=bad_terms, rows=bad_rows)


# ------------------------------------------------------------------------- checks

_DEFAULT_OPTIMIZER = optax.adam(1e-3)


# Reusing the same transformation lets repeated `fit` calls (a resume in the same
# process, a notebook) hit the step's compilation cache.
@functools.lru_cache(maxsize=16)
def _clipped(optimizer: optax.GradientTransformation, clip_norm: float):
    return optax.chain(optax.clip_by_global_norm(clip_norm), optimizer)


def _check_data(data, labels, batch_size: int, method: Method):
    if not callable(data):
        data = jnp.asarray(data)
        if data.ndim != 2 or data.shape[0] < 1:
            raise ValueError(
                "`data` must be an array of shape (N, dim) with N >= 1, or a "
                f"function `data(key, n)`; got an array of shape {data.shape}."
            )
        if not jnp.issubdtype(data.dtype, jnp.floating):
            raise TypeError(f"`data` must be a floating array; got {data.dtype}.")
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
    resume: bool = True,
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
    exactly. A step whose loss or gradient is non-finite is skipped (parameters, EMA
    and optimiser state unchanged) with a warning; `max_nonfinite` such steps in a
    row raise [`fmcalc.train.NonFiniteError`][] naming the terms and batch rows at
    fault. On `KeyboardInterrupt` the state is saved to `checkpoint` first.

    **Arguments:**

    - `method`: the [`fmcalc.Method`][].
    - `model`: the model, called per example as `model(x, s, t, cond=cond)`.
    - `data`: an `(N, dim)` array whose rows are drawn uniformly with replacement,
      or a function `data(key, n)` returning `(n, dim)` samples, traceable by JAX
      (e.g. an analytic flow's `flow.sample`).
    - `key`: the run's PRNG key (on resume, the checkpoint's key is used).
    - `steps`: the total number of steps; a resumed run continues up to it.
    - `batch_size`: data rows per step (the method's split gives them to its terms).
    - `optimizer`: an optax transformation; `optax.adam(1e-3)` if `None`.
    - `labels`: `(N,)` integer class labels of the rows of an array `data`, passed to
      the networks as `cond`; `None` for unconditional training.
    - `teacher`, `aux`: passed on to `method.loss`.
    - `ema_decay`: the decay of the parameters' EMA, the loss's `ema` network; with
      `None` the loss gets the model under a stop-gradient instead.
    - `clip_norm`: clip the gradient to this global norm before the optimiser;
      `None` for no clipping.
    - `checkpoint`: a file to save the state to, or `None`.
    - `checkpoint_every`: save every this many steps (and at the end).
    - `resume`: whether to continue from `checkpoint` if the file exists.
    - `evaluate`: a function of the [`fmcalc.train.TrainState`][] returning a dict
      of floats, called every `eval_every` steps and at the end.
    - `eval_every`: how often to call `evaluate`; `None` for only at the end.
    - `max_nonfinite`: how many consecutive non-finite steps stop the run.
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
    if optimizer is None:
        optimizer = _DEFAULT_OPTIMIZER
    elif not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            "`optimizer` must be an optax.GradientTransformation such as "
            f"`optax.adam(1e-3)`; got {optimizer!r}."
        )
    if clip_norm is not None:
        optimizer = _clipped(optimizer, clip_norm)
    data, labels = _check_data(data, labels, batch_size, method)
    problem = _Problem(
        method, optimizer, data, labels, teacher, aux, batch_size, ema_decay
    )
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    state = TrainState(model, model, opt_state, 0, key)
    if checkpoint is not None and resume and os.path.exists(checkpoint):
        state = load_checkpoint(checkpoint, state)

    losses, history, evaluations = [], [], []
    skipped = consecutive = 0
    saved = state.step

    def run_evaluation():
        results = evaluate(state)  # pyright: ignore[reportOptionalCall]
        if not isinstance(results, Mapping):
            raise TypeError(
                f"`evaluate` must return a dict of floats; got {results!r}."
            )
        evaluations.append((state.step, {k: float(v) for k, v in results.items()}))

    def record(before: TrainState, outputs) -> None:
        """Read one step's loss, metrics and finiteness back from the device."""
        nonlocal skipped, consecutive
        loss, metrics, finite = jax.device_get(outputs)
        if finite:
            consecutive = 0
        else:
            skipped, consecutive, loss = skipped + 1, consecutive + 1, math.nan
            if consecutive >= max_nonfinite:
                first = before.step - consecutive + 1
                raise _diagnose(problem, before, metrics, first)
            bad = [k for k, v in metrics.items() if not np.isfinite(v)]
            warnings.warn(
                f"Step {before.step} skipped: non-finite loss or gradient "
                f"(non-finite metrics: {bad}).",
                RuntimeWarning,
                stacklevel=3,
            )
        losses.append(float(loss))
        history.append(metrics)
        bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
        bar.update()

    bar = tqdm(total=steps, initial=state.step, disable=not progress, unit="step")
    with bar:
        try:
            # Step i's outputs are read after step i + 1 has been dispatched, so the
            # host's bookkeeping overlaps the device's work instead of idling it.
            pending = None
            while state.step < steps:
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
                if checkpoint is not None and state.step % checkpoint_every == 0:
                    record(*pending)
                    pending = None
                    save_checkpoint(checkpoint, state)
                    saved = state.step
                if evaluate is not None and eval_every and state.step % eval_every == 0:
                    run_evaluation()
            if pending is not None:
                record(*pending)
        except KeyboardInterrupt:
            if checkpoint is not None:
                save_checkpoint(checkpoint, state)
            raise
    if checkpoint is not None and saved != state.step:
        save_checkpoint(checkpoint, state)
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
