"""Interpolation between two digits through noise space, with flow maps trained by
registry methods on the scikit-learn digits, and the round-trip error of their
inverse maps.

```
python benchmarks/interpolation.py [--steps 6000] [--out benchmarks/results/apps]
python benchmarks/interpolation.py --quick     # a smoke run: tiny training
python benchmarks/interpolation.py --render    # only redraw from the JSON
```

**Data.** `fmcalc.datasets.digits()`: 1797 images of 8×8 pixels scaled to
`[-1, 1]`, flattened to `dim = 64`, unconditional (the labels only pick the two
images to interpolate).

**Maps.** MLPs trained with [`fmcalc.train.fit`][] by two registry methods that need
no teacher: `fmm` (flow map matching, times drawn on the whole square, so it learns
`F(x, s, t)` for `t > s` too and can encode data to noise) and `lsd` (Lagrangian
self-distillation, trained on `t < s` only: its encoder is learned only through its
velocity). The CLI's network and schedule for small images: 4 hidden layers of 256,
Adam with a cosine decay from 2e-3, an EMA whose horizon is a tenth of the run.

**Interpolation.** Encode two digits of different classes with
[`fmcalc.invert`][] (`F(x, 0, 1)` for one jump), interpolate their noises, decode
each interpolant with [`fmcalc.sample`][]. Rows of the figure: the straight line in
pixel space; spherical interpolation ([`fmcalc.apps.slerp`][], Shoemake 1985) of
the noises decoded by each map with 1 and 2 jumps each way; and the straight line
between the noises, decoded with 2 jumps, for contrast. A Gaussian noise of
dimension `d` has norm close to `√d`; the midpoint of the straight line between
two nearly orthogonal noises has norm close to `√(d/2)`, noise the map rarely saw,
while the great circle keeps the norm of its ends (as DDIM, Song et al. 2021,
interpolates its latents, following White 2016). The JSON records the norms at the
ends and at both midpoints.

**Round trip.** `sample(invert(x)) - x` ([`fmcalc.apps.round_trip_error`][]) on
training images (the first `--images` of a fixed permutation), with 1, 2, 4 and 8
jumps each way; reported as the RMS per pixel, beside the RMS per
pixel between two random digits for scale.

Writes `interpolation.json` (every number, the command, the commit, the machine and
the time taken), `interpolation.md` and `interpolation.png`, all generated from the
JSON.
"""

import argparse
import json
import pathlib
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _machine import machine, provenance

import fmcalc
import fmcalc.nn
from fmcalc import apps


METHODS = ("fmm", "lsd")
JUMPS = (1, 2, 4, 8)
PAIR = (0, 7)  # the classes of the two images: the first of each in the set
COLUMNS = 9


def parse():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6000, help="training steps")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--images", type=int, default=256, help="round-trip images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/apps")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--render", action="store_true", help="only re-render")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.images = 200, 32
    return args


def train(method: str, data, seed: int, steps: int, batch_size: int):
    net = fmcalc.nn.MLP(data.dim, width=256, depth=4, key=jax.random.key(100 + seed))
    result = fmcalc.train.fit(
        fmcalc.methods.get(method),
        net,
        data.rows,
        key=jax.random.key(seed),
        steps=steps,
        batch_size=batch_size,
        optimizer=optax.adam(optax.cosine_decay_schedule(2e-3, steps, alpha=0.01)),
        ema=fmcalc.train.EMA(horizon=0.1),  # the default, named as the docstring has it
        options=fmcalc.train.Options(progress=False),
    )
    return result.ema


@eqx.filter_jit
def _round_trips(model, images, jumps):
    errors = jax.vmap(lambda x: apps.round_trip_error(model, x, steps=jumps))(images)
    return jnp.sqrt(jnp.mean(errors**2, axis=1))  # RMS per pixel, per image


@eqx.filter_jit
def _through_noise(model, x_a, x_b, weights, jumps, spherical):
    noise_a = fmcalc.invert(model, x_a, steps=jumps)
    noise_b = fmcalc.invert(model, x_b, steps=jumps)

    def one(w):
        if spherical:
            z = apps.slerp(noise_a, noise_b, w)
        else:
            z = (1 - w) * noise_a + w * noise_b
        return fmcalc.sample(model, z, steps=jumps), jnp.linalg.norm(z)

    return jax.vmap(one)(weights)


def rows_of_figure(model, name, x_a, x_b, weights):
    """The figure's decoded rows for one map, with the norms of their noises."""
    out = []
    for jumps, spherical in ((1, True), (2, True), (2, False)):
        images, norms = _through_noise(model, x_a, x_b, weights, jumps, spherical)
        how = "slerp" if spherical else "straight line"
        out.append(
            {
                "map": name,
                "label": f"{name}: {how} in noise, {jumps} jump{'s' * (jumps > 1)}",
                "jumps": jumps,
                "spherical": spherical,
                "images": np.asarray(images).tolist(),
                "noise_norms": np.asarray(norms).tolist(),
            }
        )
    return out


def noise_norms(figure: list[dict], dim: int) -> dict:
    """Norms of the interpolated noises, averaged over the decoded rows: at the two
    ends (the encoded digits), halfway along the great circle and halfway along the
    straight line, beside the typical norm `√dim` of a Gaussian noise."""
    straight = [r for r in figure if r.get("spherical") is False]
    spherical = [r for r in figure if r.get("spherical") is True]
    middle = len(figure[0]["images"]) // 2
    return {
        "typical": float(np.sqrt(dim)),
        "ends": float(
            np.mean([r["noise_norms"][i] for r in spherical for i in (0, -1)])
        ),
        "midpoint_slerp": float(np.mean([r["noise_norms"][middle] for r in spherical])),
        "midpoint_straight": float(
            np.mean([r["noise_norms"][middle] for r in straight])
        ),
    }


def run(args) -> dict:
    data = fmcalc.datasets.digits()
    start = time.time()
    order = np.asarray(jax.random.permutation(jax.random.key(7), len(data.rows)))
    images = jnp.asarray(data.rows[order[: args.images]])
    firsts = [int(np.flatnonzero(data.labels == c)[0]) for c in PAIR]
    x_a, x_b = (jnp.asarray(data.rows[i]) for i in firsts)
    weights = jnp.linspace(0, 1, COLUMNS)
    other = jnp.asarray(data.rows[order[args.images : 2 * args.images]])
    scale = float(jnp.mean(jnp.sqrt(jnp.mean((images - other) ** 2, axis=1))))
    results = {
        "round_trip": [],
        "figure": [
            {
                "map": "pixels",
                "label": "straight line in pixel space",
                "images": np.asarray(
                    (1 - weights[:, None]) * x_a + weights[:, None] * x_b
                ).tolist(),
            }
        ],
        "training_seconds": {},
    }
    for method in METHODS:
        t0 = time.time()
        model = train(method, data, args.seed, args.steps, args.batch_size)
        model = jax.block_until_ready(model)
        results["training_seconds"][method] = time.time() - t0
        print(f"{method}: trained in {time.time() - t0:.0f} s", flush=True)
        for k in JUMPS:
            rms = np.asarray(_round_trips(model, images, k))
            results["round_trip"].append(
                {
                    "map": method,
                    "jumps": k,
                    "rms_per_pixel": float(np.mean(rms)),
                    "rms_per_pixel_max": float(np.max(rms)),
                }
            )
            print(f"  {k} jumps: RMS per pixel {np.mean(rms):.4f}", flush=True)
        results["figure"] += rows_of_figure(model, method, x_a, x_b, weights)
    results["noise_norm"] = noise_norms(results["figure"], data.dim)
    results["record"] = {
        "command": "python " + " ".join(sys.argv),
        "seconds": time.time() - start,
        "settings": {
            "seed": args.seed,
            "training_steps": args.steps,
            "batch_size": args.batch_size,
            "round_trip_images": args.images,
            "pair_classes": PAIR,
            "pair_indices": firsts,
            "weights": np.asarray(weights).tolist(),
            "network": "MLP, 4 hidden layers of 256",
        },
        "rms_between_digits": scale,
        "machine": machine(),
    }
    return results


def render(results: dict, out: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    record = results["record"]
    settings = record["settings"]
    footer = (
        f"\nSeed {settings['seed']}, {settings['training_steps']} training steps of "
        f"{settings['batch_size']} images per map; round trip over "
        f"{settings['round_trip_images']} images. {provenance(record)}\n"
    )
    rows = results["round_trip"]
    maps = list(dict.fromkeys(r["map"] for r in rows))
    jumps = list(dict.fromkeys(r["jumps"] for r in rows))
    norms = results["noise_norm"]
    lines = [
        "![Digits interpolated through noise space](interpolation.png)",
        "",
        "Round trip `sample(invert(x)) - x`, RMS per pixel (pixels in [-1, 1]): mean "
        "over images / worst image. For scale, the RMS per pixel between two random "
        f"digits is {record['rms_between_digits']:.3g}.",
        "",
        "| map | "
        + " | ".join(f"{j} jump{'s' if j != 1 else ''}" for j in jumps)
        + " |",
        "|---|" + "---|" * len(jumps),
    ]
    for m in maps:
        cells = [
            f"{r['rms_per_pixel']:.3g} / {r['rms_per_pixel_max']:.3g}"
            for j in jumps
            for r in rows
            if r["map"] == m and r["jumps"] == j
        ]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Norm of the noise, mean over the decoded rows: "
        f"{norms['ends']:.3g} at the two encoded digits; halfway between them, "
        f"{norms['midpoint_slerp']:.3g} along the great circle and "
        f"{norms['midpoint_straight']:.3g} on the straight line (a Gaussian noise of "
        f"this dimension: about {norms['typical']:.3g}).",
        "",
    ]
    (out / "interpolation.md").write_text("\n".join(lines) + footer)

    figure = results["figure"]
    n = len(figure[0]["images"])
    fig, axes = plt.subplots(
        len(figure), n, figsize=(0.62 * n + 2.6, 0.66 * len(figure)), squeeze=False
    )
    for row, (entry, line) in enumerate(zip(figure, axes, strict=True)):
        for col, ax in enumerate(line):
            image = np.asarray(entry["images"][col]).reshape(8, 8)
            ax.imshow(np.clip(image, -1, 1), cmap="gray_r", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == len(figure) - 1:
                ax.set_xlabel(f"{settings['weights'][col]:.3g}", fontsize=7)
        line[0].set_ylabel(
            entry["label"], rotation=0, ha="right", va="center", fontsize=7
        )
    fig.subplots_adjust(left=0.28, right=0.99, top=0.99, bottom=0.08, wspace=0.05)
    fig.savefig(out / "interpolation.png", dpi=110)


def main():
    args = parse()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.render:
        results = run(args)
        (out / "interpolation.json").write_text(json.dumps(results, indent=1))
    render(json.loads((out / "interpolation.json").read_text()), out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
