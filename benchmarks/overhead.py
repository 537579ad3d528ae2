"""The overhead of writing a method as an `fmcalc` spec instead of by hand.

```
python benchmarks/overhead.py [--quick] [--out DIR] [--repeats N] [--batch N]
                              [--no-transformer] [--methods NAME ...]
```

For MeanFlow, shortcut models, LSD and sCT, the spec (`fmcalc.methods.get(name)`,
trained through `Method.loss`) is compared with the plain JAX loss of
`handwritten.py` on the same network and the same batch (from `method.batch`):

- the loss and its gradient with respect to the network: the largest relative
  difference over a few batches (relative to the loss and to the gradient's norm);
- the FLOPs of the compiled `value_and_grad` ([`fmcalc.cost.flops`][]);
- the wall time of the compiled `value_and_grad`: hand and spec are called in turn
  (the order alternating between repetitions), each call waited for, and the
  median time of each compared.

Networks: an `fmcalc.nn.MLP` and (unless `--no-transformer`) a small
`fmcalc.nn.Transformer`, both float32, class-conditional. A method passes when
the loss and the gradient agree to `1e-6`, the FLOPs ratio spec/hand is at most
1.01 and the wall-time ratio at most 1.05.

Writes `overhead.md` and `overhead.json` (with the machine and package versions)
into `--out` (default `benchmarks/results`).
"""

import argparse
import dataclasses
import json
import pathlib
import statistics
import sys
import time
from collections.abc import Callable

import equinox as eqx
import handwritten
import jax
import jax.numpy as jnp
import numpy as np
from _machine import machine

import fmcalc
import fmcalc.nn


ROOT = pathlib.Path(__file__).resolve().parent


METHODS = ("meanflow", "shortcut", "lsd", "sct")
TOLERANCE = 1e-6
MAX_FLOPS_RATIO = 1.01
MAX_WALL_RATIO = 1.05
NUM_CLASSES = 10
# The sCT warm-up step at which the comparison is made: `r = 0.5`, so that both the
# flow-matching and the tangent part of its residual are exercised.
SCT_STEP = 5_000


@dataclasses.dataclass(frozen=True)
class Settings:
    batch: int
    repeats: int
    batches: int


# Per network: the transformer costs about eight times the MLP per row.
FULL = {
    "mlp": Settings(batch=256, repeats=500, batches=3),
    "transformer": Settings(batch=64, repeats=200, batches=3),
}
QUICK = {
    "mlp": Settings(batch=64, repeats=15, batches=2),
    "transformer": Settings(batch=32, repeats=10, batches=2),
}


# ------------------------------------------------------------------------ networks


@dataclasses.dataclass(frozen=True)
class Network:
    """A network to compare on: `build(key)` returns a model `V(x, s, t, cond=...)`
    for data of size `dim` with `NUM_CLASSES` labels."""

    description: str
    dim: int
    build: Callable


def _mlp(key) -> fmcalc.nn.MLP:
    return fmcalc.nn.MLP(
        64, width=512, depth=4, num_classes=NUM_CLASSES, dtype=jnp.float32, key=key
    )


def _transformer(key) -> fmcalc.nn.Transformer:
    return fmcalc.nn.Transformer(
        64,
        patch_size=2,
        width=128,
        depth=2,
        heads=4,
        num_classes=NUM_CLASSES,
        dtype=jnp.float32,
        key=key,
    )


NETWORKS = {
    "mlp": Network("MLP(64, width=512, depth=4)", 64, _mlp),
    "transformer": Network(
        "Transformer(64 = 8x8 image, patch 2, width 128, depth 2, heads 4)",
        64,
        _transformer,
    ),
}


# -------------------------------------------------------------------- the two losses


def hand_loss(name: str) -> Callable:
    """The hand-written loss as `loss(model, ema, x0, eps, s, t, cond, r)`."""
    if name == "meanflow":
        return lambda model, ema, x0, eps, s, t, cond, r: handwritten.meanflow_loss(
            model, x0, eps, s, t, cond
        )
    if name == "shortcut":
        return lambda model, ema, x0, eps, s, t, cond, r: handwritten.shortcut_loss(
            model, ema, x0, eps, s, t, cond
        )
    if name == "lsd":
        return lambda model, ema, x0, eps, s, t, cond, r: handwritten.lsd_loss(
            model, x0, eps, s, t, cond
        )
    if name == "sct":
        return lambda model, ema, x0, eps, s, t, cond, r: handwritten.sct_loss(
            model, x0, eps, s, t, r, cond
        )
    raise ValueError(f"No hand-written loss for {name!r}; expected one of {METHODS}.")


def spec_loss(method: fmcalc.Method) -> Callable:
    """The spec's loss as `loss(model, ema, batch, step)`."""

    def loss(model, ema, batch, step):
        return method.loss(model, batch, ema=ema, step=step)[0]

    return loss


def value_and_grad(loss: Callable) -> Callable:
    """`(loss, gradient with respect to the first argument)`."""
    return eqx.filter_value_and_grad(loss)


def hand_args(model, ema, batch: fmcalc.Batch, r) -> tuple:
    return (model, ema, batch.x0, batch.eps, batch.s, batch.t, batch.cond, r)


def spec_args(model, ema, batch: fmcalc.Batch, step) -> tuple:
    return (model, ema, batch, step)


def compile_for(fn: Callable, args: tuple) -> Callable[[tuple], Callable[[], tuple]]:
    """Compile `fn` ahead of time for arguments like `args` (array leaves traced,
    the rest static). Returns `bind(args)`, which gives a call of no arguments
    returning the arrays of `fn(*args)`: one compiled call, nothing to flatten."""
    dynamic, static = eqx.partition(args, eqx.is_array)

    def arrays_only(dynamic):
        return eqx.filter(fn(*eqx.combine(dynamic, static)), eqx.is_array)

    compiled = jax.jit(arrays_only).lower(dynamic).compile()

    def bind(args: tuple) -> Callable[[], tuple]:
        dynamic = eqx.filter(args, eqx.is_array)
        return lambda: compiled(dynamic)

    return bind


# ---------------------------------------------------------------------- measurements


def _relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / (scale if scale > 0 else 1.0))


def _flat(tree) -> np.ndarray:
    leaves = jax.tree.leaves(eqx.filter(tree, eqx.is_array))
    return np.concatenate([np.asarray(leaf, np.float64).ravel() for leaf in leaves])


def compare(spec_out, hand_out) -> tuple[float, float]:
    """Relative difference of the losses and of the gradients (in the gradient's
    norm over all parameters)."""
    (spec_value, spec_grad), (hand_value, hand_grad) = spec_out, hand_out
    return (
        _relative(spec_value, hand_value),
        _relative(_flat(spec_grad), _flat(hand_grad)),
    )


def wall_times(hand: Callable, spec: Callable, repeats: int) -> tuple[list, list]:
    """Interleaved timings (seconds) of two calls, alternating which goes first."""

    def timed(call) -> float:
        start = time.perf_counter()
        jax.block_until_ready(call())
        return time.perf_counter() - start

    for call in (hand, spec, hand, spec):
        timed(call)
    hand_times, spec_times = [], []
    for i in range(repeats):
        if i % 2 == 0:
            hand_times.append(timed(hand))
            spec_times.append(timed(spec))
        else:
            spec_times.append(timed(spec))
            hand_times.append(timed(hand))
    return hand_times, spec_times


def benchmark(
    name: str,
    network: Network,
    settings: Settings,
    *,
    count_flops: bool = True,
    timing: bool = True,
    key=None,
) -> dict:
    """Compare one method's spec with its hand-written loss on `network`.

    The EMA network (used by the shortcut model's target) is a second network of
    the same architecture, initialised differently, so that calling the wrong one
    shows in the loss. Returns one row of the report.
    """
    method = fmcalc.methods.get(name)
    key = jax.random.key(0) if key is None else key
    k_model, k_ema, k_batches = jax.random.split(key, 3)
    model, ema = network.build(k_model), network.build(k_ema)
    step = jnp.asarray(SCT_STEP if name == "sct" else 0)
    r = jnp.asarray(method.params(step).get("r", 0.0), jnp.float32)
    spec = value_and_grad(spec_loss(method))
    hand = value_and_grad(hand_loss(name))

    batches = []
    for k in jax.random.split(k_batches, settings.batches):
        k_data, k_labels, k_draw = jax.random.split(k, 3)
        x0 = jax.random.normal(k_data, (settings.batch, network.dim), jnp.float32)
        labels = jax.random.randint(k_labels, (settings.batch,), 0, NUM_CLASSES)
        batches.append(method.batch(k_draw, x0, cond=labels))

    spec_compiled = compile_for(spec, spec_args(model, ema, batches[0], step))
    hand_compiled = compile_for(hand, hand_args(model, ema, batches[0], r))
    loss_diff = grad_diff = 0.0
    for batch in batches:
        spec_call = spec_compiled(spec_args(model, ema, batch, step))
        hand_call = hand_compiled(hand_args(model, ema, batch, r))
        diffs = compare(spec_call(), hand_call())
        loss_diff, grad_diff = max(loss_diff, diffs[0]), max(grad_diff, diffs[1])

    row = {"method": name, "loss_rel_diff": loss_diff, "grad_rel_diff": grad_diff}
    if count_flops:
        batch = batches[0]
        flops_hand = fmcalc.cost.flops(hand, *hand_args(model, ema, batch, r))
        flops_spec = fmcalc.cost.flops(spec, *spec_args(model, ema, batch, step))
        row.update(
            flops_hand=flops_hand,
            flops_spec=flops_spec,
            flops_ratio=flops_spec / flops_hand,
        )
    if timing:
        hand_times, spec_times = wall_times(
            hand_compiled(hand_args(model, ema, batches[0], r)),
            spec_compiled(spec_args(model, ema, batches[0], step)),
            settings.repeats,
        )
        median_hand = statistics.median(hand_times)
        median_spec = statistics.median(spec_times)
        row.update(
            wall_hand_s=median_hand,
            wall_spec_s=median_spec,
            wall_ratio=median_spec / median_hand,
            wall_hand_iqr_s=_iqr(hand_times),
            wall_spec_iqr_s=_iqr(spec_times),
            repeats=settings.repeats,
        )
    row["checks"] = checks(row)
    row["passed"] = all(row["checks"].values())
    return row


def _iqr(times: list[float]) -> float:
    q1, _, q3 = statistics.quantiles(times, n=4)
    return q3 - q1


def checks(row: dict) -> dict[str, bool]:
    out = {
        "loss": row["loss_rel_diff"] <= TOLERANCE,
        "gradient": row["grad_rel_diff"] <= TOLERANCE,
    }
    if "flops_ratio" in row:
        out["flops"] = row["flops_ratio"] <= MAX_FLOPS_RATIO
    if "wall_ratio" in row:
        out["wall"] = row["wall_ratio"] <= MAX_WALL_RATIO
    return out


# --------------------------------------------------------------------------- report


def _load(load) -> str:
    return "unknown" if load is None else " / ".join(f"{x:.1f}" for x in load)


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.3g}"


def markdown(report: dict) -> str:
    lines = [
        "# Overhead of the spec against hand-written JAX",
        "",
        f"Command: `{report['command']}`. Machine: {report['machine']['processor']}, "
        f"{report['machine']['cpu_count']} CPUs (load average "
        f"{_load(report['machine']['load_average'])} at the start), backend "
        f"`{report['machine']['jax_backend']}`, jax "
        f"{report['machine']['versions']['jax']}, float32. Wall times are medians of "
        "interleaved timings (± the interquartile range).",
        "",
        "Pass: loss and gradient equal to relative "
        f"{TOLERANCE:g} (gradient relative to its norm), FLOPs ratio spec/hand "
        f"≤ {MAX_FLOPS_RATIO}, wall-time ratio ≤ {MAX_WALL_RATIO}. FLOPs are those of "
        "the compiled `value_and_grad` (`fmcalc.cost.flops`).",
        "",
    ]
    for network, rows in report["results"].items():
        settings = report["settings"][network]
        lines += [
            f"## {report['networks'][network]}",
            "",
            f"Batch {settings['batch']} rows; {settings['batches']} batches for the "
            f"equality checks; {settings['repeats']} timings of each loss per method.",
            "",
            "| method | max rel. loss diff | max rel. grad diff | FLOPs hand "
            "| FLOPs spec | FLOPs ratio | wall hand (ms) | wall spec (ms) "
            "| wall ratio | result |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            if "wall_ratio" in row:
                wall = (
                    f"{_ms(row['wall_hand_s'])} ± {_ms(row['wall_hand_iqr_s'])} "
                    f"| {_ms(row['wall_spec_s'])} ± {_ms(row['wall_spec_iqr_s'])} "
                    f"| {row['wall_ratio']:.3f}"
                )
            else:
                wall = "– | – | –"
            failed = [k for k, ok in row["checks"].items() if not ok]
            result = "pass" if row["passed"] else "FAIL (" + ", ".join(failed) + ")"
            lines.append(
                f"| {row['method']} | {row['loss_rel_diff']:.1e} "
                f"| {row['grad_rel_diff']:.1e} | {row['flops_hand']:.4g} "
                f"| {row['flops_spec']:.4g} | {row['flops_ratio']:.4f} | {wall} "
                f"| {result} |"
            )
        lines.append("")
    lines.append(f"Total run time: {report['seconds']:.0f} s.")
    return "\n".join(lines) + "\n"


def _describe(settings: Settings) -> str:
    return (
        f"batch {settings.batch}, {settings.repeats} timings, {settings.batches} "
        "batches"
    )


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smaller batches, fewer timings and batches (MLP: "
        f"{_describe(QUICK['mlp'])} instead of {_describe(FULL['mlp'])})",
    )
    parser.add_argument("--repeats", type=int, help="interleaved timings per method")
    parser.add_argument("--batch", type=int, help="rows per batch")
    parser.add_argument(
        "--no-transformer", action="store_true", help="the MLP only (faster)"
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "results")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    started = time.perf_counter()
    networks = ["mlp"] if args.no_transformer else ["mlp", "transformer"]
    settings = {}
    for network in networks:
        chosen = (QUICK if args.quick else FULL)[network]
        if args.repeats:
            chosen = dataclasses.replace(chosen, repeats=args.repeats)
        if args.batch:
            chosen = dataclasses.replace(chosen, batch=args.batch)
        settings[network] = chosen
    report = {
        "command": " ".join(
            ["python benchmarks/overhead.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "settings": {n: dataclasses.asdict(c) for n, c in settings.items()},
        "thresholds": {
            "relative_difference": TOLERANCE,
            "flops_ratio": MAX_FLOPS_RATIO,
            "wall_ratio": MAX_WALL_RATIO,
        },
        "networks": {n: NETWORKS[n].description for n in networks},
        "machine": machine(),
        "results": {},
    }
    for network in networks:
        rows = []
        for name in args.methods:
            row = benchmark(name, NETWORKS[network], settings[network])
            rows.append(row)
            wall = f"wall {row['wall_ratio']:.3f}" if "wall_ratio" in row else ""
            print(
                f"{network:11s} {name:9s} loss {row['loss_rel_diff']:.1e} "
                f"grad {row['grad_rel_diff']:.1e} flops {row['flops_ratio']:.4f} "
                f"{wall} {'pass' if row['passed'] else 'FAIL'}",
                flush=True,
            )
        report["results"][network] = rows
    report["seconds"] = time.perf_counter() - started
    report["passed"] = all(
        r["passed"] for rows in report["results"].values() for r in rows
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overhead.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "overhead.md").write_text(markdown(report))
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)
