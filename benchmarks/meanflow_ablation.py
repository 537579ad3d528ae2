"""Why MeanFlow misses the few-step bars: its velocity, its stop-gradient and its
time sampling, changed one at a time.

MeanFlow's residual is the Eulerian rule in `V` form with the whole target under a
stop-gradient, `R = V(x, s, t) - sg[v + (t - s) D[V](x, s, t)·(v, 1, 0)]`, fed the
conditional velocity `v = eps - x0`. Each row below is that residual (plain squared
error, so the fixed point is the exact map on any data) with one or more of:

- `v`: the conditional velocity (`cond`) or the exact marginal velocity of the
  mixture (`exact`, a distillation);
- the stop-gradient: on the whole target (`sg`, MeanFlow's) or nowhere (`full`,
  the residual's true gradient; biased with `eps - x0`, so `fmcalc` refuses to
  build it with the conditional velocity);
- times: MeanFlow's ImageNet sampler (sorted logit-normal(-0.4, 1) pair, 75 % of
  rows `t = s`, `mf`) or uniform on the triangle `s > t` (`tri`).

Every row trains the quality benchmark's network, budget and optimiser on the
eight-Gaussian ring (`benchmarks/quality.py`, full settings), and is scored the
same way: paired RMSE against the exact end point of the same noise.

    python benchmarks/meanflow_ablation.py [--seeds 2] [--steps N] [--methods ROW ...]

Writes `quality.md`, `quality.json` and the samples into `--out` (default
`benchmarks/results/meanflow-ablation/`).
"""

import pathlib
import sys

import quality

import fmcalc


VELOCITIES = {"cond": fmcalc.ConditionalVelocity(), "exact": fmcalc.Teacher()}
STOP_GRADIENTS = {"sg": "target", "full": "none"}
TIMES = {
    "mf": fmcalc.SortedPair(fmcalc.LogitNormal(-0.4, 1.0), equal_fraction=0.75),
    "tri": fmcalc.UniformTriangle(),
}
VARIANTS = (
    ("cond", "sg", "mf"),  # MeanFlow with plain MSE
    ("cond", "sg", "tri"),
    ("exact", "sg", "mf"),
    ("exact", "sg", "tri"),
    ("exact", "full", "mf"),
    ("exact", "full", "tri"),
)


def variant(velocity: str, stop_gradient: str, times: str) -> fmcalc.Method:
    residual = fmcalc.eulerian(
        form="V",
        stop_gradient=STOP_GRADIENTS[stop_gradient],
        velocity=VELOCITIES[velocity],
    )
    learning = "marginal-from-conditional" if velocity == "cond" else "distillation"
    term = fmcalc.Term("eulerian", residual, TIMES[times], fmcalc.SquaredError())
    return fmcalc.Method(
        "meanflow-" + "-".join((velocity, stop_gradient, times)),
        "eulerian",
        learning,
        "V",
        (term,),
    )


def rows() -> list[tuple[str, fmcalc.Method]]:
    baseline = (quality.BASELINE, fmcalc.methods.get(quality.BASELINE))
    return [baseline] + [(m.name, m) for m in (variant(*v) for v in VARIANTS)]


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--out" not in argv:
        out = pathlib.Path(__file__).resolve().parent / "results" / "meanflow-ablation"
        argv += ["--out", str(out)]
    if "--datasets" not in argv:
        argv += ["--datasets", "ring"]
    return quality.main(argv, rows=rows(), program="benchmarks/meanflow_ablation.py")


if __name__ == "__main__":
    main()
