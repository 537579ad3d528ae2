"""The options of [`fmcalc.train.fit`][], grouped by what they are about: the
parameters' average (`EMA`), saving and resuming (`Checkpoint`), evaluation hooks
(`Evaluation`), the devices (`Devices`), and the rest of the run (`Options`)."""

import os
from collections.abc import Callable, Mapping
from typing import Any, Literal

import equinox as eqx
from jax.sharding import Mesh

from .._convert import _as_float, _check_int, _check_positive
from .._precision import Precision
from ._guards import Divergence


class EMA(eqx.Module):
    """The exponential moving average of the parameters that `fit` keeps: the
    `ema` network of a method's loss, and `result.ema`.

    Give one of:

    - `horizon`: the average's memory as a fraction of the run: with `steps`
      steps, `decay = 1 - 1 / (horizon · steps)`, so the average covers about the
      last `horizon · steps` steps whatever the run's length (default `0.1`). A
      horizon of one step or less is no average: `decay = 0`.
    - `decay`: a fixed decay in `[0, 1]`, whatever the run's length (the papers'
      `0.999` or `0.9999`, sized for their 100k-step runs; in a run of a few
      thousand steps such an average still holds the initial weights at the end).

    Pass `ema=None` to `fit` to keep no average: the loss's `ema` network is then
    the online model under a stop-gradient.
    """

    decay: float | None = eqx.field(static=True, default=None, converter=_as_float)
    horizon: float | None = eqx.field(static=True, default=None, converter=_as_float)

    def __check_init__(self):
        if self.decay is not None and self.horizon is not None:
            raise ValueError(
                f"Give `EMA(decay=...)` or `EMA(horizon=...)`, not both; got "
                f"decay={self.decay!r}, horizon={self.horizon!r}."
            )
        if self.decay is not None and not (
            isinstance(self.decay, float) and 0 <= self.decay <= 1
        ):
            raise ValueError(
                f"`EMA(decay=...)` must lie in [0, 1]; got {self.decay!r}."
            )
        if self.horizon is not None:
            # A fraction of the run, e.g. 0.1.
            _check_positive("EMA", "horizon", self.horizon)

    def decay_for(self, steps: int) -> float:
        """The decay in a run of `steps` steps."""
        if self.decay is not None:
            return self.decay
        horizon = 0.1 if self.horizon is None else self.horizon
        return max(0.0, 1 - 1 / (horizon * steps))


class Checkpoint(eqx.Module):
    """Where and how often `fit` saves its state, and whether it resumes.

    **Arguments:**

    - `path`: a file to save the state to. Its header records the model's
      structure, the method, the batch size and the data
      ([`fmcalc.train.checkpoint_header`][]). A run of several processes writes a
      directory there instead, with orbax-checkpoint: each process writes the
      shards it holds and the header is written once. Either kind resumes in a run
      of any number of processes and devices, which then goes on writing that kind.
    - `every`: save every this many steps (and at the end); default 1000.
    - `resume`: `True` (default) to continue from `path` if it exists (it must
      have been written by the same run: same model structure, method, batch size,
      data and options, else a [`fmcalc.train.CheckpointError`][]); `False` to
      start afresh; `"weights-only"` to start a new run (fresh optimiser, step 0)
      from the checkpoint's model and EMA, e.g. to fine-tune with another method,
      unless the checkpoint was written by this same run, which then continues.
    - `keep`: how many saves to keep, the newest and those before it (default 2:
      a file keeps the one it replaced as `path + ".prev"`, then `".prev2"`, ...;
      a directory keeps its newest `keep` saves). A damaged newest save is
      skipped for the one before it.
    """

    path: str = eqx.field(static=True, converter=lambda p: os.fspath(p))
    every: int = eqx.field(static=True, default=1000)
    resume: bool | Literal["weights-only"] = eqx.field(static=True, default=True)
    keep: int = eqx.field(static=True, default=2)

    def __check_init__(self):
        if not isinstance(self.path, str) or not self.path:
            raise TypeError(
                f"`Checkpoint(path=...)` must be a file path; got {self.path!r}."
            )
        _check_int("Checkpoint", "every", self.every, 1)
        _check_int("Checkpoint", "keep", self.keep, 1)
        if self.resume not in (True, False, "weights-only"):
            raise ValueError(
                "`Checkpoint(resume=...)` must be True, False or 'weights-only'; got "
                f"{self.resume!r}."
            )


class Evaluation(eqx.Module):
    """A function that `fit` calls on the state during and after training.

    **Arguments:**

    - `fn`: a function of the [`fmcalc.train.TrainState`][] returning a dict of
      floats (e.g. a sample quality); its results are `result.evaluations`.
    - `every`: call it every this many steps, and at the end; `None` (default)
      for only at the end.
    """

    fn: Callable[[Any], Mapping[str, Any]] = eqx.field(static=True)
    every: int | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        if not callable(self.fn):
            raise TypeError(
                "`Evaluation(fn=...)` must be a function of the TrainState returning "
                f"a dict of floats; got {self.fn!r}."
            )
        if self.every is not None:
            _check_int("Evaluation", "every", self.every, 1)


class Devices(eqx.Module):
    """The devices a run trains on, and how its state and batch are laid out.

    **Arguments:**

    - `mesh`: a `jax.sharding.Mesh` of the devices to train on, e.g.
      `jax.sharding.Mesh(jax.devices()[:4], ("data",))`; the batch's rows are split
      over all its axes, so `batch_size / accumulate` must be a multiple of its
      size. `None` (default) for every device of every process, on one axis
      `"data"`.
    - `shard_params`: a mesh axis along which to split the parameters, the EMA and
      the optimiser's state (each array along its largest dimension that the axis
      divides; the others stay replicated), for a model whose state does not fit
      one device: the devices gather each weight when they use it. `None`
      (default) replicates them.
    - `accumulate`: split each step's batch into this many micro-batches, each
      with an equal share of every term's rows, and sum their gradients: the same
      update as one pass over the batch, with a micro-batch's activations in
      memory (default 1).
    """

    mesh: Mesh | None = eqx.field(static=True, default=None)
    shard_params: str | None = eqx.field(static=True, default=None)
    accumulate: int = eqx.field(static=True, default=1)

    def __check_init__(self):
        if self.mesh is not None and not isinstance(self.mesh, Mesh):
            raise TypeError(
                "`Devices(mesh=...)` must be a jax.sharding.Mesh or None; got "
                f"{self.mesh!r}."
            )
        if self.shard_params is not None and not isinstance(self.shard_params, str):
            raise TypeError(
                "`Devices(shard_params=...)` must be the name of a mesh axis or None; "
                f"got {self.shard_params!r}."
            )
        _check_int("Devices", "accumulate", self.accumulate, 1)


class Options(eqx.Module):
    """The options of a run besides its method, model, data, optimiser and EMA.

    **Arguments:**

    - `checkpoint`: a [`fmcalc.train.Checkpoint`][] (or just its path) to save to
      and resume from; `None` (default) saves nothing.
    - `evaluation`: an [`fmcalc.train.Evaluation`][] hook, or `None`.
    - `devices`: the [`fmcalc.train.Devices`][] to train on (default: every
      device).
    - `precision`: a [`fmcalc.train.Precision`][] policy to run the online and
      EMA networks in bfloat16 or float16 (optionally their JVPs in float32), or
      `None` (default) to compute in the parameters' dtype.
    - `divergence`: when to stop a run as diverged, a
      [`fmcalc.train.Divergence`][]; `None` turns the check off.
    - `clip_norm`: clip the gradient to this global norm before the optimiser
      (default 1.0); `None` for no clipping.
    - `max_nonfinite`: how many consecutive skipped (non-finite) steps stop the run
      (default 10).
    - `progress`: whether to show a progress bar with the loss and steps/s.
    - `schedules`: `"run"` (default) to size the method's curricula for the run
      with [`fmcalc.Method.for_run`][] (they settle by half the run); `"paper"` to
      keep their absolute step counts, as the papers' 100k-step runs had them.
    """

    checkpoint: Checkpoint | None = eqx.field(
        static=True,
        default=None,
        converter=lambda c: Checkpoint(c) if isinstance(c, str | os.PathLike) else c,
    )
    evaluation: Evaluation | None = eqx.field(static=True, default=None)
    devices: Devices = eqx.field(static=True, default=Devices())
    precision: Precision | None = eqx.field(static=True, default=None)
    divergence: Divergence | None = eqx.field(static=True, default=Divergence())
    clip_norm: float | None = eqx.field(static=True, default=1.0, converter=_as_float)
    max_nonfinite: int = eqx.field(static=True, default=10)
    progress: bool = eqx.field(static=True, default=True)
    schedules: Literal["run", "paper"] = eqx.field(static=True, default="run")

    def __check_init__(self):
        for name, kind, what in (
            ("checkpoint", Checkpoint, "fmcalc.train.Checkpoint(path, every=...)"),
            ("evaluation", Evaluation, "fmcalc.train.Evaluation(fn, every=...)"),
            ("precision", Precision, "fmcalc.train.Precision(...)"),
            ("divergence", Divergence, "fmcalc.train.Divergence(...)"),
        ):
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise TypeError(
                    f"`Options({name}=...)` must be {what} or None; got {value!r}."
                )
        if not isinstance(self.devices, Devices):
            raise TypeError(
                "`Options(devices=...)` must be fmcalc.train.Devices(mesh=..., "
                f"shard_params=..., accumulate=...); got {self.devices!r}."
            )
        if self.clip_norm is not None:
            _check_positive("Options", "clip_norm", self.clip_norm)
        _check_int("Options", "max_nonfinite", self.max_nonfinite, 1)
        if not isinstance(self.progress, bool):
            raise TypeError(
                f"`Options(progress=...)` must be True or False; got {self.progress!r}."
            )
        if self.schedules not in ("run", "paper"):
            raise ValueError(
                "`Options(schedules=...)` must be 'run' (curricula sized for the run) "
                f"or 'paper' (the papers' step counts); got {self.schedules!r}."
            )


# The keywords `fit` took before its options were grouped, and where each went.
MOVED = {
    "ema_decay": "ema=fmcalc.train.EMA(decay=...) (or EMA(horizon=...), a fraction "
    "of the run; ema=None for no average)",
    "clip_norm": "options=fmcalc.train.Options(clip_norm=...)",
    "checkpoint": "options=fmcalc.train.Options(checkpoint=fmcalc.train.Checkpoint("
    "path, every=..., resume=...))",
    "checkpoint_every": "options=fmcalc.train.Options(checkpoint=fmcalc.train."
    "Checkpoint(path, every=...))",
    "resume": "options=fmcalc.train.Options(checkpoint=fmcalc.train.Checkpoint("
    "path, resume=...))",
    "divergence": "options=fmcalc.train.Options(divergence=...)",
    "evaluate": "options=fmcalc.train.Options(evaluation=fmcalc.train.Evaluation("
    "fn, every=...))",
    "eval_every": "options=fmcalc.train.Options(evaluation=fmcalc.train.Evaluation("
    "fn, every=...))",
    "max_nonfinite": "options=fmcalc.train.Options(max_nonfinite=...)",
    "progress": "options=fmcalc.train.Options(progress=...)",
    "mesh": "options=fmcalc.train.Options(devices=fmcalc.train.Devices(mesh=...))",
    "shard_params": "options=fmcalc.train.Options(devices=fmcalc.train.Devices("
    "shard_params=...))",
    "accumulate": "options=fmcalc.train.Options(devices=fmcalc.train.Devices("
    "accumulate=...))",
    "precision": "options=fmcalc.train.Options(precision=...)",
}
