"""What 16-bit network compute does to identities, fixed points and training.

```
python benchmarks/precision.py [--quick] [--out DIR] [--steps N] [--seeds N ...]
```

Three measurements, each in float32, bfloat16, bfloat16 with float32 JVPs, and
float16 (`fmcalc.train.Precision`):

1. **Identities.** The exact average velocity of a 4-d Gaussian, its inputs and
   output rounded to the compute dtype (a network exact up to its own
   resolution), in the testing kit's residuals (semigroup, Lagrangian, Eulerian,
   diagonal): the largest residual over 256 random points and times.
2. **Fixed points.** `fmcalc.testing.check_fixed_point` of MeanFlow, LSD and
   shortcut on the same Gaussian with that rounded exact map: each term's
   `relative_residual` (0 up to round-off at a fixed point) and whether it passes.
3. **Training.** MeanFlow and LSD on the eight-Gaussian ring (radius 4, std 0.5)
   with `fmcalc.train.fit`: an MLP (skip gate), Adam with a cosine decay, batch
   256; the 1-step and 2-step paired errors against the exact end points of the
   same noise, and the loss curve (mean over windows of 5% of the run).

Writes `precision.md`, `precision.json` (command, machine, versions, commit) and
`precision.png` (the loss curves) into `--out`, the first two again after every
training run: a scratch folder by default; `--out benchmarks/results` updates the
committed table.
"""

import argparse
import json
import pathlib
import sys
import tempfile
import time
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _machine import machine

import fmcalc
from fmcalc import testing
from fmcalc.nn import MLP


SCRATCH = pathlib.Path(tempfile.gettempdir()) / "fmcalc-benchmarks"
WINDOWS = 20
Precision = fmcalc.train.Precision
POLICIES = {
    "float32": None,
    "bfloat16": Precision(jnp.bfloat16),
    "bfloat16, float32 JVP": Precision(jnp.bfloat16, jvp=jnp.float32),
    "float16": Precision(jnp.float16),
}


class Exact(eqx.Module):
    """The exact map (plus a perturbation, zero here) as a network that takes and
    returns the compute dtype: under a policy, its inputs and output are rounded
    to that dtype, and its parameters too."""

    model: testing.AffinePerturbation

    def __call__(self, x, s, t, *, cond=None):
        args = (jnp.asarray(a).astype(jnp.float32) for a in (x, s, t))
        return self.model(*args, cond=cond).astype(jnp.result_type(x))


def network(flow, policy):
    """The exact average velocity of `flow`, computing under `policy`; and the
    same network as a JVP calls it."""
    exact = Exact(testing.perturbed(flow, 4))
    if policy is None:
        return exact, exact
    cast = policy(exact)
    return cast, cast.for_jvp()


def gaussian() -> fmcalc.flows.Gaussian:
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(4, 4)))
    cov = (q * np.geomspace(0.1, 2.0, 4)) @ q.T
    return fmcalc.flows.Gaussian(
        np.linspace(-1, 1, 4, dtype=np.float32), ((cov + cov.T) / 2).astype(np.float32)
    )


def identities(flow) -> dict[str, dict[str, float]]:
    x = flow.sample(jax.random.key(0), 256)
    times = jnp.sort(jax.random.uniform(jax.random.key(1), (256, 3)), axis=1)
    t, u, s = (times[:, i].astype(jnp.float32) for i in range(3))
    x = jax.vmap(flow.flow_map)(x, jnp.zeros_like(s), s)
    out = {}
    for name, policy in POLICIES.items():
        average, in_jvp = network(flow, policy)

        def flow_map(x, a, b, average=average):
            return x + (b - a) * average(x, a, b)

        def jvp_map(x, a, b, average=in_jvp):
            return x + (b - a) * average(x, a, b)

        def velocity(x, t, average=average):
            return average(x, t, t)

        residuals = {
            "semigroup": testing.semigroup_residual(flow_map, x, s, u, t),
            "lagrangian": testing.lagrangian_residual(jvp_map, velocity, x, s, t),
            "eulerian": testing.eulerian_residual(jvp_map, velocity, x, s, t),
            "diagonal": testing.diagonal_residual(average, flow.velocity, x, t),
        }
        out[name] = {k: float(v) for k, v in residuals.items()}
    return out


def fixed_points(flow) -> dict[str, dict[str, list]]:
    out = {}
    for name, policy in POLICIES.items():
        model, _ = network(flow, policy)
        out[name] = {}
        for method in ("meanflow", "lsd", "shortcut"):
            result = testing.check_fixed_point(
                fmcalc.methods.get(method),
                flow,
                key=jax.random.key(3),
                n=500,
                model=model,
                ema=model,
            )
            out[name][method] = [
                [term.name, term.relative_residual, bool(term.passed)]
                for term in result.terms
            ]
    return out


def ring() -> fmcalc.flows.GaussianMixture:
    angles = 2 * np.pi * np.arange(8) / 8
    means = 4.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return fmcalc.flows.GaussianMixture(
        np.full(8, 1 / 8, np.float32),
        means.astype(np.float32),
        np.tile(0.25 * np.eye(2, dtype=np.float32), (8, 1, 1)),
    )


def training(steps: int, seeds: list[int], done: Callable[[dict], None]) -> list[dict]:
    """The training runs; `done(row)` after each."""
    flow = ring()
    noise = jax.random.normal(jax.random.key(99), (2000, 2), jnp.float32)
    exact = testing.exact_samples(flow, noise)

    def paired(model, jumps: int) -> float:
        samples = testing.jump_samples(model, noise, steps=jumps)
        return testing.paired_error(samples, exact)

    rows = []
    for method in ("meanflow", "lsd"):
        for seed in seeds:
            for name, policy in POLICIES.items():
                model = MLP(2, width=128, depth=3, skip=True, key=jax.random.key(seed))
                start = time.perf_counter()
                result = fmcalc.train.fit(
                    fmcalc.methods.get(method),
                    model,
                    flow.sample,
                    key=jax.random.key(seed + 1000),
                    steps=steps,
                    batch_size=256,
                    optimizer=optax.adam(optax.cosine_decay_schedule(2e-3, steps)),
                    ema=fmcalc.train.EMA(decay=1 - 50 / steps),
                    options=fmcalc.train.Options(
                        precision=policy, progress=False, schedules="paper"
                    ),
                )
                losses = np.asarray(result.losses)
                windows = np.array_split(losses, WINDOWS)
                row = {
                    "method": method,
                    "seed": seed,
                    "policy": name,
                    "one_step": paired(result.ema, 1),
                    "two_step": paired(result.ema, 2),
                    "loss_curve": [float(np.nanmean(w)) for w in windows],
                    "skipped": result.skipped,
                    "seconds": time.perf_counter() - start,
                }
                print(json.dumps(row), flush=True)
                rows.append(row)
                done(row)
    return rows


def report(record: dict) -> str:
    info = record["machine"]
    lines = [
        "# Mixed precision: identities, fixed points and training",
        "",
        f"`{record['command']}` at commit `{info['git']['commit']}`, on "
        f"{info['jax_backend']} ({info['processor']}, {info['cpu_count']} cores), "
        f"jax {info['versions']['jax']}.",
        "",
        "## Identity residuals of the exact map at the compute dtype's resolution",
        "",
        "Largest residual over 256 points of a 4-d Gaussian (its exact average "
        "velocity with inputs and output rounded).",
        "",
        "| policy | semigroup | Lagrangian | Eulerian | diagonal |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in record["identities"].items():
        lines.append(
            f"| {name} | {r['semigroup']:.2e} | {r['lagrangian']:.2e} | "
            f"{r['eulerian']:.2e} | {r['diagonal']:.2e} |"
        )
    lines += [
        "",
        "## Fixed-point check with the rounded exact map",
        "",
        "Each term's relative residual at the exact map (0 up to round-off), and "
        "whether `check_fixed_point` passes it at its float32 tolerance.",
        "",
        "| policy | " + " | ".join(record["fixed_points"]["float32"]) + " |",
        "|---|" + "---|" * len(record["fixed_points"]["float32"]),
    ]
    for name, methods in record["fixed_points"].items():
        cells = [
            ", ".join(
                f"{term} {residual:.1e} {'pass' if passed else 'FAIL'}"
                for term, residual, passed in terms
            )
            for terms in methods.values()
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"## Training on the ring ({record['steps']} steps)",
        "",
        "Paired error of the EMA network's 1- and 2-jump samples against the exact "
        "end points of the same 2000 noises (mean over seeds), and the loss at the "
        "start, middle and end of the run (means over windows of 5% of the run; "
        "the whole curves are in `precision.png`).",
        "",
        "![Loss curves on the ring](precision.png)",
        "",
        "| method | policy | 1-step error | x float32 | 2-step error | loss: start | "
        "middle | end | skipped steps |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = record["training"]
    for method in dict.fromkeys(r["method"] for r in rows):
        reference = np.mean(
            [
                r["one_step"]
                for r in rows
                if r["method"] == method and r["policy"] == "float32"
            ]
        )
        for name in POLICIES:
            mine = [r for r in rows if r["method"] == method and r["policy"] == name]
            one = np.mean([r["one_step"] for r in mine])
            two = np.mean([r["two_step"] for r in mine])
            if not mine:
                continue
            curve = np.mean([r["loss_curve"] for r in mine], axis=0)
            lines.append(
                f"| {method} | {name} | {one:.3f} | {one / reference:.2f} | "
                f"{two:.3f} | {curve[0]:.3f} | {curve[len(curve) // 2]:.3f} | "
                f"{curve[-1]:.3f} | "
                f"{sum(r['skipped'] for r in mine)} |"
            )
    return "\n".join(lines) + "\n"


def plot(record: dict, path: pathlib.Path) -> None:
    """The loss curves of every method and policy, mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = record["training"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, len(methods), figsize=(5.5 * len(methods), 3.8))
    for ax, method in zip(np.atleast_1d(axes), methods, strict=True):
        for name in POLICIES:
            mine = [r for r in rows if r["method"] == method and r["policy"] == name]
            if not mine:
                continue
            curve = np.mean([r["loss_curve"] for r in mine], axis=0)
            steps = (np.arange(len(curve)) + 0.5) * record["steps"] / len(curve)
            ax.plot(steps, curve, marker=".", label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (window mean)")
        ax.set_title(f"{method} on the ring")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out: pathlib.Path, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "precision.json").write_text(json.dumps(record, indent=1))
    (out / "precision.md").write_text(report(record))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=SCRATCH)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--quick", action="store_true", help="50 steps, one seed")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.seeds = 50, [0]
    start = time.perf_counter()
    flow = gaussian()
    record = {
        "command": "python benchmarks/precision.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "steps": args.steps,
        "identities": identities(flow),
        "fixed_points": fixed_points(flow),
        "training": [],
    }

    def finished(row: dict) -> None:
        record["training"].append(row)
        write(args.out, record)

    training(args.steps, args.seeds, finished)
    record["seconds"] = time.perf_counter() - start
    write(args.out, record)
    plot(record, args.out / "precision.png")
    print(f"wrote {args.out / 'precision.md'} after {record['seconds']:.0f} s")


if __name__ == "__main__":
    main()
