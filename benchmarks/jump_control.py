"""Does a method learn to jump, or only a velocity? Every registry method's
`check_training` errors beside the velocity-only control, at several budgets.

```
python benchmarks/jump_control.py [--steps 3000 6000] [--methods NAME ...]
                                  [--out DIR] [--render]
```

The control is the flow-matching network of the same run used as a map,
`F(x, s, t) = x + (t - s) V(x, s, t)`: trained on the diagonal only and
extrapolated off it (`TrainingResult.velocity_only`). Beside the registry runs a
spec that never learns jumps: LSD with its Lagrangian term drawn on the diagonal
only (`t = s`), which trains the velocity and nothing else. A bar on the control
is useful at a budget where that spec stays above it and every registry method
clears it by a margin; the report gives each method's ratio to the control.
Rows go to `DIR/rows.jsonl` (one per method and budget, appended as they finish,
so a stopped run resumes); `DIR/jump-control.md` is rendered from them alone.
"""

import argparse
import json
import pathlib
import sys

import jax


jax.config.update("jax_enable_x64", True)

from _machine import git  # noqa: E402

import fmcalc  # noqa: E402
from fmcalc.testing import check_training  # noqa: E402


OUT = pathlib.Path(__file__).resolve().parent / "results" / "jump-control"
NO_JUMP = "lsd, Lagrangian term on the diagonal only"


def _method(name: str) -> fmcalc.Method:
    if name == NO_JUMP:
        return fmcalc.methods.get("lsd", times=fmcalc.Equal(fmcalc.Uniform()))
    return fmcalc.methods.get(name)


def run(names: list[str], budgets: list[int], path: pathlib.Path) -> None:
    done = set()
    if path.exists():
        done = {(r["method"], r["steps"]) for r in map(json.loads, path.open())}
    commit = git()
    for steps in budgets:
        for name in names:
            if (name, steps) in done:
                continue
            result = check_training(_method(name), key=jax.random.key(0), steps=steps)
            row = {
                "method": name,
                "steps": steps,
                "one_step": result.one_step,
                "two_step": result.two_step,
                "velocity_only": list(result.velocity_only),
                "flow_matching": result.flow_matching,
                "trivial": result.trivial,
                "passed": result.passed,
                "seconds": result.seconds,
                "commit": commit["commit"],
                "dirty": commit["dirty"],
            }
            with path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(result, flush=True)


def _ratio(error: float, control: float) -> str:
    return "–" if error != error else f"{error:.3g} ({error / control:.2f}×)"


def render(rows: list[dict]) -> str:
    lines = [
        "# Learned jumps against the velocity-only control",
        "",
        "`check_training`'s paired errors of 1 and 2 jumps, each with its ratio to "
        "the control: the flow-matching network of the same run used as a map "
        "(trained on the diagonal only). A ratio near or above 1 is what a method "
        "that learned only a velocity scores. Command: "
        "`python benchmarks/jump_control.py`; commits: "
        + ", ".join(
            sorted({r["commit"][:7] + (" (dirty)" if r["dirty"] else "") for r in rows})
        )  # fmt: skip
        + ".",
    ]
    for steps in sorted({r["steps"] for r in rows}):
        mine = [r for r in rows if r["steps"] == steps]
        one, two = mine[0]["velocity_only"]
        lines += [
            "",
            f"## {steps} steps",
            "",
            f"Control: {one:.3g} (1 jump), {two:.3g} (2 jumps); flow matching "
            f"{mine[0]['flow_matching']:.3g} (128 Euler steps); data mean "
            f"{mine[0]['trivial']:.3g}.",
            "",
            "| method | 1 jump | 2 jumps | passes the current bars |",
            "|---|---|---|---|",
        ]
        for r in sorted(mine, key=lambda r: r["one_step"] / one):
            lines.append(
                f"| {r['method']} | {_ratio(r['one_step'], one)} | "
                f"{_ratio(r['two_step'], two)} | {'yes' if r['passed'] else 'no'} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[3000])
    parser.add_argument("--methods", nargs="+", default=None)
    parser.add_argument("--out", type=pathlib.Path, default=OUT)
    parser.add_argument("--render", action="store_true")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "rows.jsonl"
    if not args.render:
        names = args.methods or [NO_JUMP, *fmcalc.methods.names()]
        run(names, args.steps, path)
    rows = [json.loads(line) for line in path.open()]
    (args.out / "jump-control.md").write_text(render(rows))


if __name__ == "__main__":
    sys.exit(main())
