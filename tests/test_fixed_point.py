"""`check_fixed_point` on its default asymmetric mixture: what it detects, how it
treats finite-difference truncation, curricula, declared biases and dtypes.

The figures its docstring states are asserted here."""

import warnings

import jax
import jax.numpy as jnp
import pytest
from helpers import random_gaussian

import fmcalc
from fmcalc import D, FiniteDifference, FlowMap, Network, S, T, X, methods, sg
from fmcalc.testing import asymmetric_mixture, check_fixed_point


V = Network()
F = FlowMap(V)


def _anchor_method(loss) -> fmcalc.Method:
    anchor = fmcalc.Term(
        "anchor", fmcalc.flow_matching(), fmcalc.Equal(fmcalc.Uniform()), loss
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fmcalc.FixedPointShiftWarning)
        return fmcalc.Method(
            "anchor", "diagonal", "marginal-from-conditional", "V", (anchor,)
        )


@pytest.mark.slow
def test_default_flow_is_the_asymmetric_mixture():
    result = check_fixed_point(methods.get("flow-matching"), key=jax.random.key(0))
    assert result.passed, str(result)
    flow = asymmetric_mixture()
    assert flow.weights.shape == (2,) and float(flow.weights[0]) == 0.8


@pytest.mark.slow
@pytest.mark.parametrize(
    "loss", [fmcalc.PseudoHuber(), fmcalc.Adaptive(), fmcalc.Cosine()], ids=repr
)
def test_robust_losses_on_the_conditional_velocity_fail_at_the_defaults(loss):
    result = check_fixed_point(_anchor_method(loss), key=jax.random.key(0))
    (check,) = result.terms
    assert check.relative_residual < 1e-12  # the marginal residual is exact...
    assert check.p_value < 1e-6, str(result)  # ...but the weighting shifts it
    assert check.relative_bias > 0.1
    assert not result.passed
    assert "FAIL: the conditional velocity shifts the expected update" in str(result)


@pytest.mark.slow
def test_the_same_losses_show_no_shift_on_symmetric_data():
    """A Gaussian's conditional law of `eps - x0` is symmetric: a robust location is
    its mean, so the same check passes there (why the default is skewed)."""
    gaussian = random_gaussian(jax.random.key(11), 2)
    for loss in (fmcalc.PseudoHuber(), fmcalc.Adaptive()):
        result = check_fixed_point(
            _anchor_method(loss), gaussian, key=jax.random.key(0)
        )
        assert result.passed, str(result)


@pytest.mark.slow
def test_plain_squared_error_passes_with_a_noise_level_bias():
    result = check_fixed_point(
        _anchor_method(fmcalc.SquaredError()), key=jax.random.key(0)
    )
    (check,) = result.terms
    assert result.passed and check.relative_bias < 0.05, str(result)


def _lsd(derivative) -> fmcalc.Method:
    return methods.get("lsd", derivative=derivative)


@pytest.mark.slow
def test_central_difference_truncation_is_reported_and_allowed():
    result = check_fixed_point(
        _lsd(FiniteDifference(1e-3, "central")), key=jax.random.key(0)
    )
    assert result.passed, str(result)
    lagrangian = result.terms[1]
    assert 1e-8 < lagrangian.truncation <= lagrangian.expected_truncation
    assert lagrangian.expected_truncation == pytest.approx(
        fmcalc.testing.TRUNCATION_CONSTANT * 1e-6
    )
    # Beyond the truncation, the residual is round-off.
    assert lagrangian.relative_residual - lagrangian.truncation < 1e-8
    assert "finite-difference truncation" in str(result)
    # Without finite differences there is nothing to take out.
    assert result.terms[0].truncation == 0 == result.terms[0].expected_truncation


@pytest.mark.slow
@pytest.mark.parametrize("scheme, order", [("forward", 1), ("central", 2)])
def test_truncation_shrinks_with_the_order_of_the_scheme(scheme, order):
    """What is reported as truncation behaves as truncation: halving the step
    divides it by `2^order`, and the allowance scales the same way."""
    checks = [
        check_fixed_point(
            _lsd(FiniteDifference(h, scheme)), key=jax.random.key(0), n=400
        ).terms[1]
        for h in (2e-3, 1e-3)
    ]
    assert checks[0].truncation / checks[1].truncation == pytest.approx(
        2**order, rel=0.15
    )
    assert checks[0].expected_truncation / checks[1].expected_truncation == (
        pytest.approx(2**order)
    )


@pytest.mark.slow
def test_a_wrong_spec_with_finite_differences_fails_beyond_truncation():
    """The time argument of the target slipped (`s` for `t`): not truncation."""
    fd = FiniteDifference(1e-3, "central")
    slipped = D(F, at=(X, S, T), along=(0, 0, 1), by=fd) - sg(
        fmcalc.Teacher()(F(X, S, T), S)
    )
    term = fmcalc.Term("lagrangian", slipped, fmcalc.UniformTriangle())
    method = fmcalc.Method("slip", "lagrangian", "distillation", "V", (term,))
    result = check_fixed_point(method, key=jax.random.key(0), n=200)
    (check,) = result.terms
    assert not result.passed
    assert check.relative_residual - check.truncation > 1e-2
    assert "the residual beyond truncation" in str(result)


@pytest.mark.slow
def test_curricula_are_checked_where_they_settle():
    """AYF-EMD's tangent warm-up reaches 1 at step 10k; at step 0 it is 0, which is
    not the method trained for most of a run (and not at its fixed point)."""
    method = methods.get("ayf-emd")
    result = check_fixed_point(method, key=jax.random.key(0), n=400)
    assert result.step == 10_000 and result.passed, str(result)
    early = check_fixed_point(method, key=jax.random.key(0), n=400, step=0)
    assert early.step == 0 and not early.passed
    assert "training step 0" in str(early)


@pytest.mark.slow
def test_float32_tolerance_follows_the_dtype():
    gaussian = fmcalc.flows.Gaussian(
        jnp.array([0.5, -1.0], jnp.float32),
        jnp.array([[1.0, 0.3], [0.3, 0.5]], jnp.float32),
    )
    result = check_fixed_point(methods.get("ayf-emd"), gaussian, key=jax.random.key(0))
    assert result.rtol == 10 * fmcalc.testing.tolerance(jnp.float32)
    assert result.passed, str(result)
    assert result.terms[0].relative_residual > 1e-7  # float32 round-off, above 1e-6?
    float64 = check_fixed_point(
        methods.get("ayf-emd"),
        random_gaussian(jax.random.key(0), 2),
        key=jax.random.key(0),
    )
    assert float64.rtol == 1e-6


@pytest.mark.slow
def test_declared_biases_are_measured_but_pass():
    result = check_fixed_point(methods.get("ct"), key=jax.random.key(0), n=400)
    (check,) = result.terms
    assert check.declared and not check.at_fixed_point and check.passed
    assert "biased as declared" in str(result)
    meanflow = check_fixed_point(methods.get("meanflow"), key=jax.random.key(0))
    (check,) = meanflow.terms
    assert check.p_value < 1e-6 and check.passed  # MeanFlow's declared shift
    # A declared shift excuses the paired test, not a residual off the map.
    moved = fmcalc.testing.perturbed(asymmetric_mixture(), 2, key=jax.random.key(1))
    off = check_fixed_point(
        methods.get("meanflow"), key=jax.random.key(0), n=400, model=moved
    )
    assert not off.passed and "FAIL: the residual" in str(off)
