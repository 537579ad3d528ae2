"""Per-example losses: values, gradients, tags, and the fixed-point shift of
residual-dependent weightings."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import without_runtime_typechecks

from fmcalc._losses import (
    Adaptive,
    Cosine,
    LogVariance,
    PseudoHuber,
    SquaredError,
    Sum,
    TimeWeighted,
    drop_labels,
    mask_nonfinite,
)


R = jnp.array([3.0, 4.0])
P = jnp.array([1.0, 0.0])
S, T = jnp.asarray(0.5), jnp.asarray(0.25)


def facm_weight(s, t):
    return jnp.cos(jnp.pi * (1 - s) / 2)


def _value(loss, residual=R, prediction=P, **kwargs):
    return float(loss(residual, prediction=prediction, s=S, t=T, **kwargs))


# Values ---------------------------------------------------------------------------


def test_values_on_known_inputs():
    assert _value(SquaredError()) == 25.0
    assert _value(PseudoHuber(c=1.0)) == pytest.approx(math.sqrt(26) - 1)
    c = 0.00054 * math.sqrt(2)
    assert _value(PseudoHuber()) == pytest.approx(math.sqrt(25 + c**2) - c)
    assert _value(Adaptive(p=1.0, c=1e-3)) == pytest.approx(25 / 25.001)
    assert _value(Adaptive(p=0.5, c=0.01)) == pytest.approx(25 / math.sqrt(25.01))
    assert _value(Adaptive(p=0.0)) == 25.0
    log_var = LogVariance()
    assert _value(log_var, aux=lambda s, t: jnp.log(25.0)) == pytest.approx(
        1 + math.log(25)
    )
    assert _value(log_var, aux=lambda s, t: 2 * s + t) == pytest.approx(
        25 * math.exp(-1.25) + 1.25
    )
    # target = P - R = (-2, -4): cos = -2 / (1 · √20).
    assert _value(Cosine()) == pytest.approx(1 + 2 / math.sqrt(20))
    assert _value(TimeWeighted(SquaredError(), facm_weight)) == pytest.approx(
        25 * math.cos(math.pi / 4)
    )
    assert _value(Sum(SquaredError(), Cosine())) == pytest.approx(
        25 + 1 + 2 / math.sqrt(20)
    )


def test_pseudo_huber_default_scale_follows_dimension():
    residual = jnp.full((16,), 1e-5)
    c = 0.00054 * 4
    expected = math.sqrt(16 * 1e-10 + c**2) - c
    assert _value(PseudoHuber(), residual, jnp.zeros(16)) == pytest.approx(expected)


def test_cosine():
    x = jnp.array([1.0, 2.0, -0.5])
    for target, expected in [(3 * x, 0.0), (-x, 2.0), (jnp.array([2.0, -1, 0]), 1.0)]:
        assert _value(Cosine(), x - target, x) == pytest.approx(expected, abs=1e-12)
    # Scale-invariant in both arguments.
    target = jnp.array([0.3, -1.0, 2.0])
    value = _value(Cosine(), x - target, x)
    assert _value(Cosine(), 5 * x - 0.1 * target, 5 * x) == pytest.approx(value)
    # Zero vectors: distance 1, finite gradient.
    zero = jnp.zeros(3)
    assert _value(Cosine(), zero, zero) == 1.0
    grad = jax.grad(lambda p: Cosine()(zero, prediction=p, s=S, t=T))(zero)
    assert jnp.all(jnp.isfinite(grad))


# Gradients -------------------------------------------------------------------------


@pytest.mark.parametrize("p", [1.0, 0.75, 0.5, 0.0, 1.5])
@pytest.mark.parametrize("c", [1e-3, 1e-2])
def test_adaptive_gradient_is_that_of_its_surrogate(p, c):
    residual = jax.random.normal(jax.random.PRNGKey(3), (5,)) * 0.3
    loss = Adaptive(p=p, c=c)

    def surrogate(r):
        squared = jnp.sum(r**2)
        if p == 1:
            return jnp.log(squared + c)
        return (squared + c) ** (1 - p) / (1 - p)

    grad = jax.grad(lambda r: loss(r, prediction=r, s=S, t=T))(residual)
    np.testing.assert_allclose(grad, jax.grad(surrogate)(residual), rtol=1e-12)


def test_pseudo_huber_gradient_is_half_adaptive_square_root():
    residual = jax.random.normal(jax.random.PRNGKey(4), (6,))
    c = 0.2
    grad_ph = jax.grad(lambda r: PseudoHuber(c)(r, prediction=r, s=S, t=T))(residual)
    grad_ad = jax.grad(lambda r: Adaptive(0.5, c**2)(r, prediction=r, s=S, t=T))(
        residual
    )
    np.testing.assert_allclose(grad_ph, grad_ad / 2, rtol=1e-12)


@pytest.mark.slow
def test_log_variance_optimum_is_log_mean_squared_error():
    residuals = jax.random.normal(jax.random.PRNGKey(5), (256, 3)) * 1.7

    def objective(w):
        per_example = jax.vmap(
            lambda r: LogVariance()(r, prediction=r, s=S, t=T, aux=lambda s, t: w)
        )(residuals)
        return jnp.mean(per_example)

    w_star = jnp.log(jnp.mean(jnp.sum(residuals**2, axis=1)))
    assert abs(float(jax.grad(objective)(w_star))) < 1e-12
    assert float(jax.hessian(objective)(w_star)) > 0
    assert objective(w_star) < min(objective(w_star - 0.1), objective(w_star + 0.1))


def test_batched_under_jit_and_vmap():
    key_r, key_p, key_s = jax.random.split(jax.random.PRNGKey(6), 3)
    residual = jax.random.normal(key_r, (32, 4))
    prediction = jax.random.normal(key_p, (32, 4))
    s = jax.random.uniform(key_s, (32,))
    t = s / 2
    for loss in (Adaptive(), PseudoHuber(), Sum(SquaredError(), Cosine())):
        batched = jax.jit(
            jax.vmap(lambda r, p, s, t: loss(r, prediction=p, s=s, t=t))  # noqa: B023
        )(residual, prediction, s, t)
        one = loss(residual[3], prediction=prediction[3], s=s[3], t=t[3])
        assert batched.shape == (32,)
        np.testing.assert_allclose(batched[3], one, rtol=1e-12)
    log_var = jax.vmap(
        lambda r, s, t: LogVariance()(r, prediction=r, s=s, t=t, aux=lambda s, t: s - t)
    )(residual, s, t)
    np.testing.assert_allclose(
        log_var, jnp.exp(-(s - t)) * jnp.sum(residual**2, axis=1) + (s - t)
    )


# Tags -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss, expected",
    [
        (SquaredError(), False),
        (PseudoHuber(), True),
        (Adaptive(), True),
        (LogVariance(), False),
        (Cosine(), True),
        (TimeWeighted(SquaredError(), facm_weight), False),
        (TimeWeighted(Adaptive(p=0.5), facm_weight), True),
        (Sum(SquaredError(), LogVariance()), False),
        (Sum(SquaredError(), Cosine()), True),
    ],
)
def test_depends_on_residual(loss, expected):
    assert loss.depends_on_residual is expected


# The fixed point of marginal-from-conditional learning ----------------------------


def two_point_posterior(s: float, x_s: float):
    """Data on ±1 with equal weights: the posterior of x0 given x_s, and the
    conditional velocities `eps - x0` of the two points."""
    x0 = np.array([1.0, -1.0])
    log_likelihood = -((x_s - (1 - s) * x0) ** 2) / (2 * s**2)
    weights = np.exp(log_likelihood - log_likelihood.max())
    weights /= weights.sum()
    eps = (x_s - (1 - s) * x0) / s
    return weights, eps - x0


def stable_points(loss, s=0.5, t=0.25, x_s=0.3, aux=None):
    """The stable points `V` of `E_{x0 | x_s}[∇_V loss(V - (eps - x0))]`.

    The expected gradient (of the loss as implemented, stop-gradients included) is
    integrated into a potential on a grid of spacing 1e-4; its local minima are the
    stable fixed points of (expected) gradient descent, its global minimum the fixed
    point. Returns `(global, local minima)`.
    """
    weights, velocities = two_point_posterior(s, x_s)
    grid = jnp.linspace(-3.0, 4.0, 70_001)

    def gradient(v, velocity):
        return jax.grad(
            lambda v: loss(
                jnp.stack([v - velocity]),
                prediction=jnp.stack([v]),
                s=s,
                t=t,
                aux=aux,
            )
        )(v)

    @jax.jit
    def expected_gradient(v):
        return sum(
            w * gradient(v, vel) for w, vel in zip(weights, velocities, strict=True)
        )

    g = np.asarray(jax.vmap(expected_gradient)(grid))
    potential = np.concatenate([[0.0], np.cumsum((g[1:] + g[:-1]) / 2) * 1e-4])
    grid = np.asarray(grid)
    inner = (potential[1:-1] < potential[:-2]) & (potential[1:-1] < potential[2:])
    return float(grid[np.argmin(potential)]), grid[1:-1][inner]


def test_two_point_posterior_is_as_stated():
    weights, velocities = two_point_posterior(0.5, 0.3)
    np.testing.assert_allclose(weights, [0.77, 0.23], atol=0.005)
    np.testing.assert_allclose(velocities, [-1.4, 2.6], rtol=1e-12)
    assert weights @ velocities == pytest.approx(-0.474, abs=5e-4)


MEAN = -0.4741


@pytest.mark.parametrize(
    "loss, expected, tolerance",
    [
        (SquaredError(), MEAN, 1e-3),
        (TimeWeighted(SquaredError(), facm_weight), MEAN, 1e-3),
        (LogVariance(), MEAN, 1e-3),
        (Adaptive(p=1.0, c=1e-3), -1.40, 0.02),
        (Adaptive(p=1.0, c=1e-2), -1.40, 0.02),
        (Adaptive(p=0.75, c=1e-3), -1.40, 0.02),
        (Adaptive(p=0.5, c=1e-3), -1.39, 0.02),
        (TimeWeighted(Adaptive(p=1.0), facm_weight), -1.40, 0.02),
        (PseudoHuber(), -1.40, 0.02),
        (PseudoHuber(c=0.5), -1.2, 0.1),
    ],
)
def test_fixed_point_of_marginal_from_conditional_learning(loss, expected, tolerance):
    # A learned log-variance: any function of the times alone.
    fixed_point, _ = stable_points(loss, aux=lambda s, t: 0.7 + s * t)
    assert fixed_point == pytest.approx(expected, abs=tolerance)
    # A residual-dependent weight is exactly what moves it away from the mean.
    assert (abs(fixed_point - MEAN) > 0.5) is loss.depends_on_residual


def test_log_weighting_has_a_second_stable_point():
    # E log(L + c) is not convex: the minority point's velocity is also stable.
    _, minima = stable_points(Adaptive(p=1.0, c=1e-3))
    assert len(minima) == 2
    assert minima[0] == pytest.approx(-1.40, abs=0.01)
    assert minima[1] == pytest.approx(2.60, abs=0.01)
    _, minima = stable_points(SquaredError())
    assert len(minima) == 1
    _, minima = stable_points(Adaptive(p=0.5, c=1e-3))
    assert len(minima) == 1


def test_symmetric_conditional_law_has_no_shift():
    # At x_s = 0 the two points are equally likely: the conditional law of the
    # velocity is symmetric about its mean (0), and every loss lands on it; there the
    # robust and the mean fixed points coincide.
    for loss in (SquaredError(), Adaptive(p=0.5, c=1e-3), PseudoHuber(c=0.5)):
        assert stable_points(loss, x_s=0.0)[0] == pytest.approx(0.0, abs=1e-3)


# The reduction over dimensions ---------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [SquaredError, lambda **kw: PseudoHuber(c=0.3, **kw), Adaptive,
     lambda **kw: Adaptive(p=0.5, c=0.1, **kw), LogVariance],
)  # fmt: skip
def test_mean_reduction_is_the_loss_of_the_residual_over_root_dim(make):
    """`reduction="mean"` puts `‖R‖²/dim` where the sum puts `‖R‖²`: the loss of
    `R` under the mean equals the loss of `R/√dim` under the sum, value and
    gradient, with every constant unchanged; the default is the sum."""
    residual = jax.random.normal(jax.random.key(0), (7,))
    aux = lambda s, t: 0.3 * s - t  # noqa: E731
    kw = dict(prediction=residual, s=S, t=T, aux=aux)
    mean, total = make(reduction="mean"), make()
    assert total == make(reduction="sum")
    scaled = residual / math.sqrt(7)
    np.testing.assert_allclose(mean(residual, **kw), total(scaled, **kw), rtol=1e-12)
    grad_mean = jax.grad(lambda r: mean(r, **kw))(residual)
    grad_total = jax.grad(lambda r: total(r / math.sqrt(7), **kw))(residual)
    np.testing.assert_allclose(grad_mean, grad_total, rtol=1e-12)
    assert "‖R‖²/dim" in mean.formula and "/dim" not in total.formula
    assert mean.gradient_weight != total.gradient_weight


@pytest.mark.parametrize("make", [SquaredError, PseudoHuber, Adaptive, LogVariance])
def test_an_unknown_reduction_is_refused_by_name(make):
    name = make.__name__
    with (
        without_runtime_typechecks(),
        pytest.raises(
            ValueError, match=rf"`{name}\(reduction=...\)` must be 'sum'.*'mean'.*'avg'"
        ),
    ):
        make(reduction="avg")


def test_mean_squared_error_is_the_sum_over_dim():
    residual = jnp.arange(1.0, 7.0)
    kw = dict(prediction=residual, s=S, t=T)
    mean = SquaredError(reduction="mean")(residual, **kw)
    assert float(mean) == pytest.approx(float(jnp.sum(residual**2)) / 6, rel=1e-15)
    assert SquaredError(reduction="mean").gradient_weight == "2/dim"


# Errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda: PseudoHuber(c=0.0), ValueError, r"c=.*positive.*0\.0"),
        (lambda: PseudoHuber(c=-1.0), ValueError, r"c=.*positive"),
        (lambda: Adaptive(p=-0.5), ValueError, r"p=.*≥ 0.*-0\.5"),
        (lambda: Adaptive(c=0.0), ValueError, r"c=.*positive"),
        (lambda: Adaptive(p=math.inf), ValueError, r"p=.*finite"),
        (lambda: Adaptive(p="1"), TypeError, r"p=.*Python number"),
        (lambda: Sum(), ValueError, r"at least one loss"),
        (lambda: TimeWeighted(SquaredError(), 2.0), TypeError, r"weight"),
    ],
)
def test_bad_parameters(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_log_variance_needs_aux():
    with pytest.raises(ValueError, match=r"aux\(s, t\) -> scalar.*aux=None"):
        LogVariance()(R, prediction=P, s=S, t=T)
    with pytest.raises(ValueError, match=r"must return a scalar; got shape \(2,\)"):
        LogVariance()(R, prediction=P, s=S, t=T, aux=lambda s, t: jnp.zeros(2))


def test_time_weight_must_be_scalar():
    loss = TimeWeighted(SquaredError(), lambda s, t: jnp.ones(3))
    with pytest.raises(ValueError, match=r"must return a scalar; got shape \(3,\)"):
        loss(R, prediction=P, s=S, t=T)


# Helpers ---------------------------------------------------------------------------


def test_mask_nonfinite():
    x = jnp.array([1.0, jnp.nan, jnp.inf, 2.0, -jnp.inf])
    masked, count = mask_nonfinite(x)
    np.testing.assert_array_equal(masked, [1.0, 0.0, 0.0, 2.0, 0.0])
    assert int(count) == 2
    grad = jax.grad(lambda x: jnp.sum(mask_nonfinite(x)[0]))(x)
    np.testing.assert_array_equal(grad, [1.0, 0.0, 0.0, 1.0, 0.0])
    masked, count = jax.jit(mask_nonfinite)(jnp.arange(3.0))
    np.testing.assert_array_equal(masked, [0.0, 1.0, 2.0])
    assert int(count) == 3


def test_drop_labels():
    key = jax.random.PRNGKey(7)
    labels = jnp.arange(20_000) % 10
    dropped = jax.jit(lambda k, y: drop_labels(k, y, 0.1))(key, labels)
    is_null = np.asarray(dropped == -1)
    assert abs(is_null.mean() - 0.1) < 0.01
    np.testing.assert_array_equal(dropped[~is_null], labels[~is_null])
    np.testing.assert_array_equal(drop_labels(key, labels, 0.0), labels)
    assert jnp.all(drop_labels(key, labels, 1.0, null=10) == 10)
    assert drop_labels(key, labels, 0.5).dtype == labels.dtype
    with pytest.raises(ValueError, match=r"probability=.*\[0, 1\].*1\.5"):
        drop_labels(key, labels, 1.5)
