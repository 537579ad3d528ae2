"""Cost of one training step of every flow-map method, in forward-pass equivalents.

```
python benchmarks/cost.py [--quick] [--out DIR] [--methods a,b] [--repeats N]
                          [--jobs N]
```

For every method of `fmcalc.methods.names()` and two float32 networks
(`fmcalc.nn.MLP` on 64-d vectors and the DiT `fmcalc.nn.Transformer` on 8×8×1
images), one training step, `eqx.filter_value_and_grad` of `method.loss` with respect
to the online network, is compiled and measured with `fmcalc.cost.measure`:

- forward-pass equivalents (FPE): the step's FLOPs over those of the network's
  forward pass on the batch's *data* rows, so the figure is a cost per data row;
- the compiled program's temporary memory;
- wall time relative to a flow-matching step, the two compiled steps called in turn
  in the same process (median of `--repeats` calls each).

Each method runs in two batch layouts: every term on every data row
(`method.replace(split=None)`, the seed's accounting) and the method's default split
of the rows between its terms (public code's practice). Distillation methods get a
second network of the same architecture as teacher (one forward per velocity call,
`teacher(x, t) = net(x, t, t)`); `ema` and `aux` are copies of the online network
(`aux` is called as a flow map by CTM and PFMM). Measured figures are compared with
the static estimate `method.cost()` and with the seed's table.

Writes `cost.md`, `cost.json` and `cost.png` into `--out`.
"""

import argparse
import concurrent.futures
import dataclasses
import datetime
import functools
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from _machine import device_label, machine

import fmcalc
import fmcalc.cost
import fmcalc.methods
import fmcalc.nn


ROOT = pathlib.Path(__file__).resolve().parent
BASELINE = "flow-matching"
DIM = 64
# Past every default warm-up (10k steps), so `r = 1` is traced, not folded to 0.
STEP = 20_000
SEED_SLACK = 0.3
STATIC_SLACK = 0.5
MEANFLOW_LIMIT = {"mlp": 4.1, "transformer": 4.3}

# Why a method's full-batch count differs from the seed's, shown where the
# measurement exceeds the seed's figure by more than SEED_SLACK.
SEED_WHY = {
    "ctm": "the gradient also flows back through the EMA map at the loss point, "
    "F_ema(F(x, s, t), t, 0), into its input: a backward pass without weight "
    "gradients (≈ 1 FPE), which the seed's 7 leaves out",
    "esd": "V(x, s, s), the spatial JVP's tangent, is a forward pass of its own "
    "(+1 over the seed's 10, which shares it with the anchor; here the anchor has "
    "its own rows and times)",
    "facm": "the anchor and the consistency term each have their own rows and "
    "times, so the teacher runs at both points (+1 over the seed's 8, which shares "
    "one teacher call between the two branches)",
}

# Why the measurement differs from the static count `method.cost()`, shown where
# they differ by more than STATIC_SLACK.
STATIC_WHY: dict[str, str] = {}


@dataclasses.dataclass(frozen=True)
class Settings:
    """The networks and batch measured, and the number of timed calls."""

    rows: int
    mlp: dict
    transformer: dict
    repeats: int


FULL = Settings(
    rows=64,
    mlp=dict(width=512, depth=4, time_features=64),
    transformer=dict(patch_size=2, width=128, depth=2, heads=4, time_features=128),
    repeats=20,
)
QUICK = Settings(
    rows=32,
    mlp=dict(width=256, depth=4, time_features=32),
    transformer=dict(patch_size=2, width=64, depth=1, heads=4, time_features=64),
    repeats=5,
)
NETWORKS = {"mlp": fmcalc.nn.MLP, "transformer": fmcalc.nn.Transformer}


# --------------------------------------------------------------------------- steps


def build_network(kind: str, options: dict, key) -> eqx.Module:
    """One float32 network of the given kind (`"mlp"` or `"transformer"`)."""
    return NETWORKS[kind](DIM, dtype=jnp.float32, key=key, **options)


def networks(kind: str, options: dict) -> tuple[eqx.Module, tuple]:
    """The online network and `(teacher, ema, aux)`, all of one architecture.

    The teacher has its own weights; `ema` and `aux` are copies of the online
    network (separate buffers, so each is an argument of the compiled step).
    """
    build = lambda key: build_network(kind, options, key)
    return build(jr.key(0)), (build(jr.key(1)), build(jr.key(0)), build(jr.key(0)))


def training_step(method: fmcalc.Method) -> Callable:
    """`(model, (teacher, ema, aux), batch, step) -> (loss, grads)` for `method`."""

    def step_fn(model, others, batch, step):
        teacher_net, ema, aux = others

        def teacher(x, t):
            return teacher_net(x, t, t)

        def loss(model):
            return method.loss(
                model, batch, teacher=teacher, ema=ema, aux=aux, step=step
            )[0]

        return eqx.filter_value_and_grad(loss)(model)

    return step_fn


def forward(model, x, s, t):
    """The reference: one forward pass of the network on every row."""
    return jax.vmap(model)(x, s, t)


def layouts(method: fmcalc.Method) -> dict[str, fmcalc.Method]:
    """`"full"`: every term on every data row; `"split"`: the default split (absent
    when the method has none, which makes it the same program)."""
    out = {"full": method.replace(split=None)}
    if method.split is not None:
        out["split"] = method
    return out


@dataclasses.dataclass
class Case:
    """One compiled training step: a method in one layout on one network."""

    name: str
    layout: str
    method: fmcalc.Method
    args: tuple
    forward_args: tuple


def cases(names: Sequence[str], model, others, rows: int, seed: int = 42) -> list[Case]:
    """Every (method, layout) with its batch drawn from `rows` data rows."""
    k_data, k_times, k_batch = jr.split(jr.key(seed), 3)
    x0 = jr.normal(k_data, (rows, DIM), jnp.float32)
    times = jr.uniform(k_times, (rows,), jnp.float32)
    forward_args = (model, x0, times, times)
    step = jnp.asarray(STEP, jnp.int32)
    out = []
    for name in names:
        for layout, method in layouts(fmcalc.methods.get(name)).items():
            batch = method.batch(k_batch, x0)
            args = (model, others, batch, step)
            out.append(Case(name, layout, method, args, forward_args))
    return out


def _summary(cost: fmcalc.cost.Cost) -> dict[str, float]:
    mib = 2.0**-20
    return {
        "fpe": cost.forward_pass_equivalents,
        "flops": cost.flops,
        "forward_flops": cost.forward_flops,
        "temp_mib": cost.memory.temp_bytes * mib,
        "peak_mib": cost.memory.peak_bytes * mib,
    }


def measure(case: Case) -> dict[str, float]:
    """FLOPs, FPE per data row and memory of one case's compiled step, with the
    static estimate of the same layout."""
    cost = fmcalc.cost.measure(
        training_step(case.method),
        case.args,
        forward=forward,
        forward_args=case.forward_args,
    )
    return {**_summary(cost), "static": case.method.cost()}


def jvp_forward(model, x, s, t):
    """A JVP of the network along `(x, 1, 0)` with its primal, on every row."""
    along = (x, jnp.ones_like(s), jnp.zeros_like(t))
    return jax.jvp(lambda x, s, t: forward(model, x, s, t), (x, s, t), along)


def jvp_backward(model, x, s, t):
    """`value_and_grad` of a loss on a JVP's primal and tangent (no stop-gradient):
    the seed's 2 + 4 FPE."""

    def loss(model):
        primal, tangent = jvp_forward(model, x, s, t)
        return jnp.mean(jnp.sum((primal + tangent) ** 2, axis=-1))

    return eqx.filter_value_and_grad(loss)(model)


def measure_unit(unit: Callable, forward_args: tuple) -> dict[str, float]:
    """FPE of a building block (`jvp_forward`, `jvp_backward`) on the data rows."""
    cost = fmcalc.cost.measure(
        unit, forward_args, forward=forward, forward_args=forward_args
    )
    return _summary(cost)


def compile_step(case: Case) -> Callable[[], Any]:
    """The case's step compiled, as a thunk running it once on its arguments.

    Lowered exactly as `fmcalc.cost.measure` lowers it, so that the compilation
    cache (when enabled) serves the executable measured instead of compiling it a
    second time.
    """
    fn = training_step(case.method)
    is_argument = lambda leaf: (
        eqx.is_array(leaf) or isinstance(leaf, jax.ShapeDtypeStruct)
    )
    dynamic, static = eqx.partition((tuple(case.args), {}), is_argument)

    def arrays_only(dynamic):
        call_args, call_kwargs = eqx.combine(dynamic, static)
        return eqx.filter(fn(*call_args, **call_kwargs), eqx.is_array)

    compiled = jax.jit(arrays_only).lower(dynamic).compile()
    return lambda: compiled(dynamic)


def wall_ratio(
    baseline: Callable[[], Any], candidate: Callable[[], Any], repeats: int
) -> dict[str, float]:
    """Median wall time of `candidate` over that of `baseline`, called in turn."""
    for thunk in (baseline, candidate):
        jax.block_until_ready(thunk())
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for thunk, record in zip((baseline, candidate), times, strict=True):
            start = time.perf_counter()
            jax.block_until_ready(thunk())
            record.append(time.perf_counter() - start)
    base, cand = (statistics.median(record) for record in times)
    return {"ratio": cand / base, "baseline_ms": 1e3 * base, "method_ms": 1e3 * cand}


def run_network(
    kind: str,
    settings: Settings,
    names: Sequence[str],
    *,
    repeats: int,
    jobs: int = 1,
    units: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure every method in `names` (flow matching first) on one network.

    **Arguments:**

    - `kind`: `"mlp"` or `"transformer"`.
    - `settings`: the network options and batch size.
    - `names`: the methods.
    - `repeats`: timed calls of each step against flow matching (0: none).
    - `jobs`: steps compiled concurrently.
    - `units`: also measure the building blocks (a JVP, and a JVP with its
      backward), which explain small excesses over the seed's figures.
    - `log`: progress messages.

    **Returns:** `{"network", "rows", "units", "methods"}`. `units` holds the FPE of
    a flow-matching step, of a JVP with its primal and of `value_and_grad` through
    one (seed: 3, 2 and 6), or `None` without `units`;
    `methods[name]` the rule, the seed's figure, the `"full"` and `"split"`
    measurements (`"split"` is `"full"` for a method without a split), the reason
    for an excess over the seed and, with `repeats > 0`, the wall-time ratio of the
    full-batch step to a flow-matching step.
    """
    options = getattr(settings, kind)
    model, others = networks(kind, options)
    names = [BASELINE] + [n for n in names if n != BASELINE]
    todo = cases(names, model, others, settings.rows)
    forward_args = todo[0].forward_args
    tasks = [functools.partial(measure, case) for case in todo]
    if units:
        tasks += [
            functools.partial(measure_unit, unit, forward_args)
            for unit in (jvp_forward, jvp_backward)
        ]
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(lambda task: task(), tasks))
    log(f"{kind}: compiled and measured {len(tasks)} programs in "
        f"{time.perf_counter() - started:.0f} s")  # fmt: skip
    rows: dict[str, dict] = {}
    for case, result in zip(todo, results[: len(todo)], strict=True):
        row = rows.setdefault(
            case.name,
            {
                "rule": case.method.rule,
                "learning": case.method.learning,
                "default_split": None,
                # The cost column of Dieleman's (2026) table, "Learning the
                # integral of a diffusion model": FPE of one iteration with the
                # full loss on the entire batch, a backward pass costing 2
                # forwards, a JVP with its forward 2 and the backward through it
                # 4; None for the methods not in it (sCT, ECT).
                "seed": fmcalc.methods.info(case.name).dieleman_cost,
            },
        )
        if case.layout == "split":
            row["default_split"] = list(case.method.split)
        row[case.layout] = result
    blocks = None
    if units:
        jvp, jvp_grad = results[len(todo) :]
        blocks = {
            "flow_matching": rows[BASELINE]["full"]["fpe"],
            "jvp": jvp["fpe"],
            "jvp_backward": jvp_grad["fpe"],
        }
    for name, row in rows.items():
        row.setdefault("split", row["full"])
        row["why"] = why(name, row, blocks)
    if repeats > 0:
        started = time.perf_counter()
        full = {case.name: case for case in todo if case.layout == "full"}
        baseline = compile_step(full[BASELINE])
        for name in names:
            rows[name]["wall"] = wall_ratio(baseline, compile_step(full[name]), repeats)
        log(f"{kind}: timed {len(names)} steps ({repeats} calls each) in "
            f"{time.perf_counter() - started:.0f} s")  # fmt: skip
    return {
        "network": {"class": NETWORKS[kind].__name__, "dim": DIM, **options},
        "rows": settings.rows,
        "units": blocks,
        "methods": rows,
    }


def per_pass_overhead(units: dict[str, float]) -> float:
    """The largest ratio of a building block's measured FPE to the seed's (flow
    matching 3, JVP 2, JVP with its backward 6): what a network's nonlinearities add
    to the seed's matmul-only accounting."""
    return max(
        units["flow_matching"] / 3, units["jvp"] / 2, units["jvp_backward"] / 6, 1.0
    )


def why(name: str, row: dict, units: dict[str, float] | None) -> str | None:
    """Why the full-batch FPE exceeds the seed's figure by more than SEED_SLACK:
    `None` if it does not, `"unexplained"` if no reason applies."""
    seed, full = row["seed"], row["full"]
    if seed is None or full["fpe"] <= seed + SEED_SLACK:
        return None
    reasons = []
    scale = 1.0 if units is None else per_pass_overhead(units)
    # A written reason says why the method's structure costs more than the seed
    # counts; it covers the excess only where the static count of that structure
    # (scaled by this network's per-pass overhead) accounts for the measurement.
    if name in SEED_WHY and full["fpe"] <= scale * full["static"] + STATIC_SLACK:
        reasons.append(SEED_WHY[name])
    if full["fpe"] - full["static"] > STATIC_SLACK and name in STATIC_WHY:
        reasons.append(
            f"measured {full['fpe'] - full['static']:+.1f} over the static count: "
            + STATIC_WHY[name]
        )
    if (
        units is not None
        and not reasons
        and abs(full["static"] - seed) <= SEED_SLACK
        and full["fpe"] <= scale * seed + SEED_SLACK
    ):
        reasons.append(
            f"same count as the seed (static {full['static']:g}); the excess is "
            "this network's elementwise work (normalisations, softmax, "
            "activations), which the seed does not count: a flow-matching step "
            f"costs {units['flow_matching']:.2f} FPE here, a JVP "
            f"{units['jvp']:.2f}, a JVP with its backward "
            f"{units['jvp_backward']:.2f} (seed: 3, 2, 6), scaling the seed's "
            f"{seed:g} to ≈ {scale * seed:.1f}"
        )
    return "; ".join(reasons) if reasons else "unexplained"


# -------------------------------------------------------------------------- checks


def checks(kind: str, result: dict) -> dict[str, Any]:
    """The acceptance criteria on one network's measurements.

    - `seed`: full-batch FPE at most the seed's figure + SEED_SLACK, or a reason
      for the excess;
    - `meanflow`: MeanFlow's full-batch FPE at most `MEANFLOW_LIMIT[kind]`;
    - `static`: the static estimate within STATIC_SLACK of the measurement, in both
      layouts.
    """
    methods = result["methods"]
    over, unexplained, static = [], [], []
    for name, row in methods.items():
        if row["why"] is not None:
            over.append(name)
            if row["why"] == "unexplained":
                unexplained.append(name)
        for layout in ("full", "split"):
            gap = row[layout]["fpe"] - row[layout]["static"]
            if abs(gap) > STATIC_SLACK and (layout == "full" or row["default_split"]):
                static.append({"method": name, "layout": layout, "gap": gap})
    out = {
        "seed": {"over": over, "unexplained": unexplained, "ok": not unexplained},
        "static": {"mismatches": static, "ok": not static},
    }
    if "meanflow" in methods:
        fpe = methods["meanflow"]["full"]["fpe"]
        out["meanflow"] = {
            "fpe": fpe,
            "limit": MEANFLOW_LIMIT[kind],
            "ok": fpe <= MEANFLOW_LIMIT[kind],
        }
    return out


# -------------------------------------------------------------------------- output


def _number(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _split(split: list[float] | None) -> str:
    return "none" if split is None else "/".join(f"{f:.3g}" for f in split)


def _table(result: dict) -> list[str]:
    lines = [
        "| method | rule | FPE full batch | static | seed | Δ vs seed | why | "
        "default split | FPE split | static split | temp MiB full / split | "
        "wall / FM |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in result["methods"].items():
        full, split, seed = row["full"], row["split"], row["seed"]
        delta = None if seed is None else full["fpe"] - seed
        why = row["why"] or ""
        if why == "unexplained":
            why = "**unexplained**"
        wall = row.get("wall")
        has_split = row["default_split"] is not None
        cells = [
            name,
            row["rule"],
            _number(full["fpe"]),
            _number(full["static"]),
            _number(seed, 0),
            "—" if delta is None else f"{delta:+.2f}",
            why,
            _split(row["default_split"]),
            _number(split["fpe"]) if has_split else "= full",
            _number(split["static"]) if has_split else "",
            f"{full['temp_mib']:.1f} / {split['temp_mib']:.1f}"
            if has_split
            else f"{full['temp_mib']:.1f}",
            "—" if wall is None else f"{wall['ratio']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _network_line(result: dict) -> str:
    net = dict(result["network"])
    cls = net.pop("class")
    options = ", ".join(f"{k}={v}" for k, v in net.items())
    fm = result["methods"][BASELINE]
    gflop = fm["full"]["forward_flops"] / 1e9
    line = (
        f"`fmcalc.nn.{cls}({options})`, float32, {result['rows']} data rows; "
        f"forward on the data rows: {gflop:.4g} GFLOP"
    )
    wall = fm.get("wall")
    if wall is not None:
        line += f"; flow-matching step: {wall['baseline_ms']:.1f} ms (median)"
    return line + "."


def write_markdown(report: dict, path: pathlib.Path) -> None:
    m = report["machine"]
    lines = [
        "# Training-step cost of every method, in forward-pass equivalents",
        "",
        f"Run: **{'quick' if report['quick'] else 'full'}**, "
        f"{report['runtime_s']:.0f} s, {report['date']}; {m['processor']}, "
        f"{m['cpu_count']} CPU core(s), devices {', '.join(m['devices'])}, "
        f"{device_label(m)}; jax {m['versions']['jax']}, equinox "
        f"{m['versions']['equinox']}.",
        "",
        f"Command: `{report['command']}`",
        "",
        *([f"Note: {report['note']}", ""] if report.get("note") else []),
        "FPE = FLOPs of one compiled training step (`value_and_grad` of the loss "
        "with respect to the online network, from `fmcalc.cost.measure`) over the "
        "FLOPs of one forward pass of the network on the batch's *data* rows: the "
        "cost per data row. **Full batch**: every term on every data row "
        "(`split=None`, the seed's accounting). **Split**: the method's default "
        "split of the rows between its terms. *Static* is `method.cost()` for that "
        "layout; *seed* the cost column of the seed's method table (flow matching: "
        "the text's 3 FPE; sCT and ECT are not in it). *Why* explains every "
        f"full-batch figure more than {SEED_SLACK} above the seed's. Temporary "
        "memory is XLA's scratch allocation of the compiled step. *Wall / FM* is the "
        "median wall time of the full-batch step over that of a flow-matching step, "
        f"called in turn ({report['repeats']} calls each; "
        + (
            "noisy on a shared CPU, FLOPs are deterministic"
            if m["jax_backend"] == "cpu"
            else "steps this small leave an accelerator waiting on kernel "
            "launches, so these ratios sit well below the FPE ratios"
        )
        + "); the flow-matching row times the step against itself, a gauge of "
        "timing noise.",
        "",
    ]
    for kind, result in report["networks"].items():
        check = report["checks"][kind]
        lines += [f"## {result['network']['class']}", "", _network_line(result), ""]
        lines += _table(result)
        lines.append("")
        seed = check["seed"]
        lines.append(
            f"- Full batch ≤ seed + {SEED_SLACK}: "
            + (
                "every method."
                if not seed["over"]
                else f"exceeded by {', '.join(seed['over'])}"
                + (
                    f"; **unexplained: {', '.join(seed['unexplained'])}**."
                    if seed["unexplained"]
                    else " (each explained in the table)."
                )
            )
        )
        if "meanflow" in check:
            mf = check["meanflow"]
            lines.append(
                f"- MeanFlow ≤ {mf['limit']}: {mf['fpe']:.2f} "
                f"({'ok' if mf['ok'] else '**fails**'})."
            )
        static = check["static"]["mismatches"]
        if not static:
            lines.append(
                f"- Static estimate within {STATIC_SLACK} of the measurement: every "
                "method, both layouts."
            )
        else:
            lines.append(
                f"- Static estimate more than {STATIC_SLACK} from the measurement:"
            )
            for item in static:
                reason = STATIC_WHY.get(item["method"], "**unexplained**")
                lines.append(
                    f"  - {item['method']} ({item['layout']}): measured − static "
                    f"{item['gap']:+.2f}; {reason}."
                )
        units = result["units"]
        if units is not None:
            lines.append(
                f"- Building blocks on this network: a flow-matching step "
                f"{units['flow_matching']:.2f} FPE, a JVP with its primal "
                f"{units['jvp']:.2f}, `value_and_grad` through a JVP "
                f"{units['jvp_backward']:.2f} (seed: 3, 2, 6)."
            )
        lines.append("")
    path.write_text("\n".join(lines))


def write_plot(report: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    networks_ = report["networks"]
    fig, axes = plt.subplots(
        len(networks_), 1, figsize=(13, 3.6 * len(networks_)), squeeze=False
    )
    for ax, result in zip(axes[:, 0], networks_.values(), strict=True):
        names = list(result["methods"])
        rows = [result["methods"][n] for n in names]
        x = np.arange(len(names))
        measured = [r["full"]["fpe"] for r in rows]
        seed = [np.nan if r["seed"] is None else r["seed"] for r in rows]
        split = [r["split"]["fpe"] if r["default_split"] else np.nan for r in rows]
        ax.bar(x - 0.2, measured, 0.4, label="measured, full batch", color="C0")
        ax.bar(x + 0.2, seed, 0.4, label="seed", color="0.65")
        ax.plot(x - 0.2, split, "k_", ms=12, mew=2, label="measured, default split")
        ax.set_xticks(x, names, rotation=45, ha="right")
        ax.set_ylabel("FPE per data row")
        net = dict(result["network"])
        options = ", ".join(f"{k}={v}" for k, v in net.items() if k != "class")
        ax.set_title(f"{net['class']}({options}), {result['rows']} data rows")
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict, out: pathlib.Path) -> None:
    """`cost.json`, `cost.md` and `cost.png` into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "cost.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, out / "cost.md")
    write_plot(report, out / "cost.png")


# ---------------------------------------------------------------------------- main


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smaller networks, {QUICK.rows} data rows, {QUICK.repeats} timed calls",
    )
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "results")
    parser.add_argument(
        "--methods",
        type=lambda text: [n.strip() for n in text.split(",") if n.strip()],
        help="comma-separated method names (default: all; flow matching always)",
    )
    parser.add_argument(
        "--repeats", type=int, help="timed calls per step (0: no wall times)"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="steps compiled concurrently",
    )
    parser.add_argument(
        "--cache-dir",
        type=pathlib.Path,
        help="persistent compilation cache (default: a temporary one for this run)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    started = time.perf_counter()
    settings = QUICK if args.quick else FULL
    repeats = settings.repeats if args.repeats is None else args.repeats
    names = fmcalc.methods.names()
    if args.methods:
        unknown = sorted(set(args.methods) - set(names))
        if unknown:
            raise SystemExit(f"Unknown method(s) {unknown}; known: {names}.")
        names = [n for n in names if n in args.methods]

    def log(message: str) -> None:
        stamp = datetime.datetime.now().strftime("%H:%M:%S")
        print(f"{stamp} {message}", flush=True)

    with tempfile.TemporaryDirectory(prefix="fmcalc-cost-") as scratch:
        # The wall-time pass compiles each step again; with the cache it loads the
        # executable `fmcalc.cost.measure` compiled instead.
        cache = args.cache_dir or pathlib.Path(scratch)
        jax.config.update("jax_compilation_cache_dir", str(cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        results = {
            kind: run_network(
                kind, settings, names, repeats=repeats, jobs=args.jobs, log=log
            )
            for kind in NETWORKS
        }
    report = {
        "quick": args.quick,
        "command": " ".join(
            ["python benchmarks/cost.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "repeats": repeats,
        "seed_slack": SEED_SLACK,
        "static_slack": STATIC_SLACK,
        "networks": results,
        "checks": {kind: checks(kind, result) for kind, result in results.items()},
        "runtime_s": time.perf_counter() - started,
    }
    write_report(report, args.out)
    log(f"wrote cost.md, cost.json and cost.png to {args.out} after "
        f"{report['runtime_s']:.0f} s")  # fmt: skip
    return report


if __name__ == "__main__":
    main()
