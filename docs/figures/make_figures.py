"""Draw the pictures of the concept pages from exact flows.

python docs/figures/make_figures.py [--out DIR]

Every path is the exact probability-flow ODE of a Gaussian mixture
(`fmcalc.flows.GaussianMixture.flow_map`, a float64 diffrax solve); every jump is
the exact flow map between two times of the same path.
"""

import argparse
import pathlib

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

import fmcalc


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


jax.config.update("jax_enable_x64", True)
HERE = pathlib.Path(__file__).resolve().parent
TIMES = np.linspace(1.0, 0.0, 81)
GREY, BLUE, ORANGE, GREEN = "0.75", "#1f77b4", "#ff7f0e", "#2ca02c"


def mixture_1d() -> fmcalc.flows.GaussianMixture:
    return fmcalc.flows.GaussianMixture(
        jnp.array([0.35, 0.65]),
        jnp.array([[-1.5], [1.2]]),
        jnp.array([[[0.05]], [[0.08]]]),
    )


def mixture_2d() -> fmcalc.flows.GaussianMixture:
    angles = jnp.array([0.3, 2.4, 4.3])
    means = 2.5 * jnp.stack([jnp.cos(angles), jnp.sin(angles)], axis=1)
    return fmcalc.flows.GaussianMixture(
        jnp.array([0.3, 0.3, 0.4]), means, jnp.tile(0.03 * jnp.eye(2), (3, 1, 1))
    )


def paths(flow, noise: jnp.ndarray) -> np.ndarray:
    """`(n, len(TIMES), dim)`: each noise's path, `x_t = F(noise, 1, t)`."""
    one = jax.vmap(lambda x, t: flow.flow_map(x, 1.0, t), in_axes=(None, 0))
    return np.asarray(jax.jit(jax.vmap(one, in_axes=(0, None)))(noise, TIMES))


def at(path: np.ndarray, t: float) -> np.ndarray:
    return path[int(round((1 - t) * (len(TIMES) - 1)))]


def jumps_figure(out: pathlib.Path) -> None:
    """Paths of a 1-D and a 2-D mixture, with a flow map's jumps along them."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    flow = mixture_1d()
    noise = jnp.linspace(-2.2, 2.2, 23)[:, None]
    xs = paths(flow, noise)[..., 0]
    for x in xs:
        left.plot(TIMES, x, color=GREY, lw=0.8)
    for i, grid in ((4, (1.0, 0.0)), (10, (1.0, 0.5, 0.0)), (13, (1.0, 0.7, 0.3, 0.0))):
        stops = [at(xs[i], t) for t in grid]
        left.plot(grid, stops, "o-", lw=1.6, ms=4, label=f"{len(grid) - 1} jump(s)")
    left.set_xlim(1.02, -0.02)
    left.set_xlabel("time t (1 = noise, 0 = data)")
    left.set_ylabel("x")
    left.set_title("F(x_s, s, t) jumps along a path: 1-D mixture", fontsize=10)
    left.legend(fontsize=8, loc="lower left")

    flow = mixture_2d()
    noise = jax.random.normal(jax.random.key(3), (30, 2))
    ps = paths(flow, noise)
    for p in ps:
        right.plot(p[:, 0], p[:, 1], color=GREY, lw=0.8)
    right.scatter(ps[:, 0, 0], ps[:, 0, 1], s=10, color="0.55", label="noise, t = 1")
    right.scatter(ps[:, -1, 0], ps[:, -1, 1], s=10, color="k", label="data, t = 0")
    # The most curved paths show the jumps best.
    bend = np.linalg.norm(ps[:, 40] - (ps[:, 0] + ps[:, -1]) / 2, axis=1)
    for i in np.argsort(bend)[-3:]:
        a, b, c = at(ps[i], 1.0), at(ps[i], 0.5), at(ps[i], 0.0)
        right.plot(ps[i][:, 0], ps[i][:, 1], color="k", lw=1.2)
        arrow = {"arrowstyle": "-|>", "lw": 1.5, "mutation_scale": 12}
        right.annotate("", c, a, arrowprops={**arrow, "color": ORANGE})
        for p, q in ((a, b), (b, c)):
            right.annotate("", q, p, arrowprops={**arrow, "color": BLUE})
    right.plot([], [], color=ORANGE, label="F(x, 1, 0): one jump")
    right.plot([], [], color=BLUE, label="F(x, 1, ½), F(·, ½, 0): two jumps")
    right.set_aspect("equal")
    right.set_title("probability-flow paths of a 2-D mixture", fontsize=10)
    right.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "jumps.png", dpi=110)
    plt.close(fig)


def rules_figure(out: pathlib.Path) -> None:
    """The three consistency rules, each on one path of the 1-D mixture."""
    flow = mixture_1d()
    noise = jnp.linspace(-2.2, 2.2, 23)[:, None]
    xs = paths(flow, noise)[..., 0]
    # The most curved path shows the rules best.
    bend = np.abs(xs[:, 40] - (xs[:, 0] + xs[:, -1]) / 2)
    path = xs[int(np.argmax(bend))]
    s, u, t = 0.95, 0.5, 0.1
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), sharey=True)
    for ax in axes:
        for x in xs:
            ax.plot(TIMES, x, color=GREY, lw=0.6)
        ax.plot(TIMES, path, color="k", lw=1.2)
        ax.set_xlim(1.02, -0.02)
        ax.set_xlabel("time")

    ax = axes[0]
    ax.plot([s, t], [at(path, s), at(path, t)], "o-", color=ORANGE, label="F(x, s, t)")
    ax.plot(
        [s, u, t],
        [at(path, s), at(path, u), at(path, t)],
        "o--",
        color=BLUE,
        label="F(F(x, s, u), u, t)",
    )
    ax.set_title("compositional: two jumps = one jump", fontsize=10)

    ax = axes[1]
    end = at(path, t)
    slope = float(flow.velocity(jnp.array([end]), t)[0])
    dt = 0.12
    ax.plot([s, t], [at(path, s), end], "o-", color=ORANGE, label="F(x, s, t)")
    ax.plot(
        [t + dt, t - dt],
        [end + dt * slope, end - dt * slope],
        color=GREEN,
        lw=2,
        label="∂_t F = v(F(x, s, t), t)",
    )
    ax.set_title("Lagrangian: the end moves with the flow", fontsize=10)

    ax = axes[2]
    for source, color in ((s, ORANGE), (0.6, BLUE)):
        ax.plot(
            [source, t],
            [at(path, source), at(path, t)],
            "o-",
            color=color,
            label=f"F(x_s, s, t), s = {source}",
        )
    ax.set_title("Eulerian: a source on the path, the same end", fontsize=10)
    for ax in axes:
        ax.legend(fontsize=7, loc="lower left")
    axes[0].set_ylabel("x")
    fig.tight_layout()
    fig.savefig(out / "rules.png", dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=HERE)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    jumps_figure(args.out)
    rules_figure(args.out)
    print(f"wrote {args.out / 'jumps.png'} and {args.out / 'rules.png'}")


if __name__ == "__main__":
    main()
