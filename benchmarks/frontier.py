"""Which method to train for a given budget: sample quality against training compute.

```
python benchmarks/frontier.py [--datasets ...] [--methods ...] [--seeds 0 1 2]
                              [--budgets 0.5 1 2] [--teacher learned|exact]
                              [--size full|cpu] [--out DIR] [--resume] [--quick]
python benchmarks/frontier.py --out DIR --render   # the report from DIR/rows.jsonl
python benchmarks/frontier.py --tune --datasets aniso2d --size cpu --out DIR
                              # fifteen trials per method -> DIR/tuned.json, tuning.md
```

Runs are refused from a working tree with uncommitted changes unless
`--allow-dirty` is given (then every row records it). With `DIR/tuned.json`
present, every method trains with its chosen trial (`--tuned` names another file).

Every run is one row of `rows.jsonl`, keyed by data set, method, seed, budget and
teacher. A budget is training compute in units of flow matching's: budget 1 is what
flow matching spends in `base_steps` steps (20k at the full settings), measured as
FLOPs of the compiled training step (forward-pass equivalents × the forward pass's
FLOPs × batch) × steps. Each method gets as many steps as its own measured cost per
step allows within the budget, so a method that costs 11 forward passes per row
trains for fewer steps than one that costs 3.

**Learned teachers.** A distillation method's teacher (and CTM's and PFMM's `aux`
map, a Heun solve of the teacher) is a flow-matching network trained on the same
data with the same seed, for half the budget; its training compute is charged to
the method, which spends the other half. `--teacher exact` gives distillation on
the analytic sets the exact velocity instead, at no charge: an ablation, labelled
so in every row and table.

**Metrics.** Analytic sets: paired RMSE between the sample from noise row `i` and
the exact end point of the same noise (and the energy distance to fresh data); 2-d
toy sets: the energy distance to fresh data; images: the Fréchet distance on the
features of a classifier trained on a held-out split that the generators never
see, against that split's statistics, beside the real-versus-real floor (as many
real training images as samples, against the same statistics), and the classifier's
accuracy on the labels the samples were conditioned on. Flow matching is sampled
with 1 to 128 Euler steps, every flow map with 1, 2 and 4 jumps (re-noising between
jumps for maps trained only to data; none for maps trained only from noise).

Rows are appended as they finish, so an interrupted run loses at most the row in
progress, and `--resume` skips the rows `rows.jsonl` already holds. The report,
`frontier.md` and one figure per data set (quality against training compute, one
line per method and number of steps), is rendered from `rows.jsonl` alone.
Samples and noise are saved under `samples/` for recomputation (not committed).
"""

import argparse
import dataclasses
import datetime
import fcntl
import json
import pathlib
import sys
import tempfile
import time
import traceback
from collections.abc import Callable

import _datasets as datasets
import _metrics as metrics
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _machine import ROOT, clean_machine

import fmcalc
import fmcalc.nn


BASELINE = "flow-matching"
# The headline subset, trained on ring and MNIST: the maps that no other map ranks
# ahead of in some budget-1 cell of the selection sets (`_render.SELECTION`:
# aniso2d, checkerboard, digits), where every registry map ran with its tuned
# setting, so the subset is not chosen on the sets it is reported on. A test
# checks it against `_render.select_headline` of the committed rows.
HEADLINE = ("splitmeanflow", "emd", "lsd", "shortcut", "lmd", "psd")
EULER_STEPS = (1, 2, 4, 8, 16, 32, 64, 128)
JUMPS = (1, 2, 4)
AUX_SUBSTEPS = {"ctm": 2, "pfmm": 4}
# Rows of protocol 2 train with run-length curricula, an EMA horizon, tuned
# settings and the exact-teacher ablation at the learned-teacher row's student
# steps; rows without the field are protocol 1 (the papers' curricula, an EMA of
# `min(0.999, 1 - 10 / steps)`, one learning rate, the ablation at double steps).
PROTOCOL = 2
# Flow matching's solvers, each at every count of network evaluations it can make
# (Heun: two per step).
SOLVERS = ("euler", "heun", "dpm2m")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Network, batch and evaluation of one data set, the same for every method."""

    width: int
    depth: int
    base_steps: int
    batch_size: int
    n_eval: int
    lr: float = 1e-3
    skip: bool = False
    held_out: float = 0.4
    # The EMA's horizon as a fraction of each run (`fmcalc.train.EMA(horizon=...)`).
    horizon: float = 0.1


@dataclasses.dataclass(frozen=True)
class Trial:
    """One method's tunable settings, as multiples of the data set's: the learning
    rate, the EMA horizon and, for a method with a learned teacher, the share of the
    budget the teacher gets."""

    lr: float = 1.0
    horizon: float = 1.0
    share: float = 0.5

    def label(self) -> str:
        return f"lr×{self.lr:g} horizon×{self.horizon:g} teacher share {self.share:g}"


# The same number of trials for every method: learning rate × {0.5, 1, 2, 4, 8}
# by EMA horizon × {0.5, 1, 2}, fifteen trials (each narrower grid's largest rate,
# ×2 and then ×4, was the choice of most methods). A method with a learned teacher
# tunes its share too, over {0.25, 0.5, 0.75}, in the same fifteen trials: every
# share meets every learning rate and every horizon.
LEARNING_RATES = (0.5, 1.0, 2.0, 4.0, 8.0)
HORIZONS = (0.5, 1.0, 2.0)
SHARES = (0.25, 0.5, 0.75)


def trials(uses_teacher: bool) -> list[Trial]:
    return [
        Trial(lr, horizon, SHARES[(i + j) % 3] if uses_teacher else 0.5)
        for i, lr in enumerate(LEARNING_RATES)
        for j, horizon in enumerate(HORIZONS)
    ]


FULL = {
    "ring": Settings(256, 4, 20_000, 256, 2000),
    "aniso2d": Settings(256, 4, 20_000, 256, 2000),
    "checkerboard": Settings(256, 4, 20_000, 256, 2000),
    "digits": Settings(512, 4, 20_000, 256, 1000),
    "mnist": Settings(512, 4, 20_000, 128, 1000, skip=True),
}
# What a 2-core CPU runs in about an hour and a half with two processes: narrower
# networks and budget 1 at 5000 (2-d sets, digits) or 3000 (MNIST) steps of flow
# matching, 4 to 7 times less than FULL. Every row records the settings it ran with.
CPU = {
    "ring": Settings(128, 3, 5_000, 256, 2000),
    "aniso2d": Settings(128, 3, 5_000, 256, 2000),
    "checkerboard": Settings(128, 3, 5_000, 256, 2000),
    "digits": Settings(256, 3, 5_000, 256, 1000),
    "mnist": Settings(256, 3, 3_000, 128, 1000, skip=True),
}
QUICK = {
    "ring": Settings(64, 2, 400, 128, 500),
    "digits": Settings(64, 2, 300, 64, 200),
}
PLAN = {
    # Budgets per data set: three where the frontier is drawn, one elsewhere.
    "ring": (0.5, 1.0, 2.0),
    "mnist": (0.5, 1.0, 2.0),
    "aniso2d": (1.0,),
    "checkerboard": (1.0,),
    "digits": (1.0,),
}
SEEDS = (0, 1, 2)


# Methods outside the registry, by name. Another benchmark adds its own before it
# calls `main` (`benchmarks/meanflow_ablation.py`). Protocol 1 named MeanFlow with
# plain squared error `meanflow-mse`; it is `meanflow[loss=squared]` now, the name
# `fmcalc.methods.parse` and `fmcalc train --method meanflow --set loss=squared`
# build.
# `flow-matching-untuned` is flow matching at the data set's own settings whatever
# `tuned.json` says: the report compares the maps with the better of the two.
EXTRA: dict[str, Callable[[], fmcalc.Method]] = {
    "flow-matching-untuned": lambda: fmcalc.methods.get("flow-matching")
}


def method(name: str) -> fmcalc.Method:
    """A registry method, a variant `name[option=value,...]`
    ([`fmcalc.methods.parse`][]), or one of `EXTRA`."""
    if name in EXTRA:
        return EXTRA[name]()
    return fmcalc.methods.parse(name)


# ------------------------------------------------------------------ evaluation


@dataclasses.dataclass
class Evaluation:
    """What a data set's metrics need, fixed across methods, seeds and budgets."""

    dataset: datasets.Dataset
    noise: np.ndarray
    cond: np.ndarray | None
    train: np.ndarray | None = None
    train_labels: np.ndarray | None = None
    data: np.ndarray | None = None
    exact: np.ndarray | None = None
    classifier: metrics.Classifier | None = None
    reference: np.ndarray | None = None
    floors: dict = dataclasses.field(default_factory=dict)
    # Indices of the training and held-out rows of `dataset.train` (images).
    split: tuple[np.ndarray, np.ndarray] | None = None


def prepare(dataset, settings: Settings, cache: pathlib.Path) -> Evaluation:
    """Noise, references and floors. Images are split once (fixed seed) into a
    training split for the generators and a held-out split for the classifier and
    the reference statistics."""
    key = jax.random.key(20_250_101)
    k_noise, k_data = jax.random.split(key)
    n = settings.n_eval
    noise = np.asarray(jax.random.normal(k_noise, (n, dataset.dim), jnp.float32))
    if dataset.kind == "images":
        assert dataset.train is not None and dataset.train_labels is not None
        order = np.random.default_rng(0).permutation(dataset.train.shape[0])
        held = int(round(settings.held_out * len(order)))
        train, held_out = order[held:], order[:held]
        classifier, accuracy = metrics.cached_classifier(
            f"{dataset.name}-held-out",
            dataset.train[held_out],
            dataset.train_labels[held_out],
            dataset.num_classes,
            cache,
        )
        reference = metrics.features(classifier, dataset.train[held_out])
        real = dataset.train[train][: min(n, len(train))]
        floors = {
            "classifier_accuracy": accuracy,
            "fd_real": metrics.frechet_distance(
                metrics.features(classifier, real), reference
            ),
            "split": [int(len(train)), int(len(held_out))],
            "fd_real_rows": int(real.shape[0]),
        }
        return Evaluation(
            dataset,
            noise,
            np.arange(n, dtype=np.int32) % dataset.num_classes,
            train=dataset.train[train],
            train_labels=dataset.train_labels[train],
            classifier=classifier,
            reference=reference,
            floors=floors,
            split=(train, held_out),
        )
    data = np.asarray(dataset.sample(k_data, n))
    other = np.asarray(dataset.sample(jax.random.fold_in(k_data, 1), n))
    ev = Evaluation(dataset, noise, None, data=data)
    ev.floors = {"energy_fresh": metrics.energy_distance(data, other)}
    if dataset.kind == "analytic":
        with jax.enable_x64(True):
            flow = dataset.reference()
            solve = jax.jit(jax.vmap(flow.flow_map))
            x = jnp.asarray(noise, jnp.float64)
            ev.exact = np.asarray(solve(x, jnp.ones(n), jnp.zeros(n)))
    return ev


def save_evaluation(ev: Evaluation, folder: pathlib.Path) -> None:
    """What recomputing a metric needs, beside the samples: the noise (row `i` of
    every sample file was drawn from noise row `i`), the exact end points and the
    mixture's parameters (analytic sets), the fresh data (2-d sets), and the
    labels the samples were conditioned on and the split (images)."""
    np.save(folder / "noise.npy", ev.noise)
    if ev.exact is not None:
        np.save(folder / "exact.npy", ev.exact)
    if ev.data is not None:
        np.save(folder / "data.npy", ev.data)
    if ev.dataset.mixture is not None:
        (folder / "mixture.json").write_text(json.dumps(ev.dataset.mixture))
    if ev.cond is not None:
        np.save(folder / "labels.npy", ev.cond)
    if ev.split is not None:
        np.savez(folder / "split.npz", train=ev.split[0], held_out=ev.split[1])


def score(ev: Evaluation, samples: np.ndarray) -> dict[str, float]:
    """The metrics of one set of samples, rows paired with `ev.noise`."""
    if not np.all(np.isfinite(samples)):
        return {"nonfinite": float(np.mean(~np.all(np.isfinite(samples), axis=1)))}
    if ev.classifier is not None:
        assert ev.reference is not None
        features = metrics.features(ev.classifier, samples)
        return {
            "fd": metrics.frechet_distance(features, ev.reference),
            "accuracy": float(
                np.mean(metrics.predict(ev.classifier, samples) == ev.cond)
            ),
        }
    out = {"energy": metrics.energy_distance(samples, ev.data)}
    if ev.exact is not None:
        out["rmse"] = metrics.paired_rmse(samples, ev.exact)
    return out


# --------------------------------------------------------------------- compute


def network(dataset, settings: Settings, seed: int) -> fmcalc.nn.MLP:
    return fmcalc.nn.MLP(
        dataset.dim,
        width=settings.width,
        depth=settings.depth,
        num_classes=dataset.num_classes,
        skip=settings.skip,
        dtype=jnp.float32,
        key=jax.random.key(1000 + seed),
    )


def step_cost(name: str, ev: Evaluation, settings: Settings, teacher, aux) -> dict:
    """The measured FLOPs of one training step of `name`: its loss's value and
    gradient on one batch of `batch_size` data rows (teacher calls included), and
    its forward-pass equivalents per data row."""
    m = method(name)
    model = network(ev.dataset, settings, 0)
    rows = ev.train if ev.train is not None else ev.data
    x0 = jnp.asarray(rows[: settings.batch_size])
    cond = (
        None
        if ev.train_labels is None
        else jnp.asarray(ev.train_labels[: settings.batch_size])
    )
    batch = m.batch(jax.random.key(0), x0, cond=cond)
    used = m.networks
    nets = {
        "teacher": teacher if "teacher" in used else None,
        "ema": model if "ema" in used else None,
        "aux": aux if "aux" in used else None,
    }

    def step(model):
        return eqx.filter_value_and_grad(lambda m_: m.loss(m_, batch, **nets)[0])(model)

    # The reference is one forward pass per data row: a method that evaluates
    # each of its terms on every row (no split) lays out a multiple of them.
    data_rows = jax.tree.map(lambda a: a[: settings.batch_size], batch)

    def forward(model):
        return jax.vmap(lambda x, s, t, c: model(x, s, t, cond=c))(
            data_rows.x, data_rows.s, data_rows.t, data_rows.cond
        )

    cost = fmcalc.cost.measure(step, (model,), forward=forward, forward_args=(model,))
    return {
        "flops": cost.flops,
        "forward_flops": cost.forward_flops,
        "fpe": cost.forward_pass_equivalents,
    }


def plan_steps(budget: float, fm_step_flops: float, own_step_flops: float,
               settings: Settings, uses_teacher: bool,
               share: float = 0.5) -> tuple[int, int]:  # fmt: skip
    """`(own steps, teacher steps)` within `budget`: the teacher (flow matching)
    gets `share` of the budget when the method uses one, the method the rest."""
    total = budget * settings.base_steps * fm_step_flops
    teacher_steps = (
        int(round(budget * share * settings.base_steps)) if uses_teacher else 0
    )
    own = total - teacher_steps * fm_step_flops
    return max(1, int(round(own / own_step_flops))), teacher_steps


# -------------------------------------------------------------------- training


def fit(name: str, model, ev: Evaluation, settings: Settings, steps: int, *, seed,
        trial: Trial = Trial(), teacher=None, aux=None):  # fmt: skip
    """Train `name` for `steps` steps as a user would: curricula sized for the run
    (`fit`'s default), an EMA over a fraction of the run, Adam with a cosine decay
    of the trial's learning rate."""
    m = method(name)
    used = m.networks
    schedule = optax.cosine_decay_schedule(settings.lr * trial.lr, steps, alpha=0.01)
    if ev.train is not None:
        data, labels = jnp.asarray(ev.train), jnp.asarray(ev.train_labels)
    else:
        data, labels = ev.dataset.sample, None
    start = time.perf_counter()
    result = fmcalc.train.fit(
        m,
        model,
        data,
        key=jax.random.key(2000 + seed),
        steps=steps,
        batch_size=settings.batch_size,
        optimizer=optax.adam(schedule),
        labels=labels,
        teacher=teacher if "teacher" in used else None,
        aux=aux if "aux" in used else None,
        ema=fmcalc.train.EMA(horizon=min(1.0, settings.horizon * trial.horizon)),
        options=fmcalc.train.Options(progress=False),
    )
    jax.block_until_ready(eqx.filter(result.ema, eqx.is_array))
    return result, time.perf_counter() - start


class Teachers:
    """Flow-matching networks by (seed, steps), trained once (with flow matching's
    own trial) and reused as the teacher of every distillation method at that
    budget."""

    def __init__(self, ev: Evaluation, settings: Settings, trial: Trial = Trial()):
        self.ev, self.settings, self.trial = ev, settings, trial
        self.trained: dict[tuple[int, int], tuple[object, float]] = {}

    def get(self, seed: int, steps: int):
        if (seed, steps) not in self.trained:
            model = network(self.ev.dataset, self.settings, seed)
            result, seconds = fit(
                BASELINE,
                model,
                self.ev,
                self.settings,
                steps,
                seed=seed,
                trial=self.trial,
            )
            self.trained[seed, steps] = (result.ema, seconds)
        return self.trained[seed, steps]


def run_row(name: str, budget: float, seed: int, teacher_kind: str, ev: Evaluation,
            settings: Settings, teachers: Teachers, costs: dict,
            trial: Trial = Trial()) -> dict:  # fmt: skip
    """Train one method at one budget and seed, sample it and score it. With the
    exact teacher (an ablation), the method trains for the same steps as with a
    learned one, so the two rows differ in the teacher alone."""
    m = method(name)
    used = m.networks
    exact = teacher_kind == "exact" and ev.dataset.flow is not None
    distils = bool(used & {"teacher", "aux"})
    own_steps, teacher_steps = plan_steps(
        budget,
        costs[BASELINE]["flops"],
        costs[name]["flops"],
        settings,
        distils,
        trial.share,
    )
    ablated = 0
    if exact:  # the learned teacher's share is not trained, and not charged
        ablated, teacher_steps = teacher_steps, 0
    row = {
        "steps": own_steps,
        "teacher_steps": teacher_steps,
        "fpe": costs[name]["fpe"],
        "step_flops": costs[name]["flops"],
        "own_flops": own_steps * costs[name]["flops"],
        "teacher_flops": teacher_steps * costs[BASELINE]["flops"],
        "kind": m.sampling,
        "ablated_teacher_steps": ablated,
        "trial": dataclasses.asdict(trial),
        "protocol": PROTOCOL,
    }
    row["total_flops"] = row["own_flops"] + row["teacher_flops"]
    teacher = aux = None
    if exact:
        teacher = ev.dataset.flow.velocity  # pyright: ignore[reportOptionalMemberAccess]
        aux = ev.dataset.flow
        row["teacher"] = "exact velocity (ablation, same student steps)"
    elif distils:
        fm, row["teacher_s"] = teachers.get(seed, teacher_steps)
        teacher = fmcalc.model_velocity(fm)
        aux = fmcalc.HeunMap(teacher, AUX_SUBSTEPS.get(name, 4))
        row["teacher"] = f"flow matching, {teacher_steps} steps (charged)"
    model = network(ev.dataset, settings, seed)
    result, row["train_s"] = fit(
        name,
        model,
        ev,
        settings,
        own_steps,
        seed=seed,
        trial=trial,
        teacher=teacher,
        aux=aux,
    )
    if name == BASELINE and trial == teachers.trial:
        # The same run as the teacher of a method that gives it this many steps.
        teachers.trained.setdefault((seed, own_steps), (result.ema, row["train_s"]))
    row["skipped"] = int(result.skipped)
    row["final_loss"] = float(np.nanmean(np.asarray(result.losses)[-100:]))
    start = time.perf_counter()
    drawn = draw_samples(row["kind"], result.ema, ev, jax.random.key(7 + seed))
    row["metrics"] = {column: score(ev, samples) for column, samples in drawn.items()}
    row["eval_s"] = time.perf_counter() - start
    row["samples"] = drawn
    return row


# -------------------------------------------------------------------- sampling


def draw_samples(kind: str, model, ev: Evaluation, key) -> dict[str, np.ndarray]:
    """The samples of one trained model from `ev.noise`, keyed by column: for flow
    matching's velocity, `nfe<k>` (Euler), `heun-nfe<k>` and `dpm2m-nfe<k>` at `k`
    network evaluations for every `k` of `EULER_STEPS` the solver can make;
    `nfe<k>` for `k` jumps of a flow map, `k` in `JUMPS`, with consistency
    re-noising between the jumps of a map trained only to data, and one jump only
    of a map trained only from noise. The samplers of `fmcalc sample`."""
    if kind == "velocity":
        plan = [
            (solver, k)
            for solver in SOLVERS
            for k in EULER_STEPS
            if solver != "heun" or k % 2 == 0
        ]
    else:
        plan = [("euler", k) for k in {"from-noise": (1,)}.get(kind, JUMPS)]
    out = {}
    for solver, k in plan:
        options = {} if solver == "euler" else {"solver": solver}
        out[column_name(solver, k)] = fmcalc.sample_batch(
            model,
            ev.noise,
            steps=k,
            kind=kind,
            key=jax.random.fold_in(key, k),
            cond=ev.cond,
            **options,
        )
    return out


def column_name(solver: str, nfe: int) -> str:
    return f"nfe{nfe}" if solver == "euler" else f"{solver}-nfe{nfe}"


# ------------------------------------------------------------------------ main


def key_of(row: dict) -> tuple:
    return (
        row["dataset"],
        row["method"],
        row["seed"],
        row["budget"],
        row["teacher_kind"],
        json.dumps(row.get("trial"), sort_keys=True),
    )


def read_rows(path: pathlib.Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append(path: pathlib.Path, row: dict) -> None:
    """Add one row, whole, under an exclusive lock: several processes (one per
    data set, say) may append to the same file."""
    with path.open("a") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        try:
            file.write(json.dumps(row) + "\n")
            file.flush()
        finally:
            fcntl.flock(file, fcntl.LOCK_UN)


def relative(path: pathlib.Path) -> str:
    """`path` relative to the repository when it lies inside it, so rows and
    reports do not carry one machine's checkout path."""
    resolved = path.resolve()
    try:
        return str(resolved.relative_to(ROOT))
    except ValueError:
        return str(path)


def command_line(program: str, argv: list[str]) -> str:
    """The command as run, with paths inside the repository made relative to it."""
    words = []
    for word in argv:
        candidate = pathlib.Path(word)
        inside = candidate.is_absolute() or candidate.exists()
        words.append(relative(candidate) if inside else word)
    return " ".join(["python", program, *words])


def choose(rows: list[dict]) -> dict[str, dict]:
    """Each method's best trial in the tuning rows: the lowest mean, over the
    columns the method is judged on (1 and 2 jumps of a map, or one for a map
    trained from noise, or whose second jump re-noises; flow matching's best
    solver at its most network evaluations), of the data set's primary metric
    (`_render._trial_score`). A trial that failed or left non-finite samples is
    never chosen."""
    import _render

    metric = _render.primary_metric(rows)
    scores: dict[str, list[tuple[float, dict]]] = {}
    for row in rows:
        value = _render._trial_score(row, metric)
        if np.isfinite(value):
            scores.setdefault(row["method"], []).append((value, row["trial"]))
    return {name: min(found, key=lambda f: f[0])[1] for name, found in scores.items()}


TUNING_SEED = 100


def main(argv=None, *, program: str = "benchmarks/frontier.py") -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--datasets", nargs="+", choices=list(FULL))
    parser.add_argument(
        "--methods", nargs="+", help="default: flow matching and the headline subset"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument(
        "--budgets", nargs="+", type=float, help="default: the plan per data set"
    )
    parser.add_argument("--teacher", choices=("learned", "exact"), default="learned")
    parser.add_argument(
        "--size",
        choices=("full", "cpu"),
        default="full",
        help="networks and base budget: full (20k flow-matching steps, for a GPU) "
        "or cpu (3k to 5k steps, narrower networks)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny networks and budgets (a few minutes)"
    )
    parser.add_argument(
        "--tune",
        action="store_true",
        help=f"run every method's {len(trials(False))} trials at budget 1 on seed "
        f"{TUNING_SEED} into OUT/tuning.jsonl, and write the chosen trials to "
        "OUT/tuned.json",
    )
    parser.add_argument(
        "--tuned",
        type=pathlib.Path,
        help="the chosen trials (default OUT/tuned.json when it exists, else the "
        "data sets' settings for every method)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="skip rows already in rows.jsonl"
    )
    parser.add_argument(
        "--without-baseline",
        action="store_true",
        help="train only the --methods named, not flow matching (whose rows another "
        "process writes)",
    )
    parser.add_argument(
        "--allow-dirty",
        action="store_true",
        help="run from a working tree with uncommitted changes (recorded in rows)",
    )
    parser.add_argument("--render", action="store_true", help="only render the report")
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=pathlib.Path(tempfile.gettempdir()) / "fmcalc-benchmarks" / "frontier",
    )
    args = parser.parse_args(argv)
    import _render

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("tuning.jsonl" if args.tune else "rows.jsonl")
    plan = {name: tuple(args.budgets or PLAN[name]) for name in (args.datasets or PLAN)}
    headline = tuple(dict.fromkeys((BASELINE, *(args.methods or HEADLINE))))
    tuned_path = args.tuned or args.out / "tuned.json"
    chosen_trials = json.loads(tuned_path.read_text()) if tuned_path.exists() else None
    report = dict(plan=plan, headline=headline, tuned=chosen_trials)
    if args.render and args.tune:
        rows = read_rows(path)
        chosen = choose(rows)
        (args.out / "tuned.json").write_text(json.dumps(chosen, indent=1) + "\n")
        _render.write_tuning(rows, chosen, args.out)
        return 0
    if args.render:
        _render.write_report(read_rows(path), args.out, **report)
        return 0
    record = clean_machine(args.allow_dirty)
    if not args.resume and path.exists():
        raise SystemExit(
            f"{path} exists: pass --resume to add to it, or choose another --out."
        )
    tuned = {} if args.tune or chosen_trials is None else chosen_trials
    done = {key_of(row) for row in read_rows(path)}
    table = QUICK if args.quick else CPU if args.size == "cpu" else FULL
    names = args.datasets or list(QUICK if args.quick else PLAN)
    methods = [BASELINE, *(args.methods or HEADLINE)]
    methods = list(dict.fromkeys(methods))
    # Tuning, or a run told so, trains only what is named: several processes can
    # share the methods without repeating flow matching's rows. Budgets still
    # need its cost.
    named = args.tune or args.without_baseline
    trained = args.methods if named and args.methods else methods
    argv = sys.argv[1:] if argv is None else argv
    command = command_line(program, argv)
    for name in names:
        settings = table[name]
        earlier = {
            json.dumps(row["settings"], sort_keys=True)
            for row in read_rows(path)
            if row["dataset"] == name and "settings" in row
        }
        current = json.dumps(dataclasses.asdict(settings), sort_keys=True)
        if earlier - {current}:
            raise SystemExit(
                f"{path} holds {name} rows run with other settings ({earlier}), "
                f"not {current}: use the same --size, or another --out."
            )
        dataset = datasets.DATASETS[name]()
        ev = prepare(dataset, settings, args.out / "samples" / "_cache")
        samples_dir = args.out / "samples" / name
        samples_dir.mkdir(parents=True, exist_ok=True)
        save_evaluation(ev, samples_dir)
        fm_trial = Trial(**tuned.get(BASELINE, {}))
        teachers = Teachers(ev, settings, fm_trial)
        # Costs are measured on an untrained network of the same shape.
        teacher = fmcalc.model_velocity(network(dataset, settings, 0))
        costs = {
            n: step_cost(
                n,
                ev,
                settings,
                teacher,
                fmcalc.HeunMap(teacher, AUX_SUBSTEPS.get(n, 4)),
            )
            for n in methods
        }
        if args.tune:
            seeds, budgets = [TUNING_SEED], [1.0]
        else:
            seeds, budgets = args.seeds, args.budgets or PLAN.get(name, (1.0,))
        for seed in seeds:
            for budget in budgets:
                for method_name in trained:
                    distils = bool(method(method_name).networks & {"teacher", "aux"})
                    planned = (
                        trials(distils)
                        if args.tune
                        else [Trial(**tuned.get(method_name, {}))]
                    )
                    for trial in planned:
                        identity = {
                            "dataset": name,
                            "method": method_name,
                            "seed": seed,
                            "budget": budget,
                            "teacher_kind": args.teacher,
                            "trial": dataclasses.asdict(trial),
                        }
                        if key_of(identity) in done:
                            continue
                        if args.tune:  # each trial trains its own teacher
                            teachers = Teachers(ev, settings, trial)
                        start = time.perf_counter()
                        try:
                            row = run_row(method_name, budget, seed, args.teacher, ev,
                                          settings, teachers, costs, trial)  # fmt: skip
                        except Exception as error:  # noqa: BLE001 - kept in the row
                            message = f"{type(error).__name__}: {error}"
                            row = {"error": message.splitlines()[0]}
                            traceback.print_exc()
                        drawn = row.pop("samples", {})
                        stem = (
                            f"{method_name}-b{budget:g}-s{seed}-{args.teacher}"
                            + (f"-{trial.lr:g}-{trial.horizon:g}-{trial.share:g}"
                               if args.tune else "")
                        )  # fmt: skip
                        for column, samples in drawn.items():
                            np.save(samples_dir / f"{stem}-{column}.npy", samples)
                        row = {
                            **identity,
                            **row,
                            "floors": ev.floors,
                            "settings": dataclasses.asdict(settings),
                            "seconds": time.perf_counter() - start,
                            "finished": datetime.datetime.now().isoformat(
                                timespec="seconds"
                            ),
                            "command": command,
                            "machine": record,
                        }
                        append(path, row)
                        # Every row compiles its own training step and samplers:
                        # drop them, or a process that runs hundreds of rows runs
                        # out of memory for compiled code.
                        jax.clear_caches()
                        print(f"[{name}] seed {seed} budget {budget:g} "
                              f"{method_name} ({trial.label()}): "
                              f"{_render.headline_value(row)}", flush=True)  # fmt: skip
    if args.tune:
        rows = read_rows(path)
        chosen = choose(rows)
        (args.out / "tuned.json").write_text(json.dumps(chosen, indent=1) + "\n")
        _render.write_tuning(rows, chosen, args.out)
        print(f"wrote {args.out / 'tuned.json'} and {args.out / 'tuning.md'}")
        return 0
    if args.quick:
        report = dict(
            plan={n: (1.0,) for n in names},
            headline=tuple(methods),
            tuned=tuned or None,
        )
    _render.write_report(read_rows(path), args.out, **report)
    print(f"wrote {args.out / 'frontier.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
