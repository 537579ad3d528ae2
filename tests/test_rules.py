"""The consistency rules built from primitives, checked on the exact Gaussian map."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import loglog_slope, random_batch, random_gaussian, residuals

import fmcalc
from fmcalc import JVP, ConditionalVelocity, Diagonal, FiniteDifference, Teacher, U
from fmcalc.cost import estimate
from fmcalc.testing import check_unbiased, perturbed


def _rules(derivative):
    """Every rule, form and stop-gradient placement that takes a derivative."""
    out = {}
    for form, placements in (
        ("F", ("none", "target", "derivative", "tangent")),
        ("V", ("none", "target", "derivative")),
    ):
        for placement in placements:
            out[f"lagrangian-{form}-{placement}"] = fmcalc.lagrangian(
                form=form, stop_gradient=placement, derivative=derivative
            )
    for form, placements in (
        ("F", ("none", "tangent", "spatial")),
        ("V", ("none", "target", "derivative")),
    ):
        for placement in placements:
            out[f"eulerian-{form}-{placement}"] = fmcalc.eulerian(
                form=form, stop_gradient=placement, derivative=derivative
            )
    out["meanflow"] = fmcalc.meanflow(derivative=derivative, velocity=Teacher())
    out["improved-meanflow"] = fmcalc.improved_meanflow(
        derivative=derivative, velocity=Teacher()
    )
    out["lsd"] = fmcalc.lagrangian(form="F", velocity=Diagonal(), derivative=derivative)
    return out


def _derivative_free_rules():
    return {
        "flow-matching": fmcalc.flow_matching(velocity=Teacher()),
        "compositional-V-mid": fmcalc.compositional(),
        "compositional-V-u": fmcalc.compositional(u=U),
        "compositional-F-mid": fmcalc.compositional(form="F", stop_gradient="none"),
        "compositional-F-u": fmcalc.compositional(form="F", u=U),
    }


@pytest.fixture(scope="module")
def setup():
    flow = random_gaussian(jax.random.PRNGKey(0), 6)
    batch = random_batch(jax.random.PRNGKey(1), flow, 256)
    return flow, batch


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted({**_rules(JVP()), **_derivative_free_rules()}))
def test_exact_map_is_zero_residual(setup, name):
    flow, batch = setup
    expr = {**_rules(JVP()), **_derivative_free_rules()}[name]
    r = residuals(expr, batch, model=flow, teacher=flow.velocity)
    assert r.shape == batch.x0.shape
    assert float(jnp.max(jnp.abs(r))) <= 1e-10


@pytest.mark.slow
@pytest.mark.parametrize("scheme,order", [("forward", 1), ("central", 2)])
@pytest.mark.parametrize(
    "name",
    [
        "lagrangian-F-none",
        "lagrangian-V-target",
        "eulerian-F-none",
        "eulerian-F-spatial",
        "meanflow",
        "improved-meanflow",
        "lsd",
    ],
)
def test_finite_difference_converges_at_its_order(setup, name, scheme, order):
    flow, batch = setup
    # Keep the stencil inside [0, 1]: times at least 0.15 from the edges.
    batch = eqx.tree_at(
        lambda b: (b.s, b.t),
        batch,
        (0.15 + 0.7 * batch.s, 0.15 + 0.7 * batch.t),
    )
    steps = np.logspace(-4, -1, 5)
    errors = []
    for h in steps:
        expr = _rules(FiniteDifference(float(h), scheme))[name]
        r = residuals(expr, batch, model=flow, teacher=flow.velocity)
        errors.append(float(jnp.max(jnp.abs(r))))
    errors = np.array(errors)
    assert errors[-1] > 1e-6, "the truncation error must be visible at h = 0.1"
    assert abs(loglog_slope(steps, errors) - order) <= 0.3, errors


def _loss_and_grad(expr, model, batch, teacher):
    def loss(m):
        return fmcalc.residual_loss(expr, m, batch, teacher=teacher, check=False)

    value, grad = eqx.filter_value_and_grad(loss)(model)
    flat = jnp.concatenate(
        [g.ravel() for g in jax.tree.leaves(eqx.filter(grad, eqx.is_inexact_array))]
    )
    return float(value), np.asarray(flat)


@pytest.mark.slow
@pytest.mark.parametrize(
    "family,placements",
    [
        ("lagrangian-V", ("none", "target", "derivative")),
        ("lagrangian-F", ("none", "target", "derivative", "tangent")),
        ("eulerian-V", ("none", "target", "derivative")),
        ("eulerian-F", ("none", "tangent", "spatial")),
    ],
)
def test_moving_the_stop_gradient_changes_gradient_not_loss(setup, family, placements):
    flow, batch = setup
    model = perturbed(flow, 6, key=jax.random.PRNGKey(2))
    rule, form = family.split("-")
    build = getattr(fmcalc, rule)
    # The model's own diagonal as the velocity, so that a stop-gradient on the
    # velocity term matters too.
    results = {
        p: _loss_and_grad(
            build(form=form, stop_gradient=p, velocity=Diagonal()),
            model,
            batch,
            flow.velocity,
        )
        for p in placements
    }
    values = np.array([v for v, _ in results.values()])
    np.testing.assert_allclose(values, values[0], rtol=1e-12)
    assert values[0] > 1e-3
    grads = [g for _, g in results.values()]
    for i in range(len(grads)):
        for j in range(i + 1, len(grads)):
            diff = np.linalg.norm(grads[i] - grads[j])
            assert diff > 1e-3 * np.linalg.norm(grads[i]), (
                placements[i],
                placements[j],
            )


@pytest.mark.parametrize(
    "expr",
    [
        fmcalc.lagrangian(form="F", stop_gradient="none"),
        fmcalc.eulerian(form="V", stop_gradient="none"),
    ],
    ids=["lagrangian", "eulerian"],
)
@pytest.mark.slow
def test_backprop_through_jvp_is_the_true_gradient(setup, expr):
    """With no stop-gradient the semigradient is the gradient of the loss: compare
    with a central difference of the loss value in parameter space (independent of
    any autodiff through the JVP)."""
    flow, batch = setup
    model = perturbed(flow, 6, key=jax.random.PRNGKey(3))
    direction = perturbed(flow, 6, key=jax.random.PRNGKey(4), scale=1.0)

    def theta(m):
        return (m.A, m.b, m.c, m.e)

    def loss(m):
        return fmcalc.residual_loss(expr, m, batch, teacher=flow.velocity)

    grad = theta(eqx.filter_grad(loss)(model))
    slope = sum(
        float(jnp.vdot(g, d)) for g, d in zip(grad, theta(direction), strict=True)
    )

    def loss_at(h):
        shifted = [
            p + h * d for p, d in zip(theta(model), theta(direction), strict=True)
        ]
        return float(loss(eqx.tree_at(theta, model, shifted)))

    h = 1e-5
    numeric = (loss_at(h) - loss_at(-h)) / (2 * h)
    np.testing.assert_allclose(slope, numeric, rtol=1e-6)


@pytest.mark.slow
def test_backprop_through_jvp_matches_hand_written_jax(setup):
    """LMD (no stop-gradient) against a plain-JAX implementation."""
    flow, batch = setup
    model = perturbed(flow, 6, key=jax.random.PRNGKey(5))
    expr = fmcalc.lagrangian(form="F", stop_gradient="none")

    def by_hand(m):
        def per_example(x, s, t):
            F, dF = jax.jvp(
                lambda b: x + (b - s) * m(x, s, b), (t,), (jnp.ones_like(t),)
            )
            return jnp.sum((dF - flow.velocity(F, t)) ** 2)

        return jnp.mean(jax.vmap(per_example)(batch.x, batch.s, batch.t))

    reference = eqx.filter_grad(by_hand)(model)
    ours = eqx.filter_grad(
        lambda m: fmcalc.residual_loss(expr, m, batch, teacher=flow.velocity)
    )(model)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(reference), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_marginal_from_conditional():
    flow = random_gaussian(jax.random.PRNGKey(6), 4)
    model = perturbed(flow, 4, key=jax.random.PRNGKey(7))
    key = jax.random.PRNGKey(8)
    meanflow = check_unbiased(fmcalc.meanflow(), model, flow, key=key, n=2000)
    assert meanflow.unbiased and meanflow.p_value > 1e-6
    lagrangian = check_unbiased(fmcalc.lagrangian(), model, flow, key=key, n=2000)
    assert not lagrangian.unbiased and lagrangian.p_value < 1e-6
    # The printout gives each relative bias with its Monte Carlo scale: MeanFlow's
    # is about one standard error (pure noise), the Lagrangian's several.
    assert meanflow.relative_bias < 4 * meanflow.relative_noise
    assert lagrangian.relative_bias > 4 * lagrangian.relative_noise
    assert "no shift detected" in str(meanflow) and "FAIL" in str(lagrangian)
    with pytest.raises(ValueError, match="only at \\(x, s\\)"):
        fmcalc.lagrangian(velocity=ConditionalVelocity())


class _Counting(eqx.Module):
    flow: fmcalc.flows.Gaussian
    calls: list = eqx.field(static=True)

    def __call__(self, x, s, t, *, cond=None):
        self.calls.append(None)
        return self.flow(x, s, t)


@pytest.mark.parametrize(
    "expr,calls",
    [
        (fmcalc.meanflow(), 1),
        (fmcalc.lagrangian(form="F", velocity=Diagonal()), 2),
        (fmcalc.compositional(), 3),
        (fmcalc.meanflow(derivative=FiniteDifference(1e-3), velocity=Teacher()), 2),
        (fmcalc.eulerian(form="F", stop_gradient="spatial"), 1),
    ],
    ids=["meanflow", "lsd", "shortcut", "meanflow-fd", "esd"],
)
def test_each_distinct_call_is_computed_once(setup, expr, calls):
    flow, batch = setup
    model = _Counting(flow, [])
    example = jax.tree.map(lambda a: a[0], batch)
    fmcalc.evaluate(expr, example, model=model, teacher=flow.velocity)
    assert len(model.calls) == calls


def test_formulas_print():
    assert str(fmcalc.meanflow()) == (
        "V(x, s, t) - sg[v_c(x, s) + (t - s) * D[V](x, s, t)·(v_c(x, s), 1, 0)]"
    )
    assert str(fmcalc.flow_matching()) == "V(x, s, s) - v_c(x, s)"
    assert str(fmcalc.compositional(form="F", u=U)) == (
        "F(x, s, t) - sg[F(F(x, s, u), u, t)]"
    )


@pytest.mark.parametrize(
    "expr,fpe",
    [
        (fmcalc.flow_matching(), 3),
        (fmcalc.meanflow(), 4),
        (fmcalc.improved_meanflow(), 5),
        (fmcalc.compositional(), 5),
        (fmcalc.lagrangian(form="F", velocity=Diagonal()), 7),
        # The teacher at F(x, s, t) is backpropagated for its input only: 1, not 2.
        (fmcalc.lagrangian(form="F", stop_gradient="none"), 8),
        (fmcalc.eulerian(form="F", stop_gradient="none"), 7),
        (
            fmcalc.meanflow(
                derivative=FiniteDifference(1e-3, "central"), velocity=Diagonal()
            ),
            6,
        ),
    ],
    ids=[
        "fm",
        "meanflow",
        "imf",
        "shortcut",
        "lsd",
        "lmd",
        "emd",
        "meanflow-central-fd",
    ],
)
def test_static_cost_estimate(expr, fpe):
    assert estimate(expr).total == fpe
