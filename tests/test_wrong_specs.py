"""A battery of deliberately wrong specs (`benchmarks/trust.py`): each is flagged by
at least one layer of the kit, cheapest first (refused at construction, a warning,
the fixed point, stability, training). That no layer flags a registry method is
shown by `test_explain.py`, `test_fixed_point.py`, `test_stability.py`,
`test_training_check.py` and the committed run `benchmarks/results/trust/`."""

import importlib.util
import math
import pathlib
import sys

import jax
import pytest


PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "trust.py"
sys.path.insert(0, str(PATH.parent))
_spec = importlib.util.spec_from_file_location("fmcalc_benchmark_trust", PATH)
assert _spec is not None and _spec.loader is not None
trust = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(trust)

# Flagged at construction or by the fixed point: seconds each.
QUICK = {
    "LSD, stop-gradient on the prediction",
    "LSD, stop-gradient on the whole residual",
    "MeanFlow without its stop-gradient",
    "CTM compared through the EMA network's velocity only",
    "EMD on the EMA map, the online map only as its input",
    "flow matching at the wrong time",
    "pseudo-Huber flow matching",
    "cosine flow matching",
    "MeanFlow with an undeclared adaptive weight",
}


@pytest.mark.parametrize(
    "case",
    [
        case if case in QUICK else pytest.param(case, marks=pytest.mark.slow)
        for case in trust.WRONG
    ],
)
def test_wrong_spec_is_flagged(case):
    layer, said = trust.first_flag(trust.WRONG[case], jax.random.key(0))
    assert layer is not None, f"{case}: no layer of the kit flags it"
    assert said


def _row(passed: bool) -> dict:
    layer = {"passed": True, "seconds": 1.0}
    return {
        "warnings": [] if passed else ["GradientPathWarning"],
        "fixed_point": {**layer, "declared": False, "residual": 0.0},
        "stability_gaussian": {**layer, "smallest_real": 0.01},
        "stability_mixture": {**layer, "smallest_real": 0.01},
        "training": {
            **layer,
            "one_step": 0.1,
            "two_step": math.nan,
            "flow_matching": 0.05,
            "trivial": 1.4,
        },
    }


def test_report_checks_fail_on_failing_input():
    from _machine import machine

    good = {
        "machine": machine(),
        "seconds": 60.0,
        "registry": {"lsd": _row(True)},
        "wrong": {"a wrong spec": ("fixed point", "FAIL: ...")},
    }
    assert all(ok for _, ok, _ in trust.checks(good))
    assert "- ok: registry: 1 of 1" in trust.report(good)
    bad = {
        **good,
        "registry": {"lsd": _row(True), "mine": _row(False)},
        "wrong": {"a wrong spec": (None, "")},
    }
    (_, registry, text), (_, wrong, missed) = trust.checks(bad)
    assert not registry and "not: mine" in text
    assert not wrong and "not: a wrong spec" in missed
    page = trust.report(bad)
    assert "FAIL: registry" in page and "| a wrong spec | NOTHING |" in page
