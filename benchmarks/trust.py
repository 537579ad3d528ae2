"""The testing kit on every registry method and on a battery of wrong specs.

For each registry method at its defaults: the warnings it raises when built,
`check_fixed_point` on the default asymmetric mixture, `check_stability` on a
Gaussian and on that mixture (smallest real part of the update's Jacobian), and
`check_training` (paired errors after a short run, beside flow matching and the data
mean), each with its wall time. For each deliberately wrong spec (misplaced
stop-gradients, gradient only through frozen networks, sign and time-argument
slips, robust losses on `eps - x0`): the first layer of the kit that flags it.

    python benchmarks/trust.py [--out DIR] [--methods NAME ...] [--wrong CASE ...]
    python benchmarks/trust.py --out DIR --render   # trust.md from DIR/trust.json

Writes `trust.json` and `trust.md` into `--out` (default a scratch folder under the
system's temporary directory; `--out benchmarks/results/trust` updates the committed
results). About 25 minutes on a 2-core CPU for everything.
"""

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable

import jax


jax.config.update("jax_enable_x64", True)

import _machine  # noqa: E402

import fmcalc  # noqa: E402
from fmcalc import (  # noqa: E402
    D,
    Diagonal,
    FiniteDifference,
    FlowMap,
    Network,
    Normalize,
    S,
    T,
    Teacher,
    U,
    X,
    sg,
)
from fmcalc.testing import (  # noqa: E402
    check_fixed_point,
    check_stability,
    check_training,
)


# ---------------------------------------------------------------- wrong specs

V, V_ema = Network(), Network("ema")
F, F_ema = FlowMap(V), FlowMap(V_ema)
v, v_c = Teacher(), fmcalc.ConditionalVelocity()
x, s, t, u = X, S, T, U
MID = s + 0.5 * (t - s)
FD = FiniteDifference(1e-3, "central")
TRIANGLE = fmcalc.UniformTriangle()
INTERMEDIATE = fmcalc.WithIntermediate(fmcalc.UniformTriangle())


def _anchor(loss=None) -> fmcalc.Term:
    loss = fmcalc.SquaredError() if loss is None else loss
    return fmcalc.Term(
        "anchor", fmcalc.flow_matching(), fmcalc.Equal(fmcalc.Uniform()), loss
    )


def _distillation(residual, times=TRIANGLE, learning="distillation") -> fmcalc.Method:
    term = fmcalc.Term("term", residual, times)
    return fmcalc.Method("wrong", "lagrangian", learning, "V", (term,))


def _self(residual, times=TRIANGLE) -> fmcalc.Method:
    term = fmcalc.Term("term", residual, times)
    return fmcalc.Method(
        "wrong", "lagrangian", "self-distillation", "V", (_anchor(), term),
        split=(0.75, 0.25),
    )  # fmt: skip


def _meanflow(tangent=(1, 0), sign=1.0, loss=None) -> fmcalc.Method:
    dV = D(V, at=(x, s, t), along=(v_c(x, s), *tangent))
    residual = V(x, s, t) - sg(v_c(x, s) + sign * (t - s) * dV)
    loss = fmcalc.SquaredError() if loss is None else loss
    times = fmcalc.SortedPair(fmcalc.LogitNormal(-0.4, 1.0))
    term = fmcalc.Term("meanflow", residual, times, loss)
    return fmcalc.Method("wrong", "eulerian", "marginal-from-conditional", "V", (term,))


def _anchor_only(loss) -> fmcalc.Method:
    return fmcalc.Method(
        "wrong", "diagonal", "marginal-from-conditional", "V", (_anchor(loss),)
    )


WRONG: dict[str, Callable[[], fmcalc.Method]] = {
    # misplaced stop-gradients
    "LSD, stop-gradient on the prediction": lambda: _self(
        sg(D(F, at=(x, s, t), along=(0, 0, 1), by=FD)) - Diagonal(V_ema)(F(x, s, t), t)
    ),
    "LSD, stop-gradient on the whole residual": lambda: _self(
        sg(D(F, at=(x, s, t), along=(0, 0, 1)) - Diagonal()(F(x, s, t), t))
    ),
    "MeanFlow without its stop-gradient": lambda: _distillation(
        V(x, s, t)
        - (v_c(x, s) + (t - s) * D(V, at=(x, s, t), along=(v_c(x, s), 1, 0))),
        learning="marginal-from-conditional",
    ),
    "shortcut, stop-gradient on the prediction instead of the target": lambda: _self(
        sg(V(x, s, t)) - (0.5 * V(x, s, MID) + 0.5 * V(F(x, s, MID), MID, t))
    ),
    # gradient only through frozen networks
    "CTM compared through the EMA network's velocity only": lambda: _distillation(
        V_ema(F(x, s, t), t, 0) - sg(V_ema(F(F(x, s, u), u, t), t, 0)),
        INTERMEDIATE,
        learning="self-distillation",
    ),
    "EMD on the EMA map, the online map only as its input": lambda: _distillation(
        D(F_ema, at=(F(x, s, t), s, t), along=(v(x, s), 1, 0))
    ),
    # sign slips
    "MeanFlow, the derivative term with the wrong sign": lambda: _meanflow(sign=-1.0),
    "Eulerian, advection with the wrong sign": lambda: _distillation(
        D(F, at=(x, s, t), along=(0, 1, 0)) - D(F, at=(x, s, t), along=(v(x, s), 0, 0))
    ),
    "AYF-LMD tangent surrogate with the sign read literally": lambda: _distillation(
        F(x, s, t)
        - sg(
            F(x, s, t)
            - Normalize(D(F, at=(x, s, t), along=(0, 0, 1)) - v(F(x, s, t), t), 0.1)
        ),
        fmcalc.SortedPair(fmcalc.LogitNormal(-0.8, 1.0)),
    ),
    # time-argument slips
    "MeanFlow, derivative along the target time": lambda: _meanflow((0, 1)),
    "Lagrangian, teacher at the source time": lambda: _distillation(
        D(F, at=(x, s, t), along=(0, 0, 1)) - sg(v(F(x, s, t), s))
    ),
    "Lagrangian, teacher at the start point": lambda: _distillation(
        D(F, at=(x, s, t), along=(0, 0, 1)) - sg(v(x, t))
    ),
    "shortcut, second jump back to the source": lambda: _self(
        V(x, s, t) - sg(0.5 * V(x, s, MID) + 0.5 * V(F(x, s, MID), MID, s))
    ),
    "flow matching at the wrong time": lambda: _distillation(V(x, t, t) - v(x, s)),
    # robust losses on the conditional velocity
    "pseudo-Huber flow matching": lambda: _anchor_only(fmcalc.PseudoHuber()),
    "cosine flow matching": lambda: _anchor_only(fmcalc.Cosine()),
    "MeanFlow with an undeclared adaptive weight": lambda: _meanflow(
        loss=fmcalc.Adaptive(p=0.5)
    ),
}


def first_flag(build: Callable[[], fmcalc.Method], key) -> tuple[str | None, str]:
    """The first layer of the kit, cheapest first, that flags the spec `build`
    returns, and what it said: refused at construction, a warning, the fixed point,
    stability, training; `(None, "")` if none does."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", fmcalc.FmcalcWarning)
            method = build()
    except (ValueError, TypeError) as error:
        return "refused", str(error).splitlines()[0]
    except fmcalc.FmcalcWarning as warning:
        return type(warning).__name__, str(warning).splitlines()[0]
    for layer, check in (
        ("fixed point", check_fixed_point),
        ("stability", check_stability),
        ("training", check_training),
    ):
        result = check(method, key=key)
        if not result.passed:
            return layer, str(result).splitlines()[-1].strip()
    return None, ""


# -------------------------------------------------------------- registry methods


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def registry_row(name: str, gaussian, key) -> dict:
    """Every layer of the kit on the registry method `name` at its defaults."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", fmcalc.FmcalcWarning)
        method = fmcalc.methods.get(name)
    fixed, fixed_s = _timed(lambda: check_fixed_point(method, key=key))
    on_gaussian, gaussian_s = _timed(lambda: check_stability(method, gaussian, key=key))
    on_mixture, mixture_s = _timed(lambda: check_stability(method, key=key))
    training, training_s = _timed(lambda: check_training(method, key=key))
    return {
        "warnings": [str(w.category.__name__) for w in caught],
        "fixed_point": {
            "passed": fixed.passed,
            "declared": any(c.declared for c in fixed.terms),
            "residual": max(c.relative_residual for c in fixed.terms),
            "seconds": fixed_s,
        },
        "stability_gaussian": {
            "passed": on_gaussian.passed,
            "smallest_real": on_gaussian.smallest_real,
            "seconds": gaussian_s,
        },
        "stability_mixture": {
            "passed": on_mixture.passed,
            "smallest_real": on_mixture.smallest_real,
            "seconds": mixture_s,
        },
        "training": {
            "passed": training.passed,
            "one_step": training.one_step,
            "two_step": training.two_step,
            "flow_matching": training.flow_matching,
            "trivial": training.trivial,
            "seconds": training.seconds,
        },
    }


LAYERS = ("fixed_point", "stability_gaussian", "stability_mixture", "training")
LABELS = {
    "fixed_point": "fixed point",
    "stability_gaussian": "stability on the Gaussian",
    "stability_mixture": "stability on the mixture",
    "training": "training",
}


def registry_passes(row: dict) -> bool:
    """A registry method passes when it raises no warning and every check passes."""
    return not row["warnings"] and all(row[layer]["passed"] for layer in LAYERS)


# ------------------------------------------------------------------- the report


def _number(value: float) -> str:
    return "–" if value != value else f"{value:.3g}"  # NaN: not measured


def report(result: dict) -> str:
    """`trust.md` from `trust.json`'s content."""
    machine = result["machine"]
    lines = [
        "# The testing kit on the registry and on wrong specs",
        "",
        f"Generated by `python benchmarks/trust.py` at commit "
        f"`{(machine['git']['commit'] or '?')[:7]}` on {machine['platform']} "
        f"({machine['cpu_count']} cores, {_machine.device_label(machine)}), jax "
        f"{machine['versions']['jax']}; {result['seconds'] / 60:.0f} min in all.",
        "",
        "## Registry methods at their defaults",
        "",
        "Stability: the smallest real part of the Jacobian of the expected update at "
        "the exact map, relative to its largest eigenvalue (positive: attracting). "
        "Training: paired error of 1 and 2 jumps after the short run (– where the "
        "method trains only from noise or only to data), beside flow matching "
        "(128 Euler steps) and the data mean. Times in seconds.",
        "",
        "| method | warnings | fixed point | stability (Gaussian) | stability "
        "(mixture) | 1 jump | 2 jumps | flow matching | data mean | times "
        "(fixed point / stability ×2 / training) | all pass |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in result["registry"].items():
        fixed = row["fixed_point"]
        verdict = (
            ("pass (declared bias)" if fixed["declared"] else "pass")
            if fixed["passed"]
            else "FAIL"
        )
        training = row["training"]
        times = " / ".join(f"{row[layer]['seconds']:.0f}" for layer in LAYERS)
        lines.append(
            f"| {name} | {', '.join(row['warnings']) or 'none'} | {verdict} | "
            f"{_number(row['stability_gaussian']['smallest_real'])} | "
            f"{_number(row['stability_mixture']['smallest_real'])} | "
            f"{_number(training['one_step'])} | {_number(training['two_step'])} | "
            f"{_number(training['flow_matching'])} | {_number(training['trivial'])} | "
            f"{times} | {'yes' if registry_passes(row) else 'NO'} |"
        )
    if result["registry"]:
        medians = {
            layer: statistics.median(
                row[layer]["seconds"] for row in result["registry"].values()
            )
            for layer in LAYERS
        }
        lines += [
            "",
            "Median time per method: "
            + ", ".join(f"{LABELS[layer]} {medians[layer]:.0f} s" for layer in LAYERS)
            + " (a training check includes flow matching's run only the first time;"
            " these runs shared the machine with other work, see the load average in"
            " `trust.json`).",
        ]
    lines += [
        "",
        "## Wrong specs: the first layer that flags each",
        "",
        "| spec | flagged by | what it said |",
        "|---|---|---|",
    ]
    for case, (layer, said) in result["wrong"].items():
        said = said.replace("|", "\\|")
        lines.append(f"| {case} | {layer or 'NOTHING'} | {said} |")
    lines += ["", "## Checks", ""]
    for name, ok, text in checks(result):
        lines.append(f"- {'ok' if ok else 'FAIL'}: {name}: {text}")
    return "\n".join(lines) + "\n"


def checks(result: dict) -> list[tuple[str, bool, str]]:
    """The acceptance checks of the run: every registry method passes every layer,
    and every wrong spec is flagged by one."""
    failing = [n for n, row in result["registry"].items() if not registry_passes(row)]
    missed = [case for case, (layer, _) in result["wrong"].items() if layer is None]
    return [
        (
            "registry",
            not failing,
            f"{len(result['registry']) - len(failing)} of {len(result['registry'])} "
            "methods pass every layer"
            + (f"; not: {', '.join(failing)}" if failing else ""),
        ),
        (
            "wrong specs",
            not missed,
            f"{len(result['wrong']) - len(missed)} of {len(result['wrong'])} flagged"
            + (f"; not: {', '.join(missed)}" if missed else ""),
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=pathlib.Path(tempfile.gettempdir()) / "fmcalc-benchmarks" / "trust",
    )
    parser.add_argument("--methods", nargs="*", default=None)
    parser.add_argument("--wrong", nargs="*", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--render",
        action="store_true",
        help="only rewrite trust.md from the trust.json already in --out",
    )
    args = parser.parse_args(argv)
    if args.render:
        result = json.loads((args.out / "trust.json").read_text())
        (args.out / "trust.md").write_text(report(result))
        return 0 if all(ok for _, ok, _ in checks(result)) else 1
    names = fmcalc.methods.names() if args.methods is None else args.methods
    cases = list(WRONG) if args.wrong is None else args.wrong
    key = jax.random.key(args.seed)
    sys.path.insert(0, str(_machine.ROOT / "tests"))
    from helpers import random_gaussian

    gaussian = random_gaussian(jax.random.key(11), 2)
    start = time.perf_counter()
    result = {"machine": _machine.machine(), "seed": args.seed}
    result["registry"] = {}
    for name in names:
        result["registry"][name] = registry_row(name, gaussian, key)
        print(name, "pass" if registry_passes(result["registry"][name]) else "FAIL")
    result["wrong"] = {}
    for case in cases:
        result["wrong"][case] = first_flag(WRONG[case], key)
        print(case, "->", result["wrong"][case][0])
    result["seconds"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "trust.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "trust.md").write_text(report(result))
    print(f"wrote {args.out / 'trust.md'}")
    return 0 if all(ok for _, ok, _ in checks(result)) else 1


if __name__ == "__main__":
    sys.exit(main())
