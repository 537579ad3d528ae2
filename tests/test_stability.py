"""`check_stability`: the exact map attracts the expected update of every registry
method, on a Gaussian and on the asymmetric mixture, and a flipped surrogate is
caught."""

import jax
import numpy as np
import pytest
from helpers import random_gaussian

import fmcalc
from fmcalc import D, Normalize, S, T, Teacher, X, methods, sg
from fmcalc.testing import check_stability


def _literal_ayf() -> fmcalc.Method:
    """AYF-LMD's tangent surrogate with the sign read off the paper, `F - sg[F - ĝ]`
    in our convention (the registry's spec writes `V - sg[V - ĝ]`)."""
    F = fmcalc.FlowMap(fmcalc.Network())
    g = D(F, at=(X, S, T), along=(0, 0, 1)) - Teacher()(F(X, S, T), T)
    flipped = F(X, S, T) - sg(F(X, S, T) - Normalize(g, 0.1))
    term = fmcalc.Term("lagrangian", flipped, methods.get("ayf-lmd").terms[0].times)
    return fmcalc.Method("ayf-literal", "lagrangian", "distillation", "V", (term,))


@pytest.fixture(scope="module")
def gaussian():
    return random_gaussian(jax.random.key(11), 2)


@pytest.mark.slow
@pytest.mark.parametrize("name", methods.names())
def test_registry_methods_are_stable_on_a_gaussian(name, gaussian):
    method = methods.get(name)
    result = check_stability(method, gaussian, key=jax.random.key(0))
    assert result.passed, str(result)
    assert result.smallest_real > 0
    # A pass for a method that reads the EMA says that the EMA's lag is not modelled.
    assert result.reads_ema == ("ema" in method.networks)
    assert ("lag is not modelled" in str(result)) == result.reads_ema


# Every registry method on the mixture is in benchmarks/results/trust/ (about 6 min
# here); the suite keeps one per rule and the smallest margins.
ON_MIXTURE = ("lsd", "ayf-lmd", "ctm", "meanflow", "shortcut", "psd", "pfmm", "ect")


@pytest.mark.slow
@pytest.mark.parametrize("name", ON_MIXTURE)
def test_registry_methods_are_stable_on_the_asymmetric_mixture(name):
    result = check_stability(methods.get(name), key=jax.random.key(0))
    assert result.passed, str(result)


@pytest.mark.slow
@pytest.mark.parametrize("flow", ["gaussian", "mixture"])
def test_the_literal_ayf_sign_is_unstable(flow, gaussian):
    result = check_stability(
        _literal_ayf(), gaussian if flow == "gaussian" else None, key=jax.random.key(0)
    )
    assert not result.passed
    assert result.smallest_real < -0.5
    assert "FAIL: a direction is pushed away" in str(result)
    # The fixed-point check cannot see it: the update vanishes there either way.
    assert result.update < 1e-6


@pytest.mark.slow
def test_targets_move_with_the_parameters(gaussian):
    """Differentiating through `jax.lax.stop_gradient` gives the Jacobian of a frozen
    target: for the literal AYF surrogate that is the Gauss-Newton matrix of the
    prediction, positive definite, although training runs away. The check follows
    the targets as training does."""
    from fmcalc.testing._stability import _flat, _unflat

    method = _literal_ayf()
    model = fmcalc.testing.perturbed(gaussian, 2)
    batch = method.batch(jax.random.key(1), gaussian.sample(jax.random.key(2), 256))

    def update(theta):
        current = _unflat(model, theta)
        grads = jax.grad(
            lambda m: method.loss(m, batch, teacher=gaussian.velocity, ema=current)[0]
        )(current)
        return _flat(grads)

    frozen = np.linalg.eigvals(np.asarray(jax.jacfwd(update)(_flat(model))))
    assert frozen.real.min() > 0  # a frozen target says "stable"...
    moving = check_stability(method, gaussian, key=jax.random.key(0))
    assert moving.smallest_real < -0.5  # ...the dynamics are not


@pytest.mark.slow
def test_neutral_directions_are_counted_not_judged(gaussian):
    """Consistency training maps to `t = 0` only: the perturbation's `e t` is never
    seen."""
    result = check_stability(methods.get("ct"), gaussian, key=jax.random.key(0))
    assert result.neutral >= 2 and result.passed
    full = check_stability(methods.get("lmd"), gaussian, key=jax.random.key(0))
    assert full.neutral == 0


def test_a_schedule_that_never_settles_needs_a_step():
    method = methods.get("lsd").replace(
        schedules={"never": fmcalc.schedules.Doubling(1.0, 10)}
    )
    with pytest.raises(ValueError, match="never settles"):
        check_stability(method, key=jax.random.key(0))
