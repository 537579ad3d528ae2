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

Every row is trained, sampled and scored by the frontier benchmark
(`benchmarks/frontier.py`) on the eight-Gaussian ring, at flow matching's budget
(`--budgets 1`, the same training compute for every row) with the exact velocity as
the teacher of the `exact` rows (`--teacher exact`), and scored by paired RMSE
against the exact end point of the same noise.

    python benchmarks/meanflow_ablation.py [frontier options]

Writes `rows.jsonl`, `frontier.md` and the figure into `--out` (default
`benchmarks/results/meanflow-ablation/`).
"""

import pathlib
import sys

import frontier

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


def variants() -> list[fmcalc.Method]:
    return [variant(*v) for v in VARIANTS]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    out = pathlib.Path(__file__).resolve().parent / "results" / "meanflow-ablation"
    defaults = {
        "--out": [str(out)],
        "--datasets": ["ring"],
        "--budgets": ["1"],
        "--teacher": ["exact"],
        "--methods": [m.name for m in variants()],
    }
    for option, value in defaults.items():
        if option not in argv:
            argv += [option, *value]
    for m in variants():
        frontier.EXTRA[m.name] = lambda m=m: m
    return frontier.main(argv, program="benchmarks/meanflow_ablation.py")


if __name__ == "__main__":
    sys.exit(main())
