"""Flow maps at work, against exact answers: reward steering on the 2-d mixture and
few-step likelihoods, with the exact map and with maps trained by registry methods.

```
python benchmarks/apps.py [--seeds 0 1] [--steps 2000] [--out benchmarks/results/apps]
python benchmarks/apps.py --quick      # a smoke run: tiny training, few samples
```

**Data and reward.** `aniso2d` (four unequal, elongated 2-d Gaussians) and the
quadratic reward `r(x) = -‖x - c‖² / 2` at two strengths `λ`; the tilted target
`p(x) exp(λ r(x)) / Z` is a Gaussian mixture in closed form
([`fmcalc.apps.tilt`][]), sampled exactly.

**Maps.** The exact flow (`GaussianMixture` as a model) and MLPs trained with
[`fmcalc.train.fit`][] by three registry methods that need no teacher: `meanflow`
(Eulerian), `lsd` (Lagrangian self-distillation) and `fmm` (flow map matching,
trained on both orders of `(s, t)`, so the only one of the three that can encode
data to noise). Each seed trains its own networks.

**Steering.** For each map, strength and seed, the samples of each strategy from
the same noise: `steer` with the flow-map, Tweedie and no look-ahead (4 jumps, 8
Langevin moves per jump), `importance` (1-jump samples weighted by `exp(λ r)`,
then resampled) and `smc` (flow-map look-ahead, 4 steps, re-noising, resampled at
the end). Scored by the energy distance to exact tilted samples, the mean reward
attained (beside the exact `E[r]` under the tilt), and the cost per sample: the
model calls (a Jacobian-vector or vector-Jacobian product counted as one more) and
the measured wall time.

**Likelihood.** `log p0(x0)` of exact data points by [`fmcalc.apps.log_likelihood`][]
with K = 1, 2, 4, 8 jumps against the closed-form log-density (mean absolute
error), and the ODE reference [`fmcalc.apps.log_likelihood_ode`][] of each map's own
velocity; cost as FLOPs per example from the compiled program (the ODE's as FLOPs of
one evaluation of the augmented field times the solver's evaluations).

Writes `apps.json` (every number, the command, the commit, the machine and the time
taken), `steering.md`, `likelihood.md` and the figures `steering.png` and
`likelihood.png`, all generated from the JSON.
"""

import argparse
import json
import pathlib
import sys
import time

import _datasets as datasets
import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _machine import machine, provenance
from _metrics import assign_components, energy_distance

import fmcalc
import fmcalc.nn
from fmcalc import apps


METHODS = ("meanflow", "lsd", "fmm")
STRENGTHS = (1.0, 4.0)
CENTER = (0.5, 2.5)
JUMPS = (1, 2, 4, 8)
STEPS, LANGEVIN = 4, 8


def parse():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=2000, help="training steps")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--points", type=int, default=200, help="likelihood points")
    parser.add_argument("--out", default="benchmarks/results/apps")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--render", action="store_true", help="only re-render")
    parser.add_argument(
        "--figures", action="store_true", help="only redraw the figures and re-render"
    )
    args = parser.parse_args()
    if args.quick:
        args.steps, args.samples, args.points, args.seeds = 100, 200, 20, [0]
    return args


def timed(fn, *args):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start


def train(method: str, flow, seed: int, steps: int):
    net = fmcalc.nn.MLP(2, width=64, depth=3, key=jax.random.key(100 + seed))
    result = fmcalc.train.fit(
        fmcalc.methods.get(method),
        net,
        flow.sample,
        key=jax.random.key(seed),
        steps=steps,
        batch_size=256,
        # The settings the committed results were run with.
        optimizer=optax.adam(1e-3),
        ema=fmcalc.train.EMA(decay=min(0.999, 1 - 10 / steps)),
        options=fmcalc.train.Options(progress=False, schedules="paper"),
    )
    return result.ema


def _steer(model, reward, strength, noise, keys, lookahead):
    return jax.vmap(
        lambda e, k: apps.steer(
            model,
            reward,
            e,
            key=k,
            strength=strength,
            lookahead=lookahead,
            steps=STEPS,
            langevin_steps=LANGEVIN,
        )
    )(noise, keys)


def _importance(model, reward, strength, noise, key):
    particles = apps.importance_sample(model, reward, noise, strength=strength)
    return apps.resample(particles, key=key)


def _smc(model, reward, strength, noise, key):
    particles = apps.smc(model, reward, noise, key=key, strength=strength, steps=STEPS)
    return apps.resample(particles, key=jax.random.fold_in(key, 1))


# Compiled once per kind of model (the exact flow, the MLP): the model, reward and
# strength are arguments, so seeds, methods and strengths share a program.
_steer, _importance, _smc = (eqx.filter_jit(f) for f in (_steer, _importance, _smc))

# Per Langevin move: the velocity, the look-ahead forward and its backward.
STRATEGIES = {
    "steer, flow-map look-ahead": (apps.FlowMapLookahead(), STEPS * (LANGEVIN * 3 + 1)),
    "steer, Tweedie look-ahead": (apps.TweedieLookahead(), STEPS * (LANGEVIN * 3 + 1)),
    "steer, no look-ahead": (apps.NoLookahead(), STEPS * (LANGEVIN + 1)),
    "importance, 1 jump": ("importance", 1),
    "smc, flow-map look-ahead": ("smc", 1 + STEPS),
}


def strategies(model, reward, strength, noise, key):
    """Equally weighted samples of each strategy, with the model calls per sample."""
    n = noise.shape[0]
    keys = jax.random.split(key, n)
    strength = jnp.asarray(strength, noise.dtype)
    for name, (how, calls) in STRATEGIES.items():
        if how == "importance":
            fn = lambda: _importance(model, reward, strength, noise, key)  # noqa: E731
        elif how == "smc":
            fn = lambda: _smc(model, reward, strength, noise, key)  # noqa: E731
        else:
            fn = lambda how=how: _steer(model, reward, strength, noise, keys, how)  # noqa: E731
        fn()  # compile
        samples, seconds = timed(fn)
        yield name, np.asarray(samples), calls, seconds / n


FIGURE = {}


def steering(model, flow64, reward, seed, n):
    rows = []
    for strength in STRENGTHS:
        target = apps.tilt(flow64, reward, strength)
        exact = np.asarray(target.sample(jax.random.key(1000 + seed), 2 * n))
        # At t = 1 the posterior is the prior: the tilt's mean reward in closed form.
        exact_reward = float(
            apps.expected_reward(target, reward, jnp.zeros(2, exact.dtype), 1.0)
        )
        components = {
            "weights": np.asarray(target.weights),
            "means": np.asarray(target.means),
            "covs": np.asarray(
                jnp.einsum(
                    "kij,kj,klj->kil", target.eigvecs, target.eigvals, target.eigvecs
                )
            ),
        }
        noise = jax.random.normal(jax.random.key(2000 + seed), (n, 2), jnp.float32)
        for name, samples, calls, seconds in strategies(
            model, reward, strength, noise, jax.random.key(3000 + seed)
        ):
            if isinstance(model, fmcalc.flows.AbstractFlow) and seed == 0:
                FIGURE[(strength, name)] = samples
            rows.append(
                {
                    "strength": strength,
                    "strategy": name,
                    "energy": energy_distance(samples, exact),
                    "reward": float(np.mean(jax.vmap(reward)(jnp.asarray(samples)))),
                    "exact_reward": exact_reward,
                    "mass": mass_error(samples, components),
                    "calls": calls,
                    "seconds_per_sample": seconds,
                }
            )
            print(f"  λ={strength} {name}: {rows[-1]['energy']:.4f}", flush=True)
    return rows


def mass_error(samples, components) -> float:
    """Total variation between the share of samples in each tilted component (by
    posterior) and the component's exact tilted weight."""
    k = len(components["weights"])
    share = np.bincount(assign_components(samples, components), minlength=k)
    return float(0.5 * np.sum(np.abs(share / len(samples) - components["weights"])))


LOOKAHEADS = {
    "flow map": apps.FlowMapLookahead(),
    "Tweedie": apps.TweedieLookahead(),
    "none": apps.NoLookahead(),
}
TIMES = (0.25, 0.5, 0.75)


@eqx.filter_jit
def _estimates(model, reward, lookahead, x, t):
    return jax.vmap(lambda x: reward(lookahead(model, x, t)))(x)


def lookahead_bias(model, flow, reward, seed, n=500):
    """`r(x̂0(x_t, t)) - E[r(x0) | x_t]` over `x_t ~ p_t`, its mean (the bias) and
    mean absolute value (the error at a point): each look-ahead as an estimate of
    the reward to come."""
    rows = []
    for t in TIMES:
        key = jax.random.key(5000 + seed)
        x0 = flow.sample(key, n)
        eps = jax.random.normal(jax.random.fold_in(key, 1), x0.shape, x0.dtype)
        x = (1 - t) * x0 + t * eps
        exact = jax.vmap(lambda x, t=t: apps.expected_reward(flow, reward, x, t))(x)
        for name, lookahead in LOOKAHEADS.items():
            estimate = _estimates(model, reward, lookahead, x, jnp.asarray(t, x.dtype))
            error = estimate - exact
            rows.append(
                {
                    "t": t,
                    "lookahead": name,
                    "bias": float(jnp.mean(error)),
                    "abs_error": float(jnp.mean(jnp.abs(error))),
                }
            )
    return rows


def ode_cost(velocity, x0):
    """FLOPs of the ODE likelihood of one example: one evaluation of the augmented
    field (velocity and exact divergence), times the solver's evaluations."""
    field = fmcalc.cost.flops(
        lambda x, t: apps.augmented_field(
            t, (x, jnp.zeros((), x.dtype)), (velocity, None)
        ),
        x0,
        jnp.asarray(0.5, x0.dtype),
    )
    solution = diffrax.diffeqsolve(
        diffrax.ODETerm(apps.augmented_field),
        diffrax.Tsit5(),
        t0=0.0,
        t1=1.0,
        dt0=None,
        y0=(x0, jnp.zeros((), x0.dtype)),
        args=(velocity, None),
        stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-6),
        max_steps=4096,
    )
    evaluations = int(solution.stats["num_steps"]) * 6 + 1  # Tsit5: 6 stages, FSAL
    return field * evaluations


@eqx.filter_jit
def _log_likelihoods(model, points, jumps):
    return jax.vmap(lambda x: apps.log_likelihood(model, x, steps=jumps))(points)


@eqx.filter_jit
def _ode_log_likelihoods(velocity, points):
    return jax.vmap(lambda x: apps.log_likelihood_ode(velocity, x))(points)


@eqx.filter_jit
def _round_trips(model, points, jumps):
    errors = jax.vmap(lambda x: apps.round_trip_error(model, x, steps=jumps))(points)
    return jnp.mean(jnp.linalg.norm(errors, axis=1))


FLOPS = {}


def likelihood(model, flow, points):
    exact_map = isinstance(model, fmcalc.flows.AbstractFlow)
    exact = np.asarray(jax.vmap(flow.log_prob)(points))
    rows = []
    for k in JUMPS:
        got = _log_likelihoods(model, points, k)
        if not exact_map and k not in FLOPS:  # the same for every trained MLP
            FLOPS[k] = fmcalc.cost.flops(
                lambda m, x, k=k: apps.log_likelihood(m, x, steps=k), model, points[0]
            )
        rows.append(
            {
                "jumps": k,
                "error": float(np.mean(np.abs(np.asarray(got) - exact))),
                "round_trip": float(_round_trips(model, points, k)),
                "flops": None if exact_map else FLOPS[k],
            }
        )
    velocity = flow.velocity if exact_map else fmcalc.model_velocity(model)
    ode = _ode_log_likelihoods(velocity, points)
    if not exact_map and "ODE" not in FLOPS:
        FLOPS["ODE"] = ode_cost(velocity, points[0])
    rows.append(
        {
            "jumps": "ODE",
            "error": float(np.mean(np.abs(np.asarray(ode) - exact))),
            "round_trip": None,
            "flops": None if exact_map else FLOPS["ODE"],
        }
    )
    print(f"  likelihood: {[round(r['error'], 4) for r in rows]}", flush=True)
    return rows


def run(args) -> dict:
    data = datasets.anisotropic()
    flow = flow64 = data.flow
    reward = apps.QuadraticReward(jnp.eye(2), jnp.asarray(CENTER))
    results = {"steering": [], "likelihood": [], "bias": []}
    start = time.time()
    for seed in args.seeds:
        points = flow.sample(jax.random.key(4000 + seed), args.points)
        models = {"exact": flow}
        for method in METHODS:
            t0 = time.time()
            models[method] = train(method, flow, seed, args.steps)
            print(f"seed {seed} {method}: trained in {time.time() - t0:.0f} s")
        for name, model in models.items():
            print(f"seed {seed} {name}", flush=True)
            for row in steering(model, flow64, reward, seed, args.samples):
                results["steering"].append({"map": name, "seed": seed, **row})
            for row in lookahead_bias(model, flow, reward, seed):
                results["bias"].append({"map": name, "seed": seed, **row})
            for row in likelihood(model, flow, points):
                results["likelihood"].append({"map": name, "seed": seed, **row})
    results["record"] = {
        "command": "python " + " ".join(sys.argv),
        "seconds": time.time() - start,
        "settings": {
            "seeds": args.seeds,
            "training_steps": args.steps,
            "samples": args.samples,
            "likelihood_points": args.points,
            "strengths": STRENGTHS,
            "center": CENTER,
            "steps": STEPS,
            "langevin_steps": LANGEVIN,
        },
        "machine": machine(),
    }
    return results


def _mean_range(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    mean = float(np.mean(values))
    if min(values) == max(values):
        return f"{mean:.3g}"
    return f"{mean:.3g} ({min(values):.3g} to {max(values):.3g})"


def render(results: dict, out: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    record = results["record"]
    seeds = record["settings"]["seeds"]
    footer = f"\nMean over seeds {seeds} (range in brackets). {provenance(record)}\n"
    rows = results["steering"]
    maps = list(dict.fromkeys(r["map"] for r in rows))
    names = list(dict.fromkeys(r["strategy"] for r in rows))
    lines = [
        "![Steered samples of the exact map over the tilted density, "
        f"λ = {record['settings']['strengths'][-1]:g}](steering.png)",
        "",
    ]
    for strength in record["settings"]["strengths"]:
        exact = [
            r["exact_reward"]
            for r in rows
            if r["strength"] == strength and r["map"] == "exact"
        ]
        lines += [
            f"**λ = {strength:g}** (mean reward under the tilt, closed form: "
            f"{_mean_range(exact)})",
            "",
            "| map | strategy | energy distance | mean reward | component mass "
            "error | model calls per sample | ms per sample |",
            "|---|---|---|---|---|---|---|",
        ]
        for m in maps:
            for name in names:
                picked = [
                    r
                    for r in rows
                    if r["map"] == m
                    and r["strategy"] == name
                    and r["strength"] == strength
                ]
                lines.append(
                    f"| {m} | {name} | {_mean_range([r['energy'] for r in picked])} | "
                    f"{_mean_range([r['reward'] for r in picked])} | "
                    f"{_mean_range([r['mass'] for r in picked])} | "
                    f"{picked[0]['calls']} | "
                    f"{_mean_range([1e3 * r['seconds_per_sample'] for r in picked])} |"
                )
        lines.append("")
    bias = results["bias"]
    times = list(dict.fromkeys(r["t"] for r in bias))
    lines += [
        "**Look-ahead as a reward estimate**: `r(x̂0(x_t, t)) - E[r(x0) | x_t]` "
        "against the exact posterior expectation (`fmcalc.apps.expected_reward`), "
        "over `x_t ~ p_t`: its mean (the bias) / its mean absolute value (the "
        "error at a point).",
        "",
        "| map | look-ahead | " + " | ".join(f"t = {t:g}" for t in times) + " |",
        "|---|---|" + "---|" * len(times),
    ]
    for m in maps:
        for name in dict.fromkeys(r["lookahead"] for r in bias):
            picked = [
                [
                    r
                    for r in bias
                    if r["map"] == m and r["lookahead"] == name and r["t"] == t
                ]
                for t in times
            ]
            cells = [
                f"{np.mean([r['bias'] for r in p]):.3g} / "
                f"{np.mean([r['abs_error'] for r in p]):.3g}"
                for p in picked
            ]
            lines.append(f"| {m} | {name} | " + " | ".join(cells) + " |")
    lines.append("")
    (out / "steering.md").write_text("\n".join(lines) + footer)

    rows = results["likelihood"]
    maps = list(dict.fromkeys(r["map"] for r in rows))
    jumps = list(dict.fromkeys(r["jumps"] for r in rows))
    lines = [
        "| map | "
        + " | ".join(
            f"{j} jump{'s' if j != 1 else ''}" if j != "ODE" else "ODE" for j in jumps
        )
        + " |",
        "|---|" + "---|" * len(jumps),
    ]
    for m in maps:
        cells = [
            _mean_range([r["error"] for r in rows if r["map"] == m and r["jumps"] == j])
            for j in jumps
        ]
        lines.append(f"| {m}: mean abs. error | " + " | ".join(cells) + " |")
        cells = [
            _mean_range([r["flops"] for r in rows if r["map"] == m and r["jumps"] == j])
            for j in jumps
        ]
        if m != "exact":
            lines.append(f"| {m}: FLOPs per example | " + " | ".join(cells) + " |")
    figure = "![Likelihood error against the number of jumps](likelihood.png)\n\n"
    (out / "likelihood.md").write_text(figure + "\n".join(lines) + "\n" + footer)

    steps = [j for j in jumps if j != "ODE"]
    lines = [
        "![Interpolation through noise space with the exact map](inversion.png)",
        "",
        "| map | "
        + " | ".join(f"{j} jump{'s' if j != 1 else ''}" for j in steps)
        + " |",
        "|---|" + "---|" * len(steps),
    ]
    for m in maps:
        cells = [
            _mean_range(
                [r["round_trip"] for r in rows if r["map"] == m and r["jumps"] == j]
            )
            for j in steps
        ]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    (out / "inversion.md").write_text("\n".join(lines) + "\n" + footer)

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for m in maps:
        xs = [j for j in jumps if j != "ODE"]
        ys = [
            np.mean([r["error"] for r in rows if r["map"] == m and r["jumps"] == j])
            for j in xs
        ]
        ax.plot(xs, ys, marker="o", label=m)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("jumps K")
    ax.set_ylabel("mean |log-likelihood error|")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "likelihood.png", dpi=110)


def _density(flow, box=(-5.0, 5.0, -5.0, 5.0), n=150):
    xx, yy = np.meshgrid(np.linspace(*box[:2], n), np.linspace(*box[2:], n))
    points = jnp.asarray(np.stack([xx.ravel(), yy.ravel()], 1), jnp.float32)
    return xx, yy, np.exp(np.asarray(jax.vmap(flow.log_prob)(points))).reshape(xx.shape)


def figures(out: pathlib.Path) -> None:
    """Steered samples of the exact map over the tilted density (the larger
    strength, seed 0), and an interpolation through noise space with the exact map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flow = datasets.anisotropic().flow
    reward = apps.QuadraticReward(jnp.eye(2), jnp.asarray(CENTER))
    strength = STRENGTHS[-1]
    if not FIGURE:  # as in `steering`, seed 0: the same samples
        noise = jax.random.normal(jax.random.key(2000), (1000, 2), jnp.float32)
        for name, samples, _, _ in strategies(
            flow, reward, strength, noise, jax.random.key(3000)
        ):
            FIGURE[(strength, name)] = samples
    names = [name for (s, name) in FIGURE if s == strength]
    tilted = apps.tilt(flow, reward, strength)
    box = (-3.0, 3.0, -2.0, 4.0)
    xx, yy, density = _density(tilted, box)
    fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names), 2.9))
    for ax, name in zip(axes, names, strict=True):
        samples = FIGURE[(strength, name)][:400]
        ax.contourf(xx, yy, np.sqrt(density), levels=12, cmap="Greys")
        ax.scatter(samples[:, 0], samples[:, 1], s=2, c="tab:orange", alpha=0.5)
        ax.set_title(name, fontsize=7)
        ax.set_xlim(box[:2])
        ax.set_ylim(box[2:])
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(out / "steering.png", dpi=110)

    x_a, x_b = jnp.asarray([-2.5, 0.0]), jnp.asarray([2.0, -2.0])
    weights = jnp.linspace(0, 1, 25)
    through_noise = apps.interpolation(flow, x_a, x_b, weights)
    straight = (1 - weights[:, None]) * x_a[None, :] + weights[:, None] * x_b[None, :]
    xx, yy, density = _density(flow)
    fig, ax = plt.subplots(figsize=(3.6, 3.4))
    ax.contourf(xx, yy, density, levels=12, cmap="Greys")
    ax.plot(straight[:, 0], straight[:, 1], "--", c="tab:blue", label="straight line")
    ax.plot(
        through_noise[:, 0],
        through_noise[:, 1],
        "o-",
        ms=3,
        c="tab:orange",
        label="slerp in noise, decoded",
    )
    ax.legend(fontsize=7, loc="lower left")
    ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(out / "inversion.png", dpi=110)


def main():
    args = parse()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not (args.render or args.figures):
        results = run(args)
        (out / "apps.json").write_text(json.dumps(results, indent=1))
    if not args.render:
        figures(out)
    render(json.loads((out / "apps.json").read_text()), out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
