"""Which look-ahead steers better, the flow map's jump or Tweedie's denoiser, and at
what price: gradient steering with the exact map on two mixtures, at two strengths
and two numbers of Langevin moves, over seeds.

```
python benchmarks/lookahead.py [--seeds 0 1 2] [--samples 1000] [--out DIR]
python benchmarks/lookahead.py --render      # re-render the report from its JSON
```

**Set-up.** Two 2-d Gaussian mixtures: `aniso2d` (four unequal, elongated
components) and `fmcalc.testing.asymmetric_mixture(broad=True)` (three), each with
the quadratic reward `r(x) = -‖x - c‖² / 2` at `λ = 1` and `λ = 4`. The model is the
exact flow, its map solved in fixed RK4 steps, so that only the look-ahead differs:
[`fmcalc.apps.steer`][] with 4 jumps and 8 or 32 Langevin moves per jump, with
[`fmcalc.apps.FlowMapLookahead`][] or [`fmcalc.apps.TweedieLookahead`][], from the
same noise and Langevin keys.

**Measures.** The energy distance of the steered samples to exact samples of the
tilted mixture ([`fmcalc.apps.tilt`][]), beside the distance between two exact sample
sets of the same sizes (the Monte Carlo floor); the mean reward against its exact
value; the share of samples farther than 3 standard deviations from every tilted
component (outliers); and the wall time per sample.

**Comparison.** Per cell (mixture, strength, moves) the seeds share noise, so the
look-aheads are compared seed by seed: the flow map is called better in a cell when
its energy distance is lower on every seed, worse when higher on every seed, and
tied otherwise.

Writes `lookahead.json` (every number, the command, the commit and the machine) and
`lookahead.md`, rendered from the JSON alone.
"""

import argparse
import json
import pathlib
import sys
import time

import _datasets as datasets
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from _machine import clean_machine, provenance
from _metrics import energy_distance

import fmcalc
from fmcalc import apps


OUT = pathlib.Path(__file__).resolve().parent / "results" / "lookahead"
STRENGTHS = (1.0, 4.0)
MOVES = (8, 32)
JUMPS = 4
RK4_STEPS = 64
LOOKAHEADS = {"flow map": apps.FlowMapLookahead(), "Tweedie": apps.TweedieLookahead()}


def _covs(flow) -> jax.Array:
    return jnp.einsum("kij,kj,klj->kil", flow.eigvecs, flow.eigvals, flow.eigvecs)


def _fixed_steps(flow) -> fmcalc.flows.GaussianMixture:
    """The same mixture with its map in `RK4_STEPS` fixed steps."""
    return fmcalc.flows.GaussianMixture(
        flow.weights, flow.means, _covs(flow), steps=RK4_STEPS
    )


def mixtures() -> dict[str, tuple[fmcalc.flows.GaussianMixture, tuple]]:
    """The flows and their rewards' centres (between components, so that the tilt
    moves mass from one to another)."""
    return {
        "aniso2d": (_fixed_steps(datasets.anisotropic().flow), (0.5, 2.5)),
        "asymmetric (3 components)": (
            _fixed_steps(fmcalc.testing.asymmetric_mixture(broad=True)),
            (0.8, 1.2),
        ),
    }


@eqx.filter_jit
def _steer(model, reward, strength, noise, keys, lookahead, moves):
    return jax.vmap(
        lambda e, k: apps.steer(
            model, reward, e, key=k, strength=strength, lookahead=lookahead,
            steps=JUMPS, langevin_steps=moves,
        )
    )(noise, keys)  # fmt: skip


def outliers(samples: np.ndarray, target) -> float:
    """The share of samples farther than 3 standard deviations (Mahalanobis) from
    every component of `target`."""
    covs = np.asarray(_covs(target), np.float64)
    means = np.asarray(target.means, np.float64)
    gaps = samples[:, None, :] - means[None]
    inverse = np.linalg.inv(covs)
    distance = np.sqrt(np.einsum("nki,kij,nkj->nk", gaps, inverse, gaps))
    return float(np.mean(distance.min(axis=1) > 3.0))


def measure(seeds, n: int) -> list[dict]:
    rows = []
    for name, (flow, centre) in mixtures().items():
        reward = apps.QuadraticReward(jnp.eye(2), jnp.asarray(centre))
        for strength in STRENGTHS:
            target = apps.tilt(flow, reward, strength)
            exact_reward = float(
                apps.expected_reward(target, reward, jnp.zeros(2), 1.0)
            )
            for seed in seeds:
                exact = np.asarray(target.sample(jax.random.key(1000 + seed), n))
                other = np.asarray(target.sample(jax.random.key(5000 + seed), n))
                floor = energy_distance(other, exact)
                exact_outliers = outliers(other, target)
                noise = jax.random.normal(jax.random.key(2000 + seed), (n, 2))
                keys = jax.random.split(jax.random.key(3000 + seed), n)
                for moves in MOVES:
                    for label, lookahead in LOOKAHEADS.items():
                        args = (flow, reward, strength, noise, keys, lookahead, moves)
                        _steer(*args).block_until_ready()  # compile
                        start = time.perf_counter()
                        samples = np.asarray(_steer(*args).block_until_ready())
                        seconds = time.perf_counter() - start
                        rewards = jax.vmap(reward)(jnp.asarray(samples))
                        rows.append(
                            {
                                "mixture": name,
                                "strength": strength,
                                "moves": moves,
                                "lookahead": label,
                                "seed": seed,
                                "energy": energy_distance(samples, exact),
                                "floor": floor,
                                "reward": float(np.mean(np.asarray(rewards))),
                                "exact_reward": exact_reward,
                                "outliers": outliers(samples, target),
                                "exact_outliers": exact_outliers,
                                "seconds_per_sample": seconds / n,
                            }
                        )
                        print(
                            f"{name} λ={strength} moves={moves} {label} seed {seed}: "
                            f"{rows[-1]['energy']:.4f}",
                            flush=True,
                        )
    return rows


def verdict(flow_map: list[float], tweedie: list[float]) -> str:
    """Seed by seed (paired): `better` if the flow map's energy distance is lower on
    every seed, `worse` if higher on every seed, else `tied`."""
    if len(flow_map) != len(tweedie) or not flow_map:
        raise ValueError("the two look-aheads need the same seeds, at least one.")
    if all(a < b for a, b in zip(flow_map, tweedie, strict=True)):
        return "better"
    if all(a > b for a, b in zip(flow_map, tweedie, strict=True)):
        return "worse"
    return "tied"


def _mean_range(values: list[float], digits: str = ".4f") -> str:
    return (
        f"{np.mean(values):{digits}} [{min(values):{digits}}, {max(values):{digits}}]"
    )


def render(found: dict, out: pathlib.Path) -> str:
    rows, record = found["rows"], found["record"]
    cells = dict.fromkeys((r["mixture"], r["strength"], r["moves"]) for r in rows)
    seeds = sorted({r["seed"] for r in rows})
    lines = [
        "Gradient steering with the exact map (4 jumps), flow-map against Tweedie "
        f"look-ahead, {len(seeds)} seeds sharing noise "
        "(`benchmarks/lookahead.py`). Energy distance to exact tilted samples: "
        "mean [min, max] over seeds; the floor is that of two exact sample sets. "
        "Flow map better / worse: lower / higher on every seed, else tied.",
        "",
        "| mixture | λ | moves | flow map | Tweedie | floor | flow map is "
        "| mean reward, flow map / Tweedie / exact | outliers, flow map / Tweedie / "
        "exact "
        "| time, flow map / Tweedie |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    tally = {"better": 0, "worse": 0, "tied": 0}
    for mixture, strength, moves in cells:
        mine = [
            r
            for r in rows
            if (r["mixture"], r["strength"], r["moves"]) == (mixture, strength, moves)
        ]
        by = {
            label: sorted((r for r in mine if r["lookahead"] == label),
                          key=lambda r: r["seed"])
            for label in LOOKAHEADS
        }  # fmt: skip
        energy = {k: [r["energy"] for r in v] for k, v in by.items()}
        outcome = verdict(energy["flow map"], energy["Tweedie"])
        tally[outcome] += 1
        reward = {k: np.mean([r["reward"] for r in v]) for k, v in by.items()}
        far = {k: max(r["outliers"] for r in v) for k, v in by.items()}
        far["exact"] = max(r["exact_outliers"] for r in by["flow map"])
        time_ratio = np.mean([r["seconds_per_sample"] for r in by["flow map"]]) / (
            np.mean([r["seconds_per_sample"] for r in by["Tweedie"]])
        )
        lines.append(
            f"| {mixture} | {strength:g} | {moves} | {_mean_range(energy['flow map'])} "
            f"| {_mean_range(energy['Tweedie'])} "
            f"| {np.mean([r['floor'] for r in by['flow map']]):.4f} | {outcome} "
            f"| {reward['flow map']:.3f} / {reward['Tweedie']:.3f} / "
            f"{mine[0]['exact_reward']:.3f} "
            f"| {far['flow map']:.3f} / {far['Tweedie']:.3f} / {far['exact']:.3f} "
            f"| {time_ratio:.1f}x |"
        )
    lines += [
        "",
        f"Over the {len(cells)} cells the flow-map look-ahead is better in "
        f"{tally['better']}, worse in {tally['worse']} and tied in {tally['tied']}. "
        "Outliers: the largest share over seeds of samples more than 3 standard "
        "deviations from every tilted component (exact: of exact samples, which "
        "have some). Time: the flow map's wall time per "
        "sample over Tweedie's.",
        "",
        provenance(record),
    ]
    text = "\n".join(lines) + "\n"
    (out / "lookahead.md").write_text(text)
    return text


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--out", type=pathlib.Path, default=OUT)
    parser.add_argument("--render", action="store_true")
    parser.add_argument(
        "--allow-dirty",
        action="store_true",
        help="measure from a working tree with uncommitted changes (recorded)",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "lookahead.json"
    if args.render:
        found = json.loads(path.read_text())
    else:
        found_machine = clean_machine(args.allow_dirty)
        jax.config.update("jax_enable_x64", True)
        start = time.time()
        rows = measure(args.seeds, args.samples)
        command = "python benchmarks/lookahead.py " + " ".join(sys.argv[1:])
        found = {
            "rows": rows,
            "record": {
                "command": command.strip(),
                "seconds": time.time() - start,
                "settings": {
                    "seeds": args.seeds,
                    "samples": args.samples,
                    "strengths": STRENGTHS,
                    "moves": MOVES,
                    "jumps": JUMPS,
                    "rk4_steps": RK4_STEPS,
                },
                "machine": found_machine,
            },
        }
        path.write_text(json.dumps(found, indent=1) + "\n")
    print(render(found, args.out))


if __name__ == "__main__":
    sys.exit(main())
