"""`fmcalc.explain`, the warnings and the construction checks they share.

The printout of every registry method is compared with a golden file in
`tests/golden/explain/`; after a deliberate change, regenerate them with
`FMCALC_UPDATE_GOLDEN=1 pytest tests/test_explain.py` and review the diff.
"""

import os
import pathlib
import warnings

import pytest

import fmcalc
from fmcalc import (
    D,
    Diagonal,
    FiniteDifference,
    FlowMap,
    Network,
    S,
    T,
    Teacher,
    U,
    X,
    methods,
    sg,
)
from fmcalc._cli import main as cli


GOLDEN = pathlib.Path(__file__).parent / "golden" / "explain"
V = Network()
F = FlowMap(V)
V_ema = Network("ema")
v_c = fmcalc.ConditionalVelocity()
FD = FiniteDifference(1e-3, "central")


def _roles(explanation, term=0) -> dict[str, tuple[str, str]]:
    return {c.call: (c.network, c.role) for c in explanation.terms[term].calls}


@pytest.mark.parametrize("name", methods.names())
def test_explain_matches_golden_text(name):
    text = str(fmcalc.explain(name)) + "\n"
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("FMCALC_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"no golden file {path}; set FMCALC_UPDATE_GOLDEN=1"
    assert text == path.read_text()


# Five methods read against their papers' formulas (see each spec's docstring).


def test_meanflow_is_a_semigradient_through_the_prediction_only():
    explanation = fmcalc.explain("meanflow")
    (term,) = explanation.terms
    assert term.semigradient
    assert term.update == "E[2/sg[(‖R‖² + 0.001)^1] · R · ∂θ V(x, s, t)]"
    roles = _roles(explanation)
    assert roles["V(x, s, t)"] == ("online", "parameter gradient")
    assert roles["D[V](x, s, t)·(v_c(x, s), 1, 0)"][1].startswith("none")
    # The adaptive weight's shift is declared, so it is shown but not warned.
    assert [f.category for f in term.findings] == [fmcalc.FixedPointShiftWarning]
    assert not explanation.warnings


def test_lmd_is_the_true_gradient_through_jvp_and_teacher_input():
    explanation = fmcalc.explain("lmd")
    (term,) = explanation.terms
    assert not term.semigradient
    assert term.update == ("E[2 · R · ∂θ(D[F](x, s, t)·(0, 0, 1) - v(F(x, s, t), t))]")
    roles = _roles(explanation)
    assert roles["D[V](x, s, t)·(0, 0, 1)"] == (
        "online",
        "parameter gradient, through a JVP",
    )
    assert roles["v(F(x, s, t), t)"] == ("teacher", "input gradient only")


def test_lsd_backpropagates_the_jvp_against_a_frozen_diagonal():
    explanation = fmcalc.explain("lsd")
    anchor, lagrangian = explanation.terms
    assert anchor.rows == 0.75 and lagrangian.rows == 0.25
    assert not anchor.semigradient and anchor.update == "E[2 · R · ∂θ V(x, s, s)]"
    assert lagrangian.semigradient
    assert lagrangian.update == "E[2 · R · ∂θ D[F](x, s, t)·(0, 0, 1)]"
    roles = _roles(explanation, 1)
    assert roles["V(sg[F(x, s, t)], t, t)"][1].startswith("none")


def test_shortcut_targets_are_ema_calls_without_gradient():
    explanation = fmcalc.explain("shortcut")
    roles = _roles(explanation, 1)
    ema = [call for call, (network, _) in roles.items() if network == "ema"]
    assert len(ema) == 2
    assert all(roles[call][1].startswith("none") for call in ema)
    assert explanation.terms[1].update == "E[2 · R · ∂θ V(x, s, t)]"


def test_ctm_reaches_the_online_map_directly_and_through_the_ema_input():
    explanation = fmcalc.explain("ctm")
    roles = _roles(explanation)
    assert roles["V(x, s, t)"] == ("online", "parameter gradient")
    assert roles["V_ema(F(x, s, t), t, 0)"] == ("ema", "input gradient only")
    assert explanation.terms[0].update == ("E[2 · R · ∂θ(F_ema(F(x, s, t), t, 0))]")


def test_str_of_a_method_shows_every_terms_loss():
    for name in ("meanflow", "facm", "ect"):
        method = methods.get(name)
        text = str(method)
        for term in method.terms:
            assert f"loss {term.loss.formula}" in text
    assert "√(‖R‖² + c²) - c" in str(methods.get("ect"))


def test_cli_explain_prints_the_explanation(capsys):
    assert cli(["explain", "lsd"]) == 0
    assert capsys.readouterr().out == str(fmcalc.explain("lsd")) + "\n"
    assert cli(["explain", "nonexistent"]) == 2
    assert "unknown method 'nonexistent'" in capsys.readouterr().err


def test_explain_rejects_other_objects():
    with pytest.raises(TypeError):
        fmcalc.explain(42)  # pyright: ignore[reportArgumentType]


# ------------------------------------------------------------------- warnings


def test_warning_hierarchy():
    for category in (
        fmcalc.GradientPathWarning,
        fmcalc.FixedPointShiftWarning,
        fmcalc.FiniteDifferenceStepWarning,
        fmcalc.EMAHorizonWarning,
    ):
        assert issubclass(category, fmcalc.FmcalcWarning)
    assert issubclass(fmcalc.FmcalcWarning, UserWarning)


@pytest.mark.parametrize("name", methods.names())
def test_no_registry_method_warns_at_its_defaults(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error", fmcalc.FmcalcWarning)
        method = methods.get(name)
    assert not fmcalc.explain(method).warnings


def _self_distillation(residual, loss=None, **declared):
    loss = fmcalc.SquaredError() if loss is None else loss
    anchor = fmcalc.Term(
        "anchor", fmcalc.flow_matching(), fmcalc.Equal(fmcalc.Uniform())
    )
    term = fmcalc.Term("consistency", residual, fmcalc.UniformTriangle(), loss)
    return fmcalc.Method(
        "mine", "lagrangian", "self-distillation", "V", (anchor, term),
        split=(0.75, 0.25), **declared,
    )  # fmt: skip


# The stop-gradient moved to the other side of LSD with central differences and an
# EMA teacher: the online map reaches the loss only through the EMA's input.
WRONG_PATH = sg(D(F, at=(X, S, T), along=(0, 0, 1), by=FD)) - Diagonal(V_ema)(
    F(X, S, T), T
)


def test_wrong_gradient_path_warns_once_at_the_users_line():
    with pytest.warns(fmcalc.GradientPathWarning, match="only through the input") as w:
        _self_distillation(WRONG_PATH)
    assert len(w) == 1
    assert w[0].filename == __file__
    (term,) = fmcalc.explain(WRONG_PATH).terms
    roles = {c.call: c.role for c in term.calls}
    assert roles["V_ema(F(x, s, t), t, t)"] == "input gradient only"
    assert roles["V(x, s, t)"] == (
        "parameter gradient, only through a frozen network's input"
    )


def test_intended_input_gradient_is_declared_on_the_term():
    term = fmcalc.Term(
        "compare", WRONG_PATH, fmcalc.UniformTriangle(), input_gradient="on purpose"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", fmcalc.FmcalcWarning)
        fmcalc.Method("m", "lagrangian", "self-distillation", "V", (term,))


@pytest.mark.parametrize(
    "loss", [fmcalc.PseudoHuber(), fmcalc.Adaptive(), fmcalc.Cosine()], ids=repr
)
def test_robust_loss_on_the_conditional_velocity_warns(loss):
    anchor = fmcalc.Term(
        "anchor", fmcalc.flow_matching(), fmcalc.Equal(fmcalc.Uniform()), loss
    )
    with pytest.warns(fmcalc.FixedPointShiftWarning, match="robust location"):
        fmcalc.Method("fm", "diagonal", "marginal-from-conditional", "V", (anchor,))
    with warnings.catch_warnings():
        warnings.simplefilter("error", fmcalc.FmcalcWarning)
        fmcalc.Method(
            "fm", "diagonal", "marginal-from-conditional", "V", (anchor,),
            biased="a robust location is what I want",
        )  # fmt: skip
        # A teacher target is exact per example: no weighting moves its fixed point.
        teacher = fmcalc.flow_matching(velocity=Teacher())
        term = fmcalc.Term("boundary", teacher, fmcalc.Equal(fmcalc.Uniform()), loss)
        fmcalc.Method("b", "diagonal", "distillation", "V", (term,))


def test_time_only_weights_do_not_warn():
    loss = fmcalc.TimeWeighted(fmcalc.SquaredError(), lambda s, t: 1 / (s + 0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", fmcalc.FmcalcWarning)
        _self_distillation(
            D(F, at=(X, S, T), along=(0, 0, 1)) - sg(Diagonal()(F(X, S, T), T)), loss
        )


def test_replace_keeps_declarations_but_not_new_problems():
    plain = methods.get("meanflow", loss=fmcalc.SquaredError())
    with pytest.warns(fmcalc.FixedPointShiftWarning):
        plain.replace(loss=fmcalc.PseudoHuber())
    with pytest.raises(ValueError, match="finite difference along"):
        methods.get("meanflow").replace(derivative=FD)


# ------------------------------------------ one set of checks for every entry point

NO_GRADIENT = sg(F(X, S, T)) - Teacher()(X, S)
REFUSED = {
    "no gradient at all": (NO_GRADIENT, "No gradient reaches the online network"),
    "conditional velocity in a network input": (
        F(X, S, T) - sg(F(X + (U - S) * v_c(X, S), U, T)),
        "evaluates a network at a point that depends",
    ),
    "meanflow without its stop-gradient": (
        V(X, S, T)
        - (v_c(X, S) + (T - S) * D(V, at=(X, S, T), along=(v_c(X, S), 1, 0))),
        "not under a stop-gradient",
    ),
    "finite difference along eps - x0": (
        V(X, S, T) - sg(v_c(X, S) + D(V, at=(X, S, T), along=(v_c(X, S), 1, 0), by=FD)),
        "finite difference along the conditional velocity",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_term_method_and_expression_refuse_alike(case):
    residual, match = REFUSED[case]
    times = fmcalc.WithIntermediate(fmcalc.UniformTriangle())
    with pytest.raises(ValueError, match=match):
        fmcalc.validate(residual)
    with pytest.raises(ValueError, match=match):
        fmcalc.Term("t", residual, times)
    (explained,) = fmcalc.explain(residual).terms
    assert explained.refused is not None and match.split()[0] in explained.refused


def test_a_declared_bias_accepts_the_conditional_velocity_but_not_no_gradient():
    times = fmcalc.WithIntermediate(fmcalc.UniformTriangle())
    residual, _ = REFUSED["conditional velocity in a network input"]
    term = fmcalc.Term("ct-like", residual, times, biased="finite step, on purpose")
    assert term.biased
    with pytest.raises(ValueError, match="No gradient"):
        fmcalc.Term("t", NO_GRADIENT, times, biased="declared")
    with pytest.raises(TypeError, match="sentence saying why"):
        fmcalc.Term("t", residual, times, biased="")
