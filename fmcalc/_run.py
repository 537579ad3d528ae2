"""`fmcalc train` and `fmcalc sample`: from a data set to a trained flow map, and
from a trained run to samples and a picture.

A run is a folder:

- `run.json`: what was trained (method and its settings, data, network, budget),
  read by `sample`;
- `train.eqx` (and `train.eqx.prev`): the training state of `fmcalc.train.fit`,
  from which the same command resumes;
- `model.eqx`: the trained map (the EMA of the parameters), for sampling;
- `reference-train.eqx`, `reference.eqx`: the same for the flow-matching reference,
  trained first when the method distils a teacher (or with `--reference`).
"""

import dataclasses
import json
import math
import os
import pathlib
from collections.abc import Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import datasets, methods
from ._method import Method
from ._sampling import HeunMap, model_velocity, sample_batch
from .methods._registry import _variant
from .nn import MLP
from .train import (
    EMA,
    Checkpoint,
    Options,
    fit,
    load_checkpoint,
    load_model,
    save_checkpoint,
)


RUN_FILE = "run.json"
REFERENCE = "flow-matching"
# Euler steps of the flow-matching reference in pictures: close to its ODE's end.
REFERENCE_STEPS = 128


@dataclasses.dataclass(frozen=True)
class RunNetwork:
    """The network of a run, rebuilt by `sample` from `run.json`."""

    dim: int
    width: int
    depth: int
    num_classes: int | None
    skip: bool

    def build(self, seed: int) -> MLP:
        return MLP(
            self.dim,
            width=self.width,
            depth=self.depth,
            num_classes=self.num_classes,
            skip=self.skip,
            dtype=jnp.float32,
            key=jax.random.key(seed),
        )


def defaults(dataset: datasets.Dataset) -> tuple[int, int, float]:
    """`(width, depth, learning rate)`, chosen so that 2000 steps on a 2-core CPU
    already show the data: 4×256 and 3e-3 for points, 4×256 and 2e-3 for small
    images, 4×512 for larger ones (MNIST)."""
    if not dataset.is_image:
        return 256, 4, 3e-3
    return (256 if dataset.dim <= 256 else 512), 4, 2e-3


def _say(message: str) -> None:
    print(message, flush=True)


def _fit(
    method, model, dataset, *, steps, batch_size, lr, seed, schedules, checkpoint, **kw
):
    schedule = optax.cosine_decay_schedule(lr, steps, alpha=0.01)
    return fit(
        method,
        model,
        dataset.train_data,
        key=jax.random.key(seed + 1),
        steps=steps,
        batch_size=batch_size,
        optimizer=optax.adam(schedule),
        labels=None if dataset.labels is None else jnp.asarray(dataset.labels),
        # The average remembers a tenth of the run, so that a short run's average
        # has left the initial weights behind.
        ema=EMA(horizon=0.1),
        options=Options(checkpoint=Checkpoint(checkpoint), schedules=schedules),
        **kw,
    )


def _finished(run: pathlib.Path) -> dict:
    """The record of the finished run in the folder `run`."""
    record = _read_run(run)
    if record is None or not (run / "model.eqx").exists():
        raise FileNotFoundError(
            f"{run} is not a finished run of `fmcalc train` (it needs {RUN_FILE} and "
            "model.eqx); train one with `fmcalc train --method NAME --data DATA "
            "--out DIR`."
        )
    return record


def _in_units(record: dict, x) -> np.ndarray:
    """Samples of the network, shape `(n, dim)`, in the data's units and shape."""
    units = np.asarray(x) * record["scale"] + np.asarray(record["mean"], np.float32)
    return units.reshape(units.shape[0], *record["shape"])


def _read_run(out: pathlib.Path) -> dict | None:
    path = out / RUN_FILE
    return json.loads(path.read_text()) if path.exists() else None


def train(
    method_name: str,
    data: str,
    *,
    labels: str | None = None,
    steps: int = 5000,
    batch_size: int | None = None,
    out: str | os.PathLike | None = None,
    width: int | None = None,
    depth: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    reference: bool | None = None,
    schedules: Literal["run", "paper"] = "run",
    sets: Sequence[str] = (),
) -> pathlib.Path:
    """Train `method_name` on `data` into the run folder `out`; **returns** it.
    The method's curricula follow the run (`schedules="run"`, see
    [`fmcalc.Method.for_run`][]) or keep the paper's step counts (`"paper"`).
    `method_name` is a registry name or `NAME[KEY=VALUE,...]`, and `sets` sets
    more of its options (`["loss=squared"]`, see [`fmcalc.methods.parse`][]); the
    settings are recorded in `run.json`.

    Running the same command again resumes from `train.eqx` (after Ctrl-C or a
    crash); a finished run is left as it is."""
    method_name, sets, method = _variant(method_name, sets, cli=True)
    shown = method.name  # the registry name, or `name[key=value,...]`
    dataset = datasets.load(data, labels=labels)
    folder = "-".join([method_name, *sets])
    out = pathlib.Path(
        out if out is not None else f"runs/{folder}-{pathlib.Path(data).stem}"
    )
    default_width, default_depth, default_lr = defaults(dataset)
    lr = lr or default_lr
    # Points are cheap per row, and 2000 steps of 256 leave a checkerboard blurred.
    batch_size = batch_size or (256 if dataset.is_image else 1024)
    network = RunNetwork(
        dim=dataset.dim,
        width=width or default_width,
        depth=depth or default_depth,
        num_classes=dataset.num_classes,
        skip=dataset.dim > (width or default_width),
    )
    used = method.networks
    needs_teacher = bool(used & {"teacher", "aux"}) and dataset.flow is None
    if reference is None:
        reference = needs_teacher
    elif not reference and needs_teacher:
        raise ValueError(
            f"{shown} distils a teacher, and {data} has no exact flow: the "
            "flow-matching reference is its teacher, so it cannot be left out."
        )
    record = {
        "method": method_name,
        # The `KEY=VALUE` settings of the method's options (absent in runs made
        # before they could be set: none).
        "settings": sets,
        "data": os.fspath(data),
        "labels": None if labels is None else os.fspath(labels),
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "schedules": schedules,
        "network": dataclasses.asdict(network),
        "shape": list(dataset.shape),
        "mean": np.asarray(dataset.mean, np.float64).tolist(),
        "scale": dataset.scale,
        "sampling": method.sampling,
        "reference": bool(reference) and method_name != REFERENCE,
    }
    previous = _read_run(out)
    if previous is not None:
        # The learning-rate schedule and the EMA's horizon follow `steps`, so a
        # run resumes only under the same budget.
        same = ("method", "settings", "data", "labels", "steps", "batch_size")
        same += ("lr", "seed", "network", "schedules")
        previous.setdefault("settings", [])
        changed = [k for k in same if previous.get(k) != record[k]]
        if changed:
            raise ValueError(
                f"{out} holds a run of {_shown(previous)} on {previous['data']} "
                f"that differs in {changed}; choose another --out to start a new run."
            )
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_FILE).write_text(json.dumps(record, indent=1) + "\n")
    _say(
        f"fmcalc train: {shown} ({methods.info(method_name).full_name}) on "
        f"{dataset.description}; MLP {network.depth}×{network.width}, {steps} steps "
        f"of {batch_size} rows -> {out}/"
    )
    settings = dict(
        steps=steps, batch_size=batch_size, lr=lr, seed=seed, schedules=schedules
    )
    teacher = None if dataset.flow is None else dataset.flow.velocity
    if teacher is not None and method.noise_scale != 1 and "teacher" in used:
        raise ValueError(
            f"{shown} has noise_scale={method.noise_scale}, but the analytic teacher "
            f"of {data!r} is the velocity of unit noise; train with "
            "noise_scale=1."
        )
    if record["reference"]:
        _say(f"[1/2] the flow-matching reference{' (the teacher)' * needs_teacher}")
        ref = _fit(
            # Trained on the method's path, so that it can be its teacher.
            methods.get(REFERENCE).replace(noise_scale=method.noise_scale),
            network.build(seed),
            dataset,
            checkpoint=out / "reference-train.eqx",
            **settings,
        )
        save_checkpoint(out / "reference.eqx", ref.ema, record=record)
        if needs_teacher:
            teacher = model_velocity(ref.ema)
        _say(f"[2/2] {shown}")
    aux = None
    if "aux" in used:
        # CTM's teacher solver covers a tenth of s - t, PFMM's partial map half.
        assert teacher is not None
        aux = HeunMap(teacher, 2 if method_name == "ctm" else 4)
    result = _fit(
        method,
        network.build(seed),
        dataset,
        checkpoint=out / "train.eqx",
        teacher=teacher if "teacher" in used else None,
        aux=aux,
        **settings,
    )
    save_checkpoint(out / "model.eqx", result.ema, record=record)
    losses = np.asarray(result.losses)
    finite = losses[np.isfinite(losses)]
    last = f"{float(np.mean(finite[-100:])):.4g}" if finite.size else "n/a"
    written = [
        ("trained map (EMA of the parameters)", out / "model.eqx"),
        ("training state (run the same command to resume)", out / "train.eqx"),
        ("what was trained", out / RUN_FILE),
    ]
    if record["reference"]:
        written.append(("flow-matching reference", out / "reference.eqx"))
    _say(
        f"done: step {result.step}, loss (last 100 steps) {last}, {result.skipped} "
        "skipped steps\n"
        + "".join(f"  {what}: {path}\n" for what, path in written)
        + f"next: fmcalc sample --run {out} --steps 1 2 4 --plot "
        f"{out / 'samples.png'}"
    )
    return out


def _shown(record: dict) -> str:
    """The method of a run's record as `parse` names it: `meanflow[loss=squared]`."""
    sets = record.get("settings") or []
    return record["method"] + (f"[{','.join(sets)}]" if sets else "")


def sample_run(
    run: str | os.PathLike,
    *,
    steps: Sequence[int] = (1, 2, 4),
    n: int | None = None,
    out: str | os.PathLike | None = None,
    plot: str | os.PathLike | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Samples of a trained run at each number of `steps` (and of its flow-matching
    reference, when it has one), saved to `out` (`.npy`, shape
    `(len(steps), n, *shape)` in the data's units) and drawn into `plot`."""
    run = pathlib.Path(run)
    record = _finished(run)
    network = RunNetwork(**record["network"])
    shape = tuple(record["shape"])
    is_image = len(shape) in (2, 3)
    n = n if n is not None else (100 if is_image else 2000)
    if any(k < 1 for k in steps):
        raise ValueError(f"--steps must be positive integers; got {list(steps)}.")
    model = load_checkpoint(run / "model.eqx", network.build(record["seed"]))
    k_noise, k_renoise = jax.random.split(jax.random.key(seed))
    scale = _variant(record["method"], record.get("settings", []))[2].noise_scale
    noise = scale * jax.random.normal(k_noise, (n, network.dim), jnp.float32)
    cond = None
    if network.num_classes is not None:
        cond = jnp.arange(n, dtype=jnp.int32) % network.num_classes
    kind = record["sampling"]
    shown = _shown(record)

    panels: dict[str, np.ndarray] = {}
    for k in steps:
        if kind == "from-noise" and k > 1:
            _say(
                f"{shown} learns maps from noise only (s = 1), so it "
                f"samples in one jump; {k} steps skipped."
            )
            continue
        label = f"{shown}, {k} step{'s' * (k > 1)}"
        if kind == "velocity":
            label = f"{shown}, {k} Euler step{'s' * (k > 1)}"
        drawn = sample_batch(
            model, noise, steps=k, kind=kind, key=k_renoise, cond=cond,
            noise_scale=scale,
        )  # fmt: skip
        panels[label] = _in_units(record, drawn)
    if not panels:
        raise ValueError(f"No sample could be drawn with --steps {list(steps)}.")
    if record.get("reference") and (run / "reference.eqx").exists():
        ref = load_checkpoint(run / "reference.eqx", network.build(record["seed"]))
        drawn = sample_batch(
            ref, noise, steps=REFERENCE_STEPS, kind="velocity", cond=cond
        )
        label = f"flow matching, {REFERENCE_STEPS} Euler steps (reference)"
        panels[label] = _in_units(record, drawn)
    out = pathlib.Path(out) if out is not None else run / "samples.npy"
    own = [v for label, v in panels.items() if "(reference)" not in label]
    np.save(out, np.stack(own))
    _say(f"samples: {out} (shape {np.stack(own).shape}; {', '.join(panels)})")
    if plot is not None:
        data = datasets.load(
            record["data"], labels=record["labels"]
        )  # the training data, beside the samples
        draw(panels, data, pathlib.Path(plot), title=shown)
        _say(f"picture: {plot}")
    return panels


class Run(NamedTuple):
    """A run of `fmcalc train`, loaded by [`fmcalc.load_run`][].

    **Attributes:**

    - `model`: the online network at the last save (from `train.eqx`), or `None`
      when the run kept no training state.
    - `ema`: the trained map that `fmcalc sample` draws from, the EMA of the
      parameters (from `model.eqx`).
    - `method`: the [`fmcalc.Method`][], with the settings the run was given.
    - `settings`: everything `run.json` records (data, network, budget, seed,
      the data's mean and scale, ...).

    `run.to_data_units(x)` maps samples of shape `(n, dim)` back to the data's
    units and shape: the network works on standardised, flattened data.
    """

    model: MLP | None
    ema: MLP
    method: Method
    settings: dict

    def to_data_units(self, x) -> np.ndarray:
        return _in_units(self.settings, x)


def load_run(path: str | os.PathLike) -> Run:
    """The networks, method and settings of a run of `fmcalc train`.

    **Arguments:**

    - `path`: the run's folder (`fmcalc train --out DIR`).

    **Returns:** a [`fmcalc.Run`][]. Sample the map in Python with, e.g.,
    `run.to_data_units(fmcalc.sample_batch(run.ema, noise, steps=1))`, the noise
    of shape `(n, run.settings["network"]["dim"])`.

    **Raises:** `FileNotFoundError` for a folder that holds no finished run.

    !!! Example

        ```bash
        fmcalc train --method lsd --data moons --steps 2000 --out runs/lsd
        ```

        ```python
        run = fmcalc.load_run("runs/lsd")
        print(run.method.name, run.settings["steps"])
        ```
    """
    folder = pathlib.Path(path)
    record = _finished(folder)
    network = RunNetwork(**record["network"])
    like = network.build(record["seed"])
    ema = load_checkpoint(folder / "model.eqx", like)
    state = folder / "train.eqx"
    model = load_model(state, like, ema=False) if state.exists() else None
    method = _variant(record["method"], record.get("settings", []))[2]
    return Run(model, ema, method, record)


def _grid(images: np.ndarray) -> np.ndarray:
    n = images.shape[0]
    cols = 10 if n >= 10 else n
    rows = math.ceil(n / cols)
    h, w = images.shape[1:3]
    extra = images.shape[3:]
    canvas = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1, *extra), np.nan)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        canvas[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = image
    return canvas


def draw(
    panels: dict[str, np.ndarray],
    data: datasets.Dataset,
    path: pathlib.Path,
    *,
    title: str,
) -> None:
    """One panel per set of samples, beside the training data: a scatter of the
    first two coordinates for points, a grid for images."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(
            '--plot needs matplotlib; install it with `pip install "fmcalc[plot]"`.'
        ) from None
    first = next(iter(panels.values()))
    n = first.shape[0]
    if data.rows is not None:
        order = np.random.default_rng(0).permutation(data.rows.shape[0])
        if data.labels is not None and data.num_classes == 10 and n % 10 == 0:
            # Arranged so that the grid's columns hold one class each, as the
            # samples' do (sample i has label i % 10).
            by_class = [order[data.labels[order] == c][: n // 10] for c in range(10)]
            if all(len(b) == n // 10 for b in by_class):
                order = np.stack(by_class, axis=1).ravel()
        order = order[:n]
        real = data.to_data_units(data.rows[order])
    else:
        real = data.to_data_units(data.sample(jax.random.key(1), n))  # pyright: ignore
    everything = {"training data": real, **panels}
    fig, axes = plt.subplots(
        1, len(everything), figsize=(3.2 * len(everything), 3.4), squeeze=False
    )
    lo, hi = np.percentile(real.reshape(real.shape[0], -1), [0.5, 99.5], axis=0)
    pad = 0.15 * (hi - lo)
    for ax, (label, x) in zip(axes[0], everything.items(), strict=True):
        if data.is_image:
            ax.imshow(_grid(np.clip(x, real.min(), real.max())), cmap="gray")
            ax.set_axis_off()
        else:
            flat = x.reshape(x.shape[0], -1)
            ax.scatter(flat[:, 0], flat[:, 1], s=2, alpha=0.5, linewidths=0)
            ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
            ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
        ax.set_title(label, fontsize=9)
    fig.suptitle(f"{title} on {data.name}", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
