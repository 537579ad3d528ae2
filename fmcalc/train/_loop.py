"""`fit`: the training loop. It checks its inputs, builds the compiled problem,
resumes, then runs a `_Loop` that takes steps, watches them, saves and evaluates."""

import contextlib
import functools
import math
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
import optax
from jaxtyping import ArrayLike, PRNGKeyArray, PyTree
from tqdm import std as tqdm_std
from tqdm.auto import tqdm

from .._method import Method
from .._parallel import check_mesh, fetch_tree
from .._warnings import EMAHorizonWarning, warn as warn_from_user
from . import _store
from ._build import setup
from ._data import check_batch, check_data, run_defaults, run_record
from ._diagnose import diagnose, diagnose_update
from ._guards import DivergenceError, Monitor, NonFiniteError, soundness_of, unsound
from ._options import EMA, MOVED, Checkpoint, Options
from ._resume import resume_from
from ._state import TrainResult, TrainState
from ._step import Problem, global_rows, step_number, train_step
from ._stream import Stream, is_stream


# --------------------------------------------------------------------- defaults

_PEAK_LEARNING_RATE = 3e-3
_ZERO_GRADIENT_STEPS = 10


def restart_clock(bar: tqdm_std.tqdm) -> None:
    """Restart `bar`'s timer at its current count: what came before (compiling)
    counts in neither its rate nor its estimate of the time left."""
    done = bar.n
    bar.reset(total=bar.total)
    bar.initial = bar.n = bar.last_print_n = done
    bar.refresh()


@functools.lru_cache(maxsize=16)
def default_optimizer(steps: int) -> optax.GradientTransformation:
    """The optimiser `fit` uses when none is given: Adam whose learning rate warms
    up linearly from 0 to 3e-3 over the first 5 % of the run (at most 1000 steps)
    and decays to 0 along a cosine by its end. Cached per run length, so repeated
    runs reuse the compiled step."""
    warmup = max(1, min(1000, steps // 20))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0,
        _PEAK_LEARNING_RATE,
        warmup_steps=warmup,
        decay_steps=max(steps, warmup + 1),
    )
    return optax.adam(schedule)


# Reusing the same transformation lets repeated `fit` calls (a resume in the same
# process, a notebook) hit the step's compilation cache.
@functools.lru_cache(maxsize=16)
def _clipped(optimizer: optax.GradientTransformation, clip_norm: float):
    return optax.chain(optax.clip_by_global_norm(clip_norm), optimizer)


def _warn_ema_horizon(method: Method, ema: EMA | None, steps: int) -> None:
    """Warn when the method reads an EMA whose memory spans much of the run."""
    if ema is None:
        return
    decay = ema.decay_for(steps)
    horizon = math.inf if decay == 1 else 1 / (1 - decay)
    terms = [term.name for term in method.terms if "ema" in term.networks]
    # A horizon of exactly a fifth (`EMA(horizon=0.2)`) is not more than one,
    # whatever the round-off in `decay`.
    if horizon <= steps / 5 * (1 + 1e-9) or not terms:
        return
    warn_from_user(
        f"An EMA decay of {decay:.6g} averages over about {horizon:.0f} steps, more "
        f"than a fifth of the {steps}-step run, and method {method.name!r} reads the "
        f"EMA network in term(s) {terms}: their targets would lag the online network "
        f"for most of training. Use `ema=fmcalc.train.EMA(horizon=0.1)` (a tenth of "
        f"the run), a decay <= {1 - 5 / steps:.6g}, or more steps.",
        EMAHorizonWarning,
    )


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


# ------------------------------------------------------------------------- loop


class _Loop:
    """One call of `fit` after its checks: the state and history of the run, and
    the steps that move them. Each method does one thing: `step` dispatches a
    compiled step, `observe` reads one back and judges it, `save` writes a
    checkpoint, `evaluate` calls the hook."""

    def __init__(
        self,
        problem: Problem,
        options: Options,
        state: TrainState,
        monitor: Monitor,
        run: dict[str, Any],
        stream: Stream | None,
        steps: int,
    ):
        self.problem, self.options, self.run = problem, options, run
        self.state, self.monitor, self.stream, self.steps = (
            state,
            monitor,
            stream,
            steps,
        )
        self.checkpoint: Checkpoint | None = options.checkpoint
        self.processes = jax.process_count()
        self.lead = jax.process_index() == 0
        self.initial = state
        self.start = self.saved = state.step
        self.losses: list[float] = []
        self.history: list[dict[str, Any]] = []
        self.evaluations: list[tuple[int, dict[str, float]]] = []
        self.skipped = self.consecutive = 0
        # Kept steps in a row whose gradient was exactly zero (warned at
        # `_ZERO_GRADIENT_STEPS`, once).
        self.still = 0
        # The divergence monitor's state before the last kept step: what a save of
        # the state that step started from records.
        self.snapshot = monitor.snapshot()
        self.bar = tqdm(
            total=steps,
            initial=state.step,
            disable=not (options.progress and self.lead),
            unit="step",
        )

    # ------------------------------------------------------------------ steps

    def step(self) -> tuple[TrainState, Any, Any]:
        """Dispatch the next step; returns the state it started from, its outputs
        (still on the device) and the stream's rows it took."""
        before = self.state
        layout = self.problem.layout
        rows = None if self.stream is None else global_rows(self.stream, layout)
        updated, outputs = train_step(
            before.model,
            before.ema,
            before.opt_state,
            step_number(before.step, layout),
            before.key,
            self.problem,
            rows,
        )
        self.state = TrainState(*updated, step=before.step + 1, key=before.key)
        return before, outputs, rows

    def observe(self, before: TrainState, outputs, rows) -> bool:
        """Read one step's loss, metrics and checks back from the device, record
        them, and stop the run if it must stop. Returns whether the step was kept
        (then `before`, whose loss is now known to be finite, may be saved)."""
        loss, metrics, checks = fetch_tree(outputs)
        kept = bool(checks["finite"] and checks["sound"])
        divergence = self.options.divergence
        if divergence is not None and before.step == 0 and kept:
            if checks["alignment"] > 0:
                raise ValueError(
                    "The optimiser's first update points up the gradient (update · "
                    f"gradient = {float(checks['alignment']):.3g} > 0), so every "
                    "step would raise the loss: is the learning rate negative? "
                    "Pass `options=fmcalc.train.Options(divergence=None)` if this "
                    "optimiser means it."
                )
        if kept:
            self.consecutive = 0
            self.snapshot = self.monitor.snapshot()
            self.check_gradient(before.step, float(metrics["grad_norm"]))
            if divergence is not None:
                terms = {
                    t.name: float(metrics[f"{t.name}/loss"])
                    for t in self.problem.method.terms
                }
                uphill = bool(checks["alignment"] > 0)
                self.monitor.update({"loss": float(loss), **terms}, uphill=uphill)
                self.check_divergence(before.step)
        else:
            self.skipped, self.consecutive = self.skipped + 1, self.consecutive + 1
            loss = math.nan
            if self.consecutive >= self.options.max_nonfinite:
                first = before.step - self.consecutive + 1
                if checks["finite"]:
                    raise diagnose_update(self.problem, before, first, rows)
                raise diagnose(self.problem, before, metrics, first, self.initial, rows)
            what = (
                "an update that breaks the state"
                if checks["finite"]
                else "non-finite loss or gradient (non-finite metrics: "
                f"{[k for k, v in metrics.items() if not np.isfinite(v)]})"
            )
            if self.lead:
                warn_from_user(f"Step {before.step} skipped: {what}.", RuntimeWarning)
        self.losses.append(float(loss))
        self.history.append(metrics)
        self.bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
        self.bar.update()
        if before.step == self.start:
            # The first step also compiled the program: time the rest from here, so
            # the rate and the time left are those of training.
            restart_clock(self.bar)
        return kept

    def check_gradient(self, step: int, norm: float) -> None:
        """Warn once when the gradient has been exactly zero for
        `_ZERO_GRADIENT_STEPS` kept steps in a row: nothing is training."""
        self.still = self.still + 1 if norm == 0 else 0
        if self.still == _ZERO_GRADIENT_STEPS and self.lead:
            warn_from_user(
                f"The gradient has been exactly zero for {self.still} steps (steps "
                f"{step - self.still + 1} to {step}), so the parameters do not "
                "move: the loss does not depend on them. Is the model's output "
                "independent of its parameters, or is every call of the online "
                "network under a stop-gradient?",
                RuntimeWarning,
            )

    def check_divergence(self, step: int) -> None:
        divergence, monitor = self.options.divergence, self.monitor
        assert divergence is not None
        if monitor.uphill >= divergence.uphill:
            raise DivergenceError(
                f"Training stopped at step {step}: the optimiser's update has pointed "
                f"up the gradient (update · gradient > 0) for {monitor.uphill} steps "
                "in a row, so it raises the loss: has the learning rate or its "
                "schedule turned negative? Pass `options=fmcalc.train.Options("
                "divergence=None)` if this optimiser means it.",
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
            f"The checkpoint {self.checkpoint.path!r} keeps step {self.saved} (and "
            f"the one before it, {_store.previous(self.checkpoint.path)})."
            if self.checkpoint is not None and self.saved > self.start
            else "No checkpoint was written in this call."
        )
        raise DivergenceError(
            f"Training diverged at step {step}: the smoothed loss rose from its "
            f"minimum {monitor.minima['loss']:.3g} to {monitor['loss']:.3g}, more "
            f"than {divergence.factor:g} times the larger of the minimum's and the "
            "first loss's magnitudes above it. "
            f"Smoothed term losses (minimum -> now): {rises}. Lower the learning "
            "rate, lower `clip_norm`, or check the data; pass "
            "`options=fmcalc.train.Options(divergence=fmcalc.train.Divergence("
            "factor=...))` to allow more, or `divergence=None` to turn the check "
            f"off. {where}",
            step=step,
            loss=monitor["loss"],
            minimum=monitor.minima["loss"],
            terms=terms,
        )

    # ------------------------------------------------------- saving, evaluating

    def due(self, step: int) -> bool:
        """Whether the state at `step` is one to save."""
        return self.checkpoint is not None and step % self.checkpoint.every == 0

    def save(self, state: TrainState, monitor_state: dict[str, Any]) -> None:
        """Save `state`, which must be sound (checked again here)."""
        checkpoint = self.checkpoint
        assert checkpoint is not None
        broken = unsound(
            soundness_of(state.model, state.ema, state.opt_state),
            ("model", "ema", "opt_state"),
        )
        if broken:
            raise NonFiniteError(
                f"Refusing to save step {state.step}: {broken[:5]} are non-finite or "
                f"exploded. The checkpoint {checkpoint.path!r} keeps step "
                f"{self.saved}.",
                step=state.step,
                terms=[],
                rows={},
                leaves=broken,
            )
        record: dict[str, Any] = {"run": self.run, "monitor": monitor_state}
        stream = self.stream
        position = None if stream is None else stream.position_at(state.step)
        _store.save(
            checkpoint.path,
            state,
            record,
            position,
            keep=checkpoint.keep,
            processes=self.processes,
        )
        self.saved = state.step

    def evaluate(self) -> None:
        evaluation = self.options.evaluation
        assert evaluation is not None
        results = evaluation.fn(self.state)
        if not isinstance(results, Mapping):
            raise TypeError(
                f"`Evaluation(fn=...)` must return a dict of floats; got {results!r}."
            )
        self.evaluations.append(
            (self.state.step, {k: float(v) for k, v in results.items()})
        )

    # -------------------------------------------------------------------- run

    def run_steps(self, terminated: list[int]) -> None:
        """Take steps until the last, or until SIGTERM. Step i's outputs are read
        after step i + 1 has been dispatched, so the host's bookkeeping overlaps
        the device's work instead of idling it; a step due for a checkpoint is
        read at once, so a save is never more than `every` steps behind."""
        evaluation = self.options.evaluation
        pending = None
        while self.state.step < self.steps and not terminated:
            taken = self.step()
            if pending is not None:
                self.observe_and_save(*pending)
            pending = taken
            if self.due(taken[0].step):
                self.observe_and_save(*pending)
                pending = None
            if evaluation is not None and evaluation.every:
                if self.state.step % evaluation.every == 0:
                    self.evaluate()
        if pending is not None:
            self.observe_and_save(*pending)

    def observe_and_save(self, before: TrainState, outputs, rows) -> None:
        """Observe a step; if it was kept and its starting state is due, save that
        state, whose own loss has now been seen finite and not diverged."""
        if self.observe(before, outputs, rows) and self.due(before.step):
            if before.step > self.saved:
                self.save(before, self.snapshot)

    def __call__(self) -> TrainResult:
        # In a job of several processes a save is collective, and a signal reaches
        # one process only: the job resumes from its last periodic checkpoint.
        catch = self.processes == 1
        with _catch_sigterm(catch) as terminated, self.bar:
            try:
                self.run_steps(terminated)
            except KeyboardInterrupt:
                if catch and self.checkpoint is not None:
                    if self.state.step > self.saved:
                        self.save(self.state, self.monitor.snapshot())
                raise
            if self.checkpoint is not None and self.state.step > self.saved:
                self.save(self.state, self.monitor.snapshot())
        if terminated:
            # The default action, restored on leaving `_catch_sigterm`, ends the
            # process with the signal's status, as if the run had never caught it.
            signal.raise_signal(terminated[0])
        evaluations = self.evaluations
        if self.options.evaluation is not None and (
            not evaluations or evaluations[-1][0] != self.state.step
        ):
            self.evaluate()
        names = self.history[0] if self.history else {}
        state = self.state
        return TrainResult(
            state.model,
            state.ema,
            state.opt_state,
            state.step,
            state.key,
            losses=np.asarray(self.losses, dtype=np.float64),
            metrics={k: np.asarray([m[k] for m in self.history]) for k in names},
            skipped=self.skipped,
            evaluations=self.evaluations,
            mesh=self.problem.layout.mesh,
        )


# -------------------------------------------------------------------------- fit


def _refuse_moved_keywords(fit: Callable) -> Callable:
    """Name the option that replaced a keyword `fit` no longer takes."""

    @functools.wraps(fit)
    def checked(*args, **kwargs):
        moved = [name for name in kwargs if name in MOVED]
        if moved:
            lines = "; ".join(f"`{name}=` is now {MOVED[name]}" for name in moved)
            raise TypeError(f"`fit` groups its options: {lines}.")
        return fit(*args, **kwargs)

    return checked


@_refuse_moved_keywords
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
    ema: EMA | None = EMA(horizon=0.1),
    options: Options = Options(),
) -> TrainResult:
    """Train `model` with `method`.

    Each step draws `batch_size` data rows, lets `method.batch` draw noise and times,
    and takes one optimiser step on `method.loss`. The step is compiled once; step
    `i` uses the key `jax.random.fold_in(key, i)` and passes `step=i` to the loss
    (curricula), so a run resumed from a checkpoint reproduces the uninterrupted run
    exactly.

    **Sized for the run.** By default `fit` trains `method.for_run(steps)`: every
    curriculum of the method (a tangent warm-up, a decaying ratio, stages that
    double) is compressed to settle by half the run
    ([`fmcalc.Method.for_run`][]); `options=Options(schedules="paper")` keeps the
    papers' absolute step counts. The EMA's memory is a tenth of the run
    (`EMA(horizon=0.1)`), and without an `optimizer` the learning rate warms up
    and then decays along a cosine to 0 at the last step
    ([`fmcalc.train.default_optimizer`][]). So the defaults train at any run
    length, and `result.ema` is the network to sample.

    **Devices and processes.** The step runs on every device of the mesh (by
    default every device of every process; see [`fmcalc.train.Devices`][]): each
    device takes an equal share of the batch's rows; the parameters, EMA and
    optimiser state are replicated (or split along `shard_params`), and the
    gradient is summed across devices by the compiled program. The batch is the one
    a single device would draw, so a run on N devices equals the 1-device run up to
    the order of floating-point sums. In a job of several processes
    (`jax.distributed.initialize`), call `fit` the same way in every process: an
    array `data` (the same in every process) or a sampling function gives each
    device only its own rows of the global batch; an iterable gives each process
    its own rows. Progress bars and warnings come from process 0.

    **Failure behaviour.**

    - A step whose loss or gradient is non-finite, or whose update would make the
      parameters, EMA or optimiser state non-finite (or the parameters explode past
      the square root of their dtype's largest value), is skipped (the state stays
      as it was) with a warning; `Options(max_nonfinite=...)` such steps in a row
      raise [`fmcalc.train.NonFiniteError`][], which names the terms and batch rows
      at fault, or the arrays the update broke (then the optimiser is at fault).
    - `Options(divergence=...)` stops a run whose smoothed loss rises far above its
      minimum ([`fmcalc.train.DivergenceError`][]).
    - A checkpoint is written only for a state whose own loss was seen finite and
      not diverged, atomically, keeping the one it replaces as `path + ".prev"`.
      Before training, `fit` checks that the checkpoint path can be written and
      takes a lock on it, held until its last save: a second run on the same path
      is refused (a killed run's lock goes with its process). A write the file
      system refuses raises [`fmcalc.train.CheckpointError`][] and keeps the
      previous checkpoint.
    - On `KeyboardInterrupt` (SIGINT) the state is saved, then the exception goes
      on; on SIGTERM the state is saved and the process ends by the signal (when
      `fit` runs in the main thread and SIGTERM has its default action; a handler
      of your own is left alone). In a run of several processes, where a save is
      collective and a signal reaches one process, neither is caught: the job
      resumes from its last periodic checkpoint.

    **Arguments:**

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
    - `optimizer`: an optax transformation; `None` for
      [`fmcalc.train.default_optimizer`][]`(steps)`. Either way the gradient is
      first clipped to `Options(clip_norm=...)`.
    - `labels`: `(N,)` integer class labels of the rows of an array `data`, in
      `[0, num_classes)` or [`fmcalc.NULL_LABEL`][] for an unlabelled row, passed to
      the networks as `cond`; `None` for unconditional training.
    - `teacher`, `aux`: the teacher velocity and auxiliary network, passed on to
      `method.loss` (see [`fmcalc.Method.networks`][] for which a method reads).
    - `ema`: the parameters' average, the loss's `ema` network and `result.ema`,
      an [`fmcalc.train.EMA`][] (default: a tenth of the run); `None` keeps no
      average, and the loss gets the model under a stop-gradient instead. An
      [`fmcalc.EMAHorizonWarning`][] says when the method reads the EMA and its
      horizon exceeds a fifth of `steps`.
    - `options`: the rest of the run, an [`fmcalc.train.Options`][]: checkpoint,
      evaluation, devices, precision, divergence, gradient clipping, the progress
      bar and whether curricula follow the run.

    **Returns:** a [`fmcalc.train.TrainResult`][].
    """
    if not isinstance(method, Method):
        raise TypeError(f"`method` must be an fmcalc.Method; got {method!r}.")
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1; got {name}={value!r}.")
    if ema is not None and not isinstance(ema, EMA):
        raise TypeError(
            "`ema` must be an fmcalc.train.EMA (e.g. `EMA(horizon=0.1)` or "
            f"`EMA(decay=0.999)`) or None for no average; got {ema!r}."
        )
    if not isinstance(options, Options):
        raise TypeError(f"`options` must be an fmcalc.train.Options; got {options!r}.")
    devices, checkpoint = options.devices, options.checkpoint
    accumulate = devices.accumulate
    mesh = check_mesh(devices.mesh, batch_size, accumulate, devices.shard_params)
    processes = jax.process_count()
    if optimizer is None:
        optimizer = default_optimizer(steps)
    elif not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            "`optimizer` must be an optax.GradientTransformation such as "
            f"`optax.adam(1e-3)`; got {optimizer!r}."
        )
    if options.clip_norm is not None:
        optimizer = _clipped(optimizer, options.clip_norm)
    if options.schedules == "run" and steps >= 2:
        method = method.for_run(steps)
    ema_decay = None if ema is None else ema.decay_for(steps)
    stream = None
    if is_stream(data):
        if labels is not None:
            raise ValueError(
                "`labels` go with an array `data`; a stream of batches yields its "
                "labels with its rows, as pairs `(x0, labels)`."
            )
        stream = Stream(data, batch_size // processes)  # pyright: ignore[reportArgumentType]
    else:
        data, labels = check_data(data, labels, batch_size, method, model)
    check_batch(method, batch_size, accumulate)
    if options.precision is not None:
        method.check_dtype(options.precision.compute)
    broken = unsound(soundness_of(model, None, None), ("", "", ""))
    if broken:
        raise ValueError(
            "The initial `model` has non-finite or exploded parameters: "
            f"{broken[:5]} (of {len(broken)}). Initialise them finite."
        )
    if jax.process_index() == 0:
        _warn_ema_horizon(method, ema, steps)
    if checkpoint is not None:
        directory = _store.kind(checkpoint.path, processes) == "directory"
        if not directory:
            _store.check_writable(checkpoint.path)
        if stream is not None and processes > 1 and not directory:
            raise ValueError(
                f"The checkpoint {checkpoint.path!r} is a file, written by a run of "
                "one process; a run of several processes fed by streams keeps each "
                "process's position in a checkpoint directory. Pass a new path."
            )
    built = setup(
        method,
        model,
        # A stream's rows reach each step as arguments; the iterator itself is
        # not part of the compiled problem.
        None if stream is not None else data,
        labels,
        key=key,
        batch_size=batch_size,
        optimizer=optimizer,
        teacher=teacher,
        aux=aux,
        ema_decay=ema_decay,
        mesh=mesh,
        devices=devices,
        precision=options.precision,
    )
    problem, state = built.problem, built.state
    run = run_record(
        method,
        data,
        labels,
        batch_size,
        ema_decay,
        options.clip_norm,
        stream,
        processes,
    )
    divergence = options.divergence
    monitor = Monitor(0.0 if divergence is None else divergence.smoothing)
    # The path is held from before resuming until the last save: a second run
    # asking for it meanwhile is refused (`_store.locked`).
    with contextlib.ExitStack() as held:
        if checkpoint is not None and jax.process_index() == 0:
            held.enter_context(_store.locked(checkpoint.path))
        if checkpoint is not None and checkpoint.resume:
            state, saved_monitor, position = resume_from(
                checkpoint.path,
                state,
                run,
                run_defaults(method),
                checkpoint.resume,
                built.shardings,
                stream is not None,
            )
            state = built.placed(state)
            if position is not None:
                stream.seek(position)  # pyright: ignore[reportOptionalMemberAccess]
            if saved_monitor is not None and divergence is not None:
                monitor = Monitor(divergence.smoothing, **saved_monitor)
        return _Loop(problem, options, state, monitor, run, stream, steps)()
