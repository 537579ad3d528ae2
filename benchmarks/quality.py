"""Sample quality of every flow-map method against flow matching.

```
python benchmarks/quality.py [--quick] [--datasets ...] [--methods ...] [--seeds N]
                             [--first-seed K] [--steps N] [--out DIR]
```

Every method of `fmcalc.methods.names()` (plus MeanFlow without its adaptive
weight, `meanflow-mse`) trains the same network for the same number of steps on each
data set with `fmcalc.train.fit`, and is sampled with 1, 2 and 4 jumps of its flow
map. The baseline is flow matching sampled with Euler at 1, 2, 4 and 128 steps. A
guard row per method samples its own diagonal `V(x, t, t)` with 128 Euler steps.

- Analytic sets (exact flow map known): paired RMSE and median paired error
  between the sample from noise row `i` and the exact end point `F*(eps_i, 1, 0)`,
  the share of rows in the right mixture component, the energy distance to fresh
  data, and the flow-map error `E‖F_θ(x_s, s, t) - F*(x_s, s, t)‖²`.
- 2-d toy sets: the unbiased energy distance to fresh data.
- Images (class-conditional): the Fréchet distance on the features of a small
  classifier trained (and cached) here, and that classifier's accuracy on the
  labels the samples were conditioned on.

Writes `quality.md`, `quality.json`, one PNG grid of samples per 2-d or image data
set, and `samples/<dataset>/` (noise, samples of every row in the same row order,
data, the exact end points and `mixture.json` where known) into `--out`.

The full run is long on a small CPU; it can be run in chunks (data sets, methods,
`--first-seed`) whose `quality.json` files `benchmarks/merge_quality.py` joins into
one report.
"""

import argparse
import dataclasses
import datetime
import json
import pathlib
import sys
import time
import traceback
from collections.abc import Callable

import _quality_data as datasets
import _quality_metrics as metrics
import _quality_report as reporting
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _machine import machine
from _quality_report import BASELINE, GUARD_STEPS, NFE

import fmcalc
import fmcalc.nn
from fmcalc._run import HeunMap, networks_used, sampling_kind


ROOT = pathlib.Path(__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class Settings:
    """Network and budget of one data set (identical for every method)."""

    width: int
    depth: int
    steps: int
    batch_size: int
    n_eval: int
    lr: float = 1e-3
    n_map: int = 512
    # The gated input skip of `fmcalc.nn.MLP`: needed where `width < dim` (MNIST's
    # 784 pixels through 512 units), or the network cannot return the noise.
    skip: bool = False

    @property
    def ema_decay(self) -> float:
        # 0.999 over a full run; shorter runs need a shorter memory, or the average
        # still holds the initial weights when training stops.
        return min(0.999, 1 - 10 / self.steps)


FULL = {
    "ring": Settings(256, 4, 20_000, 256, 2000),
    "aniso2d": Settings(256, 4, 20_000, 256, 2000),
    "mixture16": Settings(256, 4, 20_000, 256, 2000),
    "gaussian8": Settings(256, 4, 10_000, 256, 2000),
    "checkerboard": Settings(256, 4, 20_000, 256, 2000),
    "moons": Settings(256, 4, 20_000, 256, 2000),
    "digits": Settings(512, 4, 20_000, 256, 1000),
    "mnist": Settings(512, 4, 20_000, 128, 1000, skip=True),
}
FULL_SEEDS = 2
# The quick run: every method on the ring, and the image pipeline (classifier,
# class-conditional sampling, a flow-matching teacher) on digits for a few of them.
QUICK = {
    "ring": Settings(128, 3, 1000, 256, 1000, n_map=256),
    "digits": Settings(256, 3, 1000, 256, 500),
}
QUICK_METHODS = {
    "digits": ("flow-matching", "meanflow", "splitmeanflow", "ctm", "ect"),
}

# Substeps of the Heun solve that stands in for a pre-trained partial flow map
# (`aux`): CTM's jump covers a tenth of `s - t`, PFMM's half of it.
AUX_SUBSTEPS = {"ctm": 2, "pfmm": 4}

FULL_RUN_ESTIMATE = (
    "The full run (defaults: every data set, every method, 2 seeds, the settings "
    "below) takes about 20-30 hours on the shared 2-core CPU this benchmark was "
    "developed on (every method on the ring, one seed: 41 min; most of the time "
    "goes to the image models). It can run in chunks (`--datasets`, `--methods`, "
    "`--first-seed`) joined by `benchmarks/merge_quality.py`, whose report lists the "
    "runs still missing with their expected times."
)


# ------------------------------------------------------------------- methods


def method_rows(selected: list[str] | None) -> list[tuple[str, fmcalc.Method]]:
    """`(row name, method)` for every registered method, with `meanflow-mse` after
    `meanflow`; flow matching first (it is the baseline and the teacher)."""
    rows = []
    for name in fmcalc.methods.names():
        rows.append((name, fmcalc.methods.get(name)))
        if name == "meanflow":
            plain = fmcalc.methods.get("meanflow", loss=fmcalc.SquaredError())
            rows.append(("meanflow-mse", plain))
    return select(rows, selected)


def select(
    rows: list[tuple[str, fmcalc.Method]], selected: list[str] | None
) -> list[tuple[str, fmcalc.Method]]:
    """The `selected` rows (all if `None`) and the baseline, the baseline first."""
    known = [name for name, _ in rows]
    if BASELINE not in known:
        raise ValueError(f"rows must include the {BASELINE!r} baseline.")
    if selected:
        unknown = sorted(set(selected) - set(known))
        if unknown:
            raise SystemExit(f"Unknown method(s) {unknown}; choose from {known}.")
        rows = [(n, m) for n, m in rows if n in selected or n == BASELINE]
    return sorted(rows, key=lambda row: row[0] != BASELINE)


# ---------------------------------------------------------------- samplers


@eqx.filter_jit
def _jumps(model, noise, cond, steps):
    return jax.vmap(lambda e, c: fmcalc.sample(model, e, steps=steps, cond=c))(
        noise, cond
    )


@eqx.filter_jit
def _euler(model, noise, cond, steps):
    velocity = fmcalc.model_velocity(model)
    return jax.vmap(lambda e, c: fmcalc.sample_euler(velocity, e, steps=steps, cond=c))(
        noise, cond
    )


@eqx.filter_jit
def _consistency(model, noise, cond, keys, steps):
    grid = jnp.linspace(1.0, 0.0, steps + 1, dtype=noise.dtype)
    return jax.vmap(
        lambda e, c, k: fmcalc.sample_consistency(model, e, key=k, grid=grid, cond=c)
    )(noise, cond, keys)


@eqx.filter_jit
def _model_map(model, x, s, t, cond):
    def one(x, s, t, c):
        v = model(x, s, t) if c is None else model(x, s, t, cond=c)
        return fmcalc.flow_map_from_average_velocity(x, s, t, v)

    return jax.vmap(one)(x, s, t, cond)


def _chunked(fn, n: int, *arrays, chunk: int = 1000):
    """`fn` on row chunks of `arrays` (a `None` array stays `None`)."""
    out = []
    for start in range(0, n, chunk):
        parts = [None if a is None else a[start : start + chunk] for a in arrays]
        out.append(np.asarray(fn(*parts)))
    return np.concatenate(out)


def draw_samples(kind, model, noise, cond, key) -> dict[str, np.ndarray | None]:
    """The samples of one trained model, keyed `nfe<k>` and `diag128`."""
    n = noise.shape[0]
    out: dict[str, np.ndarray | None] = {}
    if kind == "velocity":
        for k in (*NFE, GUARD_STEPS):
            out[f"nfe{k}"] = _chunked(
                lambda e, c, k=k: _euler(model, e, c, k), n, noise, cond
            )
        return out
    for k in NFE:
        if k == 1:
            fn = lambda e, c: _jumps(model, e, c, 1)
            out["nfe1"] = _chunked(fn, n, noise, cond)
        elif kind == "two-time":
            fn = lambda e, c, k=k: _jumps(model, e, c, k)
            out[f"nfe{k}"] = _chunked(fn, n, noise, cond)
        elif kind == "to-data":
            keys = jax.random.split(jax.random.fold_in(key, k), n)
            fn = lambda e, c, r, k=k: _consistency(model, e, c, r, k)
            out[f"nfe{k}"] = _chunked(fn, n, noise, cond, keys)
        else:
            out[f"nfe{k}"] = None
    fn = lambda e, c: _euler(model, e, c, GUARD_STEPS)
    out[f"diag{GUARD_STEPS}"] = _chunked(fn, n, noise, cond)
    return out


# ------------------------------------------------------------ evaluation data


@dataclasses.dataclass
class Evaluation:
    """Everything a data set's metrics need, fixed across methods and seeds."""

    noise: np.ndarray
    cond: np.ndarray | None
    data: np.ndarray
    exact: np.ndarray | None = None
    maps: dict | None = None
    mixture: dict | None = None
    classifier: metrics.Classifier | None = None
    data_features: np.ndarray | None = None
    floors: dict = dataclasses.field(default_factory=dict)


def _map_points(dataset, kind: str, n: int, key) -> dict[str, np.ndarray]:
    """Points `(x_s, s, t)` on a kind's domain: `x_s` interpolates data and noise,
    `(s, t)` is uniform on the triangle `s > t` (`t = 0` for to-data maps, `s = 1`
    for from-noise maps)."""
    k_data, k_noise, k_time = jax.random.split(key, 3)
    x0 = np.asarray(dataset.sample(k_data, n), np.float64)
    eps = np.asarray(jax.random.normal(k_noise, (n, dataset.dim)), np.float64)
    a, b = np.asarray(jax.random.uniform(k_time, (2, n)), np.float64)
    if kind == "to-data":
        s, t = a, np.zeros(n)
    elif kind == "from-noise":
        s, t = np.ones(n), a
    else:
        s, t = np.maximum(a, b), np.minimum(a, b)
    x = (1 - s)[:, None] * x0 + s[:, None] * eps
    return {"x": x, "s": s, "t": t}


def prepare(dataset, settings: Settings, cache: pathlib.Path) -> Evaluation:
    key = jax.random.key(20_250_101)
    k_noise, k_data, k_map = jax.random.split(key, 3)
    n = settings.n_eval
    noise = np.asarray(jax.random.normal(k_noise, (n, dataset.dim), jnp.float32))
    if dataset.kind == "images":
        cond = np.arange(n, dtype=np.int32) % dataset.num_classes
        classifier, accuracy = metrics.cached_classifier(
            dataset.name,
            dataset.train,
            dataset.train_labels,
            dataset.num_classes,
            cache,
        )
        data_features = metrics.features(classifier, dataset.train)
        # The floor: n real images (n as for the samples, at most half the set)
        # against the disjoint rest.
        order = np.random.default_rng(0).permutation(dataset.train.shape[0])
        a, b = np.split(order, [min(n, dataset.train.shape[0] // 2)])
        floors = {
            "classifier_test_accuracy": accuracy,
            "fd_real": metrics.frechet_distance(data_features[a], data_features[b]),
            "fd_real_sizes": [int(len(a)), int(len(b))],
        }
        return Evaluation(
            noise=noise,
            cond=cond,
            data=dataset.train,
            classifier=classifier,
            data_features=data_features,
            floors=floors,
        )
    data = np.asarray(dataset.sample(k_data, n))
    other = np.asarray(dataset.sample(jax.random.fold_in(k_data, 1), n))
    floors = {"energy_fresh_vs_fresh": metrics.energy_distance(data, other)}
    evaluation = Evaluation(noise=noise, cond=None, data=data, floors=floors)
    if dataset.kind == "analytic":
        maps = {
            kind: _map_points(dataset, kind, settings.n_map, k_map)
            for kind in ("two-time", "to-data", "from-noise")
        }
        # The exact references, in float64 (a tight Dopri8 solve for mixtures).
        with jax.enable_x64(True):
            flow = dataset.reference()
            solve = jax.jit(jax.vmap(flow.flow_map))
            f64 = lambda a: jnp.asarray(a, jnp.float64)
            ones, zeros = np.ones(n), np.zeros(n)
            evaluation.exact = np.asarray(solve(f64(noise), f64(ones), f64(zeros)))
            for points in maps.values():
                exact = solve(f64(points["x"]), f64(points["s"]), f64(points["t"]))
                points["exact"] = np.asarray(exact)
        evaluation.maps = maps
        evaluation.mixture = dataset.mixture
    return evaluation


def score(dataset, ev: Evaluation, samples: np.ndarray) -> dict[str, float]:
    """The metrics of one set of samples (rows paired with `ev.noise`)."""
    if not np.all(np.isfinite(samples)):
        return {"nonfinite": float(np.mean(~np.all(np.isfinite(samples), axis=1)))}
    out = {}
    if dataset.kind == "images":
        assert ev.classifier is not None and ev.data_features is not None
        feats = metrics.features(ev.classifier, samples)
        out["fd"] = metrics.frechet_distance(feats, ev.data_features)
        predicted = metrics.predict(ev.classifier, samples)
        out["accuracy"] = float(np.mean(predicted == ev.cond))
        return out
    out["energy"] = metrics.energy_distance(samples, ev.data)
    if ev.exact is not None and ev.mixture is not None:
        out["rmse"] = metrics.paired_rmse(samples, ev.exact)
        out["median"] = metrics.median_paired_error(samples, ev.exact)
        if len(ev.mixture["weights"]) > 1:
            out["component"] = metrics.right_component_share(
                samples, ev.exact, ev.mixture
            )
    return out


def map_error(model, kind: str, ev: Evaluation) -> tuple[float, np.ndarray] | None:
    """`mean ‖F_θ(x_s, s, t) - F*(x_s, s, t)‖²` on the kind's domain."""
    if ev.maps is None or kind == "velocity":
        return None
    points = ev.maps[kind]
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    predicted = np.asarray(
        _model_map(model, f32(points["x"]), f32(points["s"]), f32(points["t"]), None)
    )
    error = np.sum((predicted.astype(np.float64) - points["exact"]) ** 2, axis=1)
    return float(np.mean(error)), predicted


# -------------------------------------------------------------------- training


def train(method, model, dataset, settings: Settings, *, key, teacher, aux):
    """One training run with `fmcalc.train.fit`; **returns** `(result, seconds)`."""
    used = networks_used(method)
    schedule = optax.cosine_decay_schedule(settings.lr, settings.steps, alpha=0.01)
    if dataset.kind == "images":
        data, labels = jnp.asarray(dataset.train), jnp.asarray(dataset.train_labels)
    else:
        data, labels = dataset.sample, None
    start = time.perf_counter()
    result = fmcalc.train.fit(
        method,
        model,
        data,
        key=key,
        steps=settings.steps,
        batch_size=settings.batch_size,
        optimizer=optax.adam(schedule),
        labels=labels,
        teacher=teacher if "teacher" in used else None,
        aux=aux if "aux" in used else None,
        ema_decay=settings.ema_decay,
        progress=False,
    )
    jax.block_until_ready(eqx.filter(result.ema, eqx.is_array))
    return result, time.perf_counter() - start


def _aux_map(dataset, row: str, teacher):
    if isinstance(dataset.flow, fmcalc.flows.Gaussian):
        return dataset.flow
    return HeunMap(teacher, AUX_SUBSTEPS.get(row, 4))


def run_dataset(
    name,
    settings,
    rows,
    seeds,
    out: pathlib.Path,
    log,
    first_seed: int = 0,
    progress: Callable[[dict], None] | None = None,
):
    """Train and score every row on one data set; `progress` receives the data
    set's report so far after each row."""
    dataset = datasets.DATASETS[name]()
    samples_dir = out / "samples" / name
    samples_dir.mkdir(parents=True, exist_ok=True)
    log(f"[{name}] preparing evaluation ({settings.n_eval} rows)")
    start = time.perf_counter()
    ev = prepare(dataset, settings, out / "samples" / "_cache")
    _save_evaluation(dataset, ev, samples_dir)
    prepare_s = time.perf_counter() - start
    results: dict[str, dict] = {}

    def summary() -> dict:
        reporting.aggregate(results)
        return {
            "description": dataset.description,
            "kind": dataset.kind,
            "dim": dataset.dim,
            "settings": dataclasses.asdict(settings)
            | {"ema_decay": settings.ema_decay},
            "floors": ev.floors,
            "prepare_s": prepare_s,
            "rows": results,
        }

    for seed in range(first_seed, first_seed + seeds):
        init_key = jax.random.key(1000 + seed)
        train_key = jax.random.key(2000 + seed)
        net = fmcalc.nn.MLP(
            dataset.dim,
            width=settings.width,
            depth=settings.depth,
            num_classes=dataset.num_classes,
            skip=settings.skip,
            dtype=jnp.float32,
            key=init_key,
        )
        teacher = None if dataset.flow is None else dataset.flow.velocity
        for row, method in rows:
            kind = sampling_kind(method)
            entry = results.setdefault(
                row,
                {"kind": kind, "uses": sorted(networks_used(method)), "seeds": []},
            )
            if "teacher" in entry["uses"]:
                entry["teacher"] = (
                    "flow-matching network (diagonal)"
                    if dataset.flow is None
                    else "exact velocity"
                )
            try:
                aux = _aux_map(dataset, row, teacher)
                result, train_s = train(
                    method,
                    net,
                    dataset,
                    settings,
                    key=train_key,
                    teacher=teacher,
                    aux=aux,
                )
                model = result.ema
                if row == BASELINE and dataset.flow is None:
                    teacher = fmcalc.model_velocity(model)
                start = time.perf_counter()
                drawn = draw_samples(
                    kind, model, ev.noise, ev.cond, jax.random.key(7 + seed)
                )
                record = {
                    "seed": seed,
                    "train_s": train_s,
                    "skipped": int(result.skipped),
                }
                losses = np.asarray(result.losses)
                record["final_loss"] = float(np.nanmean(losses[-100:]))
                for column, samples in drawn.items():
                    if samples is None:
                        continue
                    for metric, value in score(dataset, ev, samples).items():
                        record[f"{metric}@{column}"] = value
                mapped = map_error(model, kind, ev)
                if mapped is not None:
                    record["map_error"] = mapped[0]
                record["eval_s"] = time.perf_counter() - start
                if seed == first_seed:
                    _save_samples(samples_dir, row, drawn, mapped)
                log(f"[{name}] seed {seed} {row}: {_summary(record)}")
            except Exception as error:  # noqa: BLE001 - reported in the table
                message = f"{type(error).__name__}: {error}".splitlines()[0][:200]
                record = {"seed": seed, "error": message}
                log(f"[{name}] seed {seed} {row}: FAILED {message}")
                log(traceback.format_exc())
            entry["seeds"].append(record)
            if progress is not None:
                progress(summary())
    return summary()


def _summary(record: dict) -> str:
    keys = ("rmse@nfe1", "rmse@nfe2", "energy@nfe1", "fd@nfe1", "accuracy@nfe1")
    parts = [f"{k}={record[k]:.4g}" for k in keys if k in record]
    return f"train {record['train_s']:.1f}s " + " ".join(parts)


# ---------------------------------------------------------------------- output


def _save_evaluation(dataset, ev: Evaluation, folder: pathlib.Path) -> None:
    np.save(folder / "noise.npy", ev.noise)
    np.save(folder / "data.npy", np.asarray(ev.data, np.float32))
    if ev.cond is not None:
        np.save(folder / "labels.npy", ev.cond)
        np.save(folder / "data_labels.npy", dataset.train_labels)
    if ev.exact is not None and ev.maps is not None:
        np.save(folder / "exact.npy", ev.exact)
        for kind, points in ev.maps.items():
            np.savez(folder / f"map-points-{kind}.npz", **points)
    if dataset.mixture is not None:
        (folder / "mixture.json").write_text(json.dumps(dataset.mixture))


def _save_samples(folder: pathlib.Path, row: str, drawn: dict, mapped) -> None:
    for column, samples in drawn.items():
        if samples is not None:
            np.save(folder / f"{row}-{column}.npy", samples.astype(np.float32))
    if mapped is not None:
        np.save(folder / f"{row}-map.npy", mapped[1])


def _write_atomically(path: pathlib.Path, text: str) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    temporary.replace(path)


def parse(argv=None):
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="every method on the ring and five on digits, small networks, "
        f"{QUICK['ring'].steps} steps, 1 seed (about 5 minutes on 2 CPU cores)",
    )
    parser.add_argument("--datasets", nargs="+", choices=list(datasets.DATASETS))
    parser.add_argument(
        "--methods",
        nargs="+",
        help="rows to run (default: all); flow-matching always runs, as the baseline "
        "and the teacher",
    )
    parser.add_argument(
        "--seeds", type=int, help=f"training seeds (full: {FULL_SEEDS})"
    )
    parser.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="index of the first training seed (seeds first..first+N-1), so that "
        "a run can be split into chunks and merged with benchmarks/merge_quality.py",
    )
    parser.add_argument("--steps", type=int, help="training steps on every data set")
    parser.add_argument("--lr", type=float, help="learning rate on every data set")
    parser.add_argument("--eval-rows", type=int, help="evaluation rows per data set")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "results")
    return parser.parse_args(argv)


def main(
    argv=None,
    *,
    rows: list[tuple[str, fmcalc.Method]] | None = None,
    program: str = "benchmarks/quality.py",
) -> dict:
    """Run the benchmark; `rows` replaces the registered methods (flow matching
    must be among them: it is the baseline), `program` names the script in the
    report's command line."""
    args = parse(argv)
    started = time.perf_counter()
    names = args.datasets or list(QUICK if args.quick else FULL)
    seeds = args.seeds or (1 if args.quick else FULL_SEEDS)
    if rows is None:
        all_rows = method_rows(args.methods)
    else:
        all_rows = select(rows, args.methods)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "samples" / "quality.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_file = log_path.open("w")

    def log(message: str) -> None:
        stamp = datetime.datetime.now().strftime("%H:%M:%S")
        print(f"{stamp} {message}", flush=True)
        log_file.write(f"{stamp} {message}\n")
        log_file.flush()

    report = {
        "quick": args.quick,
        "command": f"python {program} "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "seeds": seeds,
        "first_seed": args.first_seed,
        "machine": machine(),
        "protocol": {
            "nfe": NFE,
            "guard_steps": GUARD_STEPS,
            "baseline": BASELINE,
            "aux_substeps": AUX_SUBSTEPS,
            "full": {k: dataclasses.asdict(v) for k, v in FULL.items()},
            "full_seeds": FULL_SEEDS,
            "quick": {k: dataclasses.asdict(v) for k, v in QUICK.items()},
            "quick_methods": QUICK_METHODS,
            "full_run_estimate": FULL_RUN_ESTIMATE,
        },
        "datasets": {},
    }
    for name in names:
        settings = QUICK.get(name, QUICK["ring"]) if args.quick else FULL[name]
        if args.steps:
            settings = dataclasses.replace(settings, steps=args.steps)
        if args.lr:
            settings = dataclasses.replace(settings, lr=args.lr)
        if args.eval_rows:
            settings = dataclasses.replace(
                settings,
                n_eval=args.eval_rows,
                n_map=min(settings.n_map, args.eval_rows),
            )
        selected = all_rows
        if args.quick and name in QUICK_METHODS:
            keep = QUICK_METHODS[name]
            selected = [(n, m) for n, m in all_rows if n in keep]

        def progress(ds: dict, name=name) -> None:
            # A partial report after every row, in the format of the final one,
            # so that an interrupted run keeps what it finished.
            partial = report | {"datasets": report["datasets"] | {name: ds}}
            partial["acceptance"] = reporting.acceptance(partial)
            partial["runtime_s"] = time.perf_counter() - started
            partial["finished"] = "(partial) " + datetime.datetime.now().isoformat(
                timespec="seconds"
            )
            _write_atomically(out / "quality.partial.json", json.dumps(partial))

        ds = run_dataset(
            name,
            settings,
            selected,
            seeds,
            out,
            log,
            first_seed=args.first_seed,
            progress=progress,
        )
        if ds["dim"] == 2 or ds["kind"] == "images":
            figure = f"quality-{name}.png"
            reporting.write_figure(ds, out / "samples" / name, out / figure)
            ds["figure"] = figure
        report["datasets"][name] = ds
    report["acceptance"] = reporting.acceptance(report)
    report["runtime_s"] = time.perf_counter() - started
    report["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    (out / "quality.json").write_text(json.dumps(report, indent=1))
    (out / "quality.partial.json").unlink(missing_ok=True)
    reporting.write_markdown(report, out / "quality.md")
    log(f"done in {report['runtime_s'] / 60:.1f} min: {out / 'quality.md'}")
    log_file.close()
    return report


if __name__ == "__main__":
    main()
