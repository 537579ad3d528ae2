"""benchmarks/design_space.py: the enumeration of specs from fmcalc's primitives."""

import pytest
from helpers import load_benchmark

from fmcalc import methods


design = load_benchmark("design_space")


@pytest.fixture(scope="module")
def found():
    return design.candidates()


@pytest.mark.slow
def test_every_combination_is_built_or_refused_with_a_reason(found):
    assert len(found) == len(design.choices())
    assert len({c.choice.name for c in found}) == len(found)
    accepted = [c for c in found if c.method is not None]
    assert len(accepted) >= 60
    for c in found:
        assert (c.method is None) == bool(c.refused), c.choice
        if c.method is not None:
            assert c.method.name == c.choice.name and c.method.rule == c.choice.rule


@pytest.mark.slow
def test_the_validator_refuses_a_conditional_velocity_off_its_point(found):
    refused = {c.choice.name: c.refused for c in found if c.refused}
    name = "lagrangian/F/jvp/semigradient/conditional/triangle/squared"
    assert "conditional velocity" in refused[name] and "only at (x, s)" in refused[name]
    # MeanFlow's point is accepted, its adaptive weight with the warning it earns.
    point = "eulerian/V/jvp/semigradient/conditional/logit-normal/adaptive"
    meanflow = next(c for c in found if c.choice.name == point)
    assert meanflow.method is not None and "FixedPointShiftWarning" in meanflow.warned


def test_registry_methods_are_points_of_the_space():
    """LSD is the Lagrangian F form with a JVP, the semigradient, the model's own
    diagonal, uniform times and the squared error; MeanFlow's residual is the
    Eulerian V form with the conditional velocity."""
    lsd = design.build(
        design.Choice(
            "lagrangian", "F", "jvp", "semigradient", "own", "triangle", "squared"
        )  # fmt: skip
    )
    assert (
        lsd.terms == methods.get("lsd").terms and lsd.split == methods.get("lsd").split
    )
    with pytest.warns(Warning):
        meanflow = design.build(
            design.Choice(
                "eulerian",
                "V",
                "jvp",
                "semigradient",
                "conditional",
                "logit-normal",
                "adaptive",
            )  # fmt: skip
        )
    assert meanflow.terms[0].residual == methods.get("meanflow").terms[0].residual


def test_a_check_row_keeps_a_refusal_and_the_reasons_a_check_failed(monkeypatch):
    import jax

    refused = design.Candidate(design.Choice(*"lagrangian F jvp full conditional "
                                             "triangle squared".split()), None,
                               "The conditional velocity ...")  # fmt: skip
    row = design.check_row(refused, jax.random.key(0))
    assert row["refused"] == "The conditional velocity ..." and "valid" not in row

    class Verdict:
        def __init__(self, passed, text):
            self.passed, self.text, self.smallest_real = passed, text, -0.5

        def __str__(self):
            return self.text

    monkeypatch.setattr(design, "check_fixed_point",
                        lambda m, key: Verdict(True, "term: pass"))  # fmt: skip
    unstable = Verdict(False, "pushed away -> FAIL")
    monkeypatch.setattr(design, "check_stability", lambda m, key: unstable)
    choice = design.Choice("lagrangian", "F", "jvp", "semigradient", "own",
                           "triangle", "squared")  # fmt: skip
    row = design.check_row(
        design.Candidate(choice, design.build(choice), None), jax.random.key(0)
    )
    assert row["fixed_point"] and not row["stability"] and not row["valid"]
    assert row["reasons"] == ["pushed away -> FAIL"] and row["fpe"] == 4.0
