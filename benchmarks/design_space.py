"""The design space of flow-map losses, enumerated from fmcalc's primitives.

```
python benchmarks/design_space.py [--list]     # every candidate: built, or why not
python benchmarks/design_space.py --check [--out DIR] [--only SUBSTRING] [--resume]
```

A candidate is one choice on each axis of `shared/DESIGN.md`:

- **rule**: Lagrangian, Eulerian or compositional, in `F` or `V` form;
- **derivative**: a JVP or a central finite difference (not for the compositional
  rule, which takes none);
- **gradient**: the semigradient (`stop_gradient="target"`) or the full gradient
  (`"none"`);
- **velocity**: the conditional velocity `eps - x0`, the model's own diagonal
  `V(x, t, t)`, its EMA's, or a teacher (a learned one is charged to the budget);
  for the compositional rule, which has no velocity, this is the anchor's;
- **times**: uniform on the triangle, or a sorted logit-normal pair with a quarter
  of the rows on the diagonal;
- **loss**: the squared error or MeanFlow's adaptive weight.

A spec that reads its own or its EMA's diagonal, or that has no velocity in its
rule, also trains a flow-matching anchor on the diagonal (a quarter of the rows,
as LSD's default); one with a teacher anchors to the teacher. `candidates()` builds
every combination; `fmcalc.Method`'s own checks accept or refuse it (a refusal is
kept with its reason: a conditional velocity off `(x_s, s)`, an update that is
biased, ...). `--check` runs `fmcalc.testing.check_fixed_point` and
`check_stability` at their defaults (the asymmetric mixture, the exact teacher,
the EMA equal to the model) on every accepted candidate, one row per candidate in
`DIR/checks.jsonl` (refused ones too, with their reason); a candidate is valid when
both pass. Training runs read the valid ones.
"""

import argparse
import dataclasses
import itertools
import json
import pathlib
import sys
import time
import warnings

import jax
from _machine import ROOT, clean_machine

import fmcalc
from fmcalc.testing import check_fixed_point, check_stability


RULES = ("lagrangian", "eulerian", "compositional")
FORMS = ("F", "V")
DERIVATIVES = {
    "jvp": fmcalc.JVP(),
    "central": fmcalc.FiniteDifference(5e-3, "central"),
}
GRADIENTS = {"semigradient": "target", "full": "none"}
# The Eulerian rule's F form has no target to stop: its semigradient stops the
# spatial part of the derivative (ESD's).
EULERIAN_F_SEMIGRADIENT = "spatial"
VELOCITIES = ("conditional", "own", "ema", "teacher")
TIMES = {
    "triangle": fmcalc.UniformTriangle(),
    "logit-normal": fmcalc.SortedPair(
        fmcalc.LogitNormal(-0.4, 1.0), equal_fraction=0.25
    ),
}
LOSSES = {"squared": fmcalc.SquaredError(), "adaptive": fmcalc.Adaptive()}
ANCHOR_SPLIT = (0.75, 0.25)
OUT = pathlib.Path(__file__).resolve().parent / "results" / "design-space"


@dataclasses.dataclass(frozen=True)
class Choice:
    """One point of the design space: a value on every axis."""

    rule: str
    form: str
    derivative: str | None
    gradient: str
    velocity: str
    times: str
    loss: str

    @property
    def name(self) -> str:
        parts = [self.rule, self.form, self.derivative, self.gradient, self.velocity,
                 self.times, self.loss]  # fmt: skip
        return "/".join(p for p in parts if p is not None)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A choice and what came of it: the method and the warnings its construction
    raised, or the reason it was refused."""

    choice: Choice
    method: fmcalc.Method | None
    refused: str | None
    warned: tuple[str, ...] = ()


def choices() -> list[Choice]:
    """Every combination of the axes (the compositional rule without a derivative,
    and with the conditional velocity or a teacher in its anchor only)."""
    out = []
    for rule, form, gradient, velocity, times, loss in itertools.product(
        RULES, FORMS, GRADIENTS, VELOCITIES, TIMES, LOSSES
    ):
        if rule == "compositional":
            if velocity in ("conditional", "teacher"):
                out.append(Choice(rule, form, None, gradient, velocity, times, loss))
            continue
        for derivative in DERIVATIVES:
            out.append(Choice(rule, form, derivative, gradient, velocity, times, loss))
    return out


def _velocity(name: str) -> fmcalc.AbstractVelocity:
    return {
        "conditional": fmcalc.ConditionalVelocity(),
        "own": fmcalc.Diagonal(fmcalc.Network()),
        "ema": fmcalc.Diagonal(fmcalc.Network("ema")),
        "teacher": fmcalc.Teacher(),
    }[name]


def build(choice: Choice) -> fmcalc.Method:
    """The method of `choice`; raises what `fmcalc.Method` raises for a refused one."""
    gradient = GRADIENTS[choice.gradient]
    if (choice.rule, choice.form, choice.gradient) == ("eulerian", "F", "semigradient"):
        gradient = EULERIAN_F_SEMIGRADIENT
    times = TIMES[choice.times]
    if choice.rule == "compositional":
        residual = fmcalc.compositional(
            form=choice.form, stop_gradient=gradient, u=fmcalc.U
        )
        times = fmcalc.WithIntermediate(times)
    else:
        build_rule = (
            fmcalc.lagrangian if choice.rule == "lagrangian" else fmcalc.eulerian
        )
        residual = build_rule(
            form=choice.form,
            stop_gradient=gradient,
            derivative=DERIVATIVES[choice.derivative],
            velocity=_velocity(choice.velocity),
        )
    term = fmcalc.Term(choice.rule, residual, times, LOSSES[choice.loss])
    teacher = choice.velocity == "teacher"
    learning = "distillation" if teacher else "self-distillation"
    if choice.velocity == "conditional" and choice.rule != "compositional":
        learning = "marginal-from-conditional"
        return fmcalc.Method(choice.name, choice.rule, learning, choice.form, (term,))
    anchor_velocity = fmcalc.Teacher() if teacher else fmcalc.ConditionalVelocity()
    anchor = fmcalc.Term(
        "anchor",
        fmcalc.flow_matching(velocity=anchor_velocity),
        fmcalc.Equal(fmcalc.Uniform()),
    )
    return fmcalc.Method(
        choice.name,
        choice.rule,
        learning,
        choice.form,
        (anchor, term),
        split=ANCHOR_SPLIT,
    )


def candidates() -> list[Candidate]:
    """Every choice, built or refused (with the first line of the reason)."""
    out = []
    for choice in choices():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                method = build(choice)
            except (ValueError, TypeError) as error:
                out.append(Candidate(choice, None, str(error).splitlines()[0]))
                continue
        warned = tuple(type(w.message).__name__ for w in caught)
        out.append(Candidate(choice, method, None, warned))
    return out


def check_row(candidate: Candidate, key) -> dict:
    """The row of `candidate`: its axes, and its refusal or its warnings and the
    verdicts of the fixed-point and stability checks at their defaults."""
    row = {"name": candidate.choice.name, **dataclasses.asdict(candidate.choice)}
    if candidate.method is None:
        return {**row, "refused": candidate.refused}
    method = candidate.method
    start = time.perf_counter()
    fixed = check_fixed_point(method, key=key)
    stable = check_stability(method, key=key)
    reasons = [line.strip() for line in str(fixed).splitlines() if "FAIL" in line] + (
        [] if stable.passed else [str(stable).splitlines()[0]]
    )
    return {
        **row,
        "warned": list(candidate.warned),
        "fpe": float(method.cost()),
        "fixed_point": fixed.passed,
        "stability": stable.passed,
        "smallest_real": float(stable.smallest_real),
        "valid": bool(fixed.passed and stable.passed),
        "reasons": reasons,
        "seconds": time.perf_counter() - start,
    }


def _check(args) -> None:
    record = clean_machine(args.allow_dirty)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "checks.jsonl"
    if path.exists() and not args.resume:
        raise SystemExit(f"{path} exists: pass --resume to add to it.")
    done = set()
    if path.exists():
        done = {json.loads(line)["name"] for line in path.read_text().splitlines()}
    git = record["git"]
    commit = (git["commit"] or "unknown")[:7] + (" (dirty)" if git["dirty"] else "")
    command = "python " + " ".join(
        [str(pathlib.Path(__file__).resolve().relative_to(ROOT)), *sys.argv[1:]]
    )
    for candidate in candidates():
        name = candidate.choice.name
        if name in done or (args.only and args.only not in name):
            continue
        row = check_row(candidate, jax.random.key(0))
        row.update(commit=commit, command=command)
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        verdict = row.get("refused") or ("valid" if row["valid"] else row["reasons"])
        print(f"{name}: {verdict}", flush=True)
        jax.clear_caches()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print every candidate")
    parser.add_argument("--check", action="store_true", help="run the kit's checks")
    parser.add_argument("--out", type=pathlib.Path, default=OUT)
    parser.add_argument("--only", help="check only candidates whose name has this")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--allow-dirty", action="store_true")
    args = parser.parse_args(argv)
    if args.check:
        _check(args)
        return 0
    found = candidates()
    accepted = [c for c in found if c.method is not None]
    print(f"{len(found)} candidates, {len(accepted)} accepted by fmcalc.Method")
    if args.list:
        for c in found:
            verdict = c.refused or "ok" + "".join(f", {w}" for w in c.warned)
            print(f"{c.choice.name}: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
