"""Every registered method: its place in the taxonomy, its batch and loss, and the
fixed-point test (the exact map must not move under the method's update)."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import loglog_slope, random_gaussian
from test_mixture import random_mixture

import fmcalc
from fmcalc import D, S, T, U, X, methods, sg
from fmcalc.testing import check_fixed_point, descent_alignment, perturbed


# (rule, learning, output) from the seed's table: 🐶🐱🐔 / 🧑‍🏫🪃🌊 / 🎯🚀.
TABLE = {
    "flow-matching": ("diagonal", "marginal-from-conditional", "V"),
    "lmd": ("lagrangian", "distillation", "V"),
    "lsd": ("lagrangian", "self-distillation", "V"),
    "ayf-lmd": ("lagrangian", "distillation", "V"),
    "tvm": ("lagrangian", "self-distillation", "V"),
    "freeflow": ("lagrangian", "distillation", "V"),
    "pid": ("lagrangian", "distillation", "F"),
    "ct": ("eulerian", "self-distillation", "F"),
    "cd": ("eulerian", "distillation", "F"),
    "ctm": ("eulerian", "distillation", "F"),
    "emd": ("eulerian", "distillation", "V"),
    "esd": ("eulerian", "self-distillation", "V"),
    "ayf-emd": ("eulerian", "distillation", "V"),
    "soflow": ("eulerian", "self-distillation", "V"),
    "facm": ("eulerian", "distillation", "V"),
    "meanflow": ("eulerian", "marginal-from-conditional", "V"),
    "imf": ("eulerian", "marginal-from-conditional", "V"),
    "shortcut": ("compositional", "self-distillation", "V"),
    "splitmeanflow": ("compositional", "distillation", "V"),
    "psd": ("compositional", "self-distillation", "V"),
    "fmm": ("compositional", "marginal-from-conditional", "V"),
    "pfmm": ("compositional", "distillation", "V"),
}
EXTRAS = {
    "sct": ("eulerian", "self-distillation", "V"),
    "ect": ("eulerian", "self-distillation", "F"),
}
ALL = {**TABLE, **EXTRAS}

# Consistency at a finite grid step: biased by construction (tested separately).
FINITE_STEP = {"ct", "cd", "ect"}
# Finite differences: a small central step makes their truncation error negligible.
FD_METHODS = {"freeflow", "pid", "soflow"}
# A residual-dependent weighting on a conditional term moves the fixed point on
# non-Gaussian data (tested separately); the mixture test uses plain MSE for them
# (for sCT: no tangent normalisation).
ROBUST_CONDITIONAL = {"meanflow", "imf"}
PLAIN = {
    "meanflow": {"loss": fmcalc.SquaredError()},
    "imf": {"loss": fmcalc.SquaredError()},
    "sct": {"c": None},
}
# Past every curriculum (AYF's tangent warm-up reaches r = 1 at 10k steps).
LATE = 10**6


def _overrides(name: str, step: float) -> dict:
    if name in FD_METHODS:
        return {"derivative": fmcalc.FiniteDifference(step, "central")}
    return {}


@pytest.fixture(scope="module")
def gaussian():
    return random_gaussian(jax.random.key(11), 4)


@pytest.fixture(scope="module")
def mixture():
    # Fixed RK4 steps: as accurate here as the adaptive solve (tests/test_mixture.py),
    # smooth in (x, s, t), so finite differences of it converge at their own order,
    # and its derivatives compile in about half the time.
    return random_mixture(1, 4, 2, steps=256)


def test_registry_lists_all_methods():
    assert methods.names()[:22] == list(TABLE)  # the seed's order, then extras
    assert sorted(methods.names()) == sorted(ALL)


@pytest.mark.parametrize("name", sorted(ALL))
def test_taxonomy_and_printout(name):
    method = methods.get(name)
    assert (method.rule, method.learning, method.output) == ALL[name]
    assert method.name == name
    text = str(method)
    for term in method.terms:
        assert str(term.residual) in text
    assert method.cost() > 0


def test_get_rejects_unknown_names_and_options():
    with pytest.raises(ValueError, match="Unknown method 'meanflw'"):
        methods.get("meanflw")
    with pytest.raises(TypeError, match="has no option"):
        methods.get("meanflow", stepsize=0.1)


def test_overrides_move_one_axis():
    fd = fmcalc.FiniteDifference(1e-3, "central")
    method = methods.get("lsd", derivative=fd)
    assert "D~fd" in str(method) or "fd" in str(method)
    assert methods.get("lsd").cost() != method.cost()
    plain = methods.get("meanflow", loss=fmcalc.SquaredError())
    assert isinstance(plain.terms[0].loss, fmcalc.SquaredError)
    with pytest.raises(ValueError, match="finite difference along"):
        methods.get("meanflow").replace(derivative=fd)
    moved = methods.get("emd").replace(derivative=fd)
    leaves = jax.tree.leaves(
        moved, is_leaf=lambda x: isinstance(x, fmcalc.AbstractDerivative)
    )
    assert any(leaf == fd for leaf in leaves)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ALL))
def test_batch_and_loss_are_deterministic(name, gaussian):
    method = methods.get(name)
    model = perturbed(gaussian, 4, key=jax.random.key(1))
    x0 = gaussian.sample(jax.random.key(2), 16)
    a = method.batch(jax.random.key(3), x0)
    b = method.batch(jax.random.key(3), x0)
    assert jax.tree.all(jax.tree.map(jnp.array_equal, a, b))
    assert (a.u is not None) == any(term.times.uses_u for term in method.terms)
    assert bool(jnp.all((a.s >= a.t) | (method.name == "fmm")))
    networks = dict(teacher=gaussian.velocity, ema=model, aux=gaussian)
    loss, metrics = method.loss(model, a, **networks)
    again, _ = eqx.filter_jit(method.loss)(model, a, **networks)
    assert jnp.isfinite(loss)
    np.testing.assert_allclose(again, loss, rtol=1e-12)
    assert set(metrics) == {
        f"{term.name}/{m}" for term in method.terms for m in ("loss", "residual")
    }


# --------------------------------------------------------------- the fixed point


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(ALL) - FINITE_STEP))
def test_exact_gaussian_map_is_a_fixed_point(name, gaussian):
    method = methods.get(name, **_overrides(name, 1e-5))
    result = check_fixed_point(method, gaussian, key=jax.random.key(5), step=LATE)
    assert result.passed, str(result)
    # At θ ≠ 0 every term has a clearly nonzero residual and update: the check can
    # fail.
    moved = perturbed(gaussian, 4, key=jax.random.key(6))
    off = check_fixed_point(
        method, gaussian, key=jax.random.key(5), step=LATE, model=moved
    )
    assert not any(check.at_fixed_point for check in off.terms)
    for check in off.terms:
        assert check.relative_residual > 1e-2, str(off)
        assert check.update > 1e-2, str(off)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(ALL) - FINITE_STEP))
def test_exact_mixture_map_is_a_fixed_point(name, mixture):
    overrides = {**_overrides(name, 1e-4), **PLAIN.get(name, {})}
    method = methods.get(name, **overrides)
    result = check_fixed_point(
        method, mixture, key=jax.random.key(7), n=1000, step=LATE
    )
    assert result.passed, str(result)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ROBUST_CONDITIONAL))
def test_robust_weighting_moves_the_mixture_fixed_point(name, mixture, capsys):
    """MeanFlow's adaptive weight and pseudo-Huber make the fixed point a robust
    location of `eps - x0 | x_s` instead of its mean: on a mixture the exact map is
    not a fixed point (DESIGN.md, "Robust weightings move the fixed point"); with
    plain MSE it is."""
    shifted = {}
    for loss in (None, fmcalc.PseudoHuber()):
        method = methods.get(name) if loss is None else methods.get(name, loss=loss)
        result = check_fixed_point(method, mixture, key=jax.random.key(3), n=4000)
        (check,) = result.terms
        assert check.relative_residual < 1e-6
        assert check.p_value < 1e-6, str(result)
        shifted[type(method.terms[0].loss).__name__] = check.relative_bias
    plain = methods.get(name, loss=fmcalc.SquaredError())
    result = check_fixed_point(plain, mixture, key=jax.random.key(3), n=4000)
    assert result.passed, str(result)
    (check,) = result.terms
    for bias in shifted.values():
        assert bias > 2 * check.relative_bias
    with capsys.disabled():
        print(
            f"\n{name} on a mixture, expected update at the exact map relative to one "
            f"example's: {shifted} vs {check.relative_bias:.3f} with MSE (noise level)"
        )


@pytest.mark.slow
def test_same_weighting_keeps_the_gaussian_fixed_point(gaussian):
    for loss in (fmcalc.Adaptive(p=1.0, c=1e-3), fmcalc.PseudoHuber()):
        method = methods.get("meanflow", loss=loss)
        result = check_fixed_point(method, gaussian, key=jax.random.key(3), n=4000)
        assert result.passed, str(result)


class _Gap(fmcalc.AbstractTimeSampler):
    """`s ~ U[0.3, 0.9]`, `t = 0`, `u = s - gap`: consistency pairs a fixed step
    apart."""

    gap: float
    uses_u = True
    ordered = True

    def __call__(self, key, n, *, dtype=jnp.float32):
        s = jax.random.uniform(key, (n,), dtype, 0.3, 0.9)
        return fmcalc.Times(s, jnp.zeros_like(s), s - self.gap)


def _expected_update(method, flow, n, key):
    """`(‖E g‖, E ‖g‖)` of the per-example parameter update at the exact map."""
    model = perturbed(flow, 4)
    x0 = flow.sample(jax.random.key(0), n)
    batch = method.batch(key, x0)
    rows = jax.tree.map(lambda a: a[:, None], batch)

    @jax.jit
    @jax.vmap
    def grads(row):
        g = eqx.filter_grad(
            lambda m: method.loss(m, row, teacher=flow.velocity, ema=model)[0]
        )(model)
        return jnp.concatenate([leaf.ravel() for leaf in jax.tree.leaves(g)])

    g = np.asarray(grads(rows))
    return np.linalg.norm(g.mean(0)), np.linalg.norm(g, axis=1).mean()


@pytest.mark.slow
def test_consistency_bias_shrinks_at_first_order(gaussian):
    """CT and CD compare the map at `s` with the EMA map one Euler step (of
    `eps - x0`, or of the teacher) away. Divided by the step `Δs` (iCT's weight
    `1/Δs`, under which the update tends to the continuous-time one), the expected
    update at the exact map is `O(Δs)`: nonzero at any finite step, vanishing at
    first order. CD's residual itself is the Euler step's local error, `O(Δs²)`."""
    gaps = np.array([0.16, 0.08, 0.04, 0.02])
    for name in ("ct", "cd"):
        bias = []
        for gap in gaps:
            method = methods.get(name, times=_Gap(float(gap)))
            mean, size = _expected_update(method, gaussian, 100_000, jax.random.key(1))
            bias.append(mean / gap)
            assert mean > 0.01 * size  # nonzero beyond Monte Carlo noise (~0.003)
        assert abs(loglog_slope(gaps, bias) - 1) < 0.3, (name, bias)
    residuals = []
    for gap in gaps:
        method = methods.get("cd", times=_Gap(float(gap)))
        result = check_fixed_point(method, gaussian, key=jax.random.key(2), n=200)
        residuals.append(result.terms[0].relative_residual)
    assert abs(loglog_slope(gaps, residuals) - 2) < 0.3, residuals


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ALL))
def test_update_points_back_to_the_exact_map(name, gaussian):
    """Near the exact map the expected update points back to it (the fixed-point
    test cannot see an update's sign)."""
    method = methods.get(name)
    for seed in range(3):
        cosine = descent_alignment(
            method, gaussian, key=jax.random.key(seed), step=LATE
        )
        assert cosine > 0.05, (seed, cosine)


@pytest.mark.slow
def test_flipped_tangent_surrogate_points_away(gaussian):
    """AYF-LMD's tangent surrogate written `F - sg[F - ĝ]` has the same loss value
    and fixed point but pushes the map away from it for `s > t`."""
    F = fmcalc.FlowMap(fmcalc.Network())
    g = D(F, at=(X, S, T), along=(0, 0, 1)) - fmcalc.Teacher()(F(X, S, T), T)
    flipped = F(X, S, T) - sg(F(X, S, T) - fmcalc.Normalize(g, 0.1))
    term = fmcalc.Term("lagrangian", flipped, fmcalc.UniformTriangle())
    method = fmcalc.Method("flipped", "lagrangian", "distillation", "V", (term,))
    assert check_fixed_point(method, gaussian, key=jax.random.key(0)).passed
    assert descent_alignment(method, gaussian, key=jax.random.key(0)) < -0.05


# ------------------------------------------------------------- broken variants

v_c = fmcalc.ConditionalVelocity()
V = fmcalc.Network()
Fmap = fmcalc.FlowMap(V)


def _broken(residual) -> fmcalc.Method:
    term = fmcalc.Term("broken", residual, fmcalc.UniformTriangle(), biased="test")
    return fmcalc.Method(
        "broken", "eulerian", "marginal-from-conditional", "V", (term,)
    )


def _meanflow_without_stop_gradient():
    v = v_c(X, S)
    return V(X, S, T) - (v + (T - S) * D(V, at=(X, S, T), along=(v, 1, 0)))


def _eulerian_with_conditional_velocity():
    return D(Fmap, at=(X, S, T), along=(v_c(X, S), 1, 0))


@pytest.mark.parametrize(
    "build",
    [
        _meanflow_without_stop_gradient,
        _eulerian_with_conditional_velocity,
    ],
)
def test_broken_variants_are_flagged(build, gaussian):
    residual = build()
    with pytest.raises(ValueError, match="conditional velocity"):
        fmcalc.validate(residual)
    result = check_fixed_point(_broken(residual), gaussian, key=jax.random.key(4))
    (check,) = result.terms
    assert not check.at_fixed_point and check.passed  # measured, but declared
    assert "biased as declared (test)" in str(result)
    assert check.relative_residual < 1e-6  # the marginal version is exact...
    assert check.p_value < 1e-6, str(result)  # ...the conditional one is biased


def test_lagrangian_with_conditional_velocity_is_flagged(gaussian):
    """The Lagrangian target needs the velocity at `F(x_s, s, t)`, where `eps - x0`
    is not its conditional estimate: the paired test rejects the substitution."""
    residual = fmcalc.lagrangian(form="F", stop_gradient="none")
    model = perturbed(gaussian, 4, key=jax.random.key(0), scale=0.05)
    result = fmcalc.testing.check_unbiased(
        residual, model, gaussian, key=jax.random.key(1), min_gap=0.3
    )
    assert result.p_value < 1e-6


# --------------------------------------------------------- invalid specifications


def _term(residual, times=None):
    return fmcalc.Term("term", residual, times or fmcalc.UniformTriangle())


INVALID = {
    "meanflow without its stop-gradient": (
        lambda: fmcalc.validate(_meanflow_without_stop_gradient()),
        "not under a stop-gradient",
    ),
    "velocity at the map's end point": (
        lambda: v_c(Fmap(X, S, T), T),
        "only at \\(x, s\\)",
    ),
    "finite difference along eps - x0": (
        lambda: fmcalc.validate(
            fmcalc.eulerian(
                form="V",
                velocity=v_c,
                derivative=fmcalc.FiniteDifference(1e-3),
            )
        ),
        "finite difference along the conditional velocity",
    ),
    "network evaluated at a point moved by eps - x0": (
        lambda: _term(
            fmcalc.validate(Fmap(X, S, T) - sg(Fmap(X + (U - S) * v_c(X, S), U, T))),
            fmcalc.WithIntermediate(fmcalc.UniformTriangle()),
        ),
        "evaluates a network at a point that depends",
    ),
    "normalised conditional tangent": (
        lambda: fmcalc.validate(
            V(X, S, T) - sg(V(X, S, T) - fmcalc.Normalize(V(X, S, T) - v_c(X, S), 0.1))
        ),
        "non-linear function",
    ),
    "conditional velocity squared": (
        lambda: fmcalc.validate(V(X, S, T) - sg(v_c(X, S) * v_c(X, S))),
        "multiplies it with itself",
    ),
    "division by the conditional velocity": (
        lambda: fmcalc.validate(V(X, S, T) - sg(V(X, S, T) / v_c(X, S))),
        "divide by a time",
    ),
    "intermediate time without a sampler for it": (
        lambda: _term(fmcalc.compositional(form="V", u=U)),
        "draws none",
    ),
    "parameter without a schedule": (
        lambda: fmcalc.Method(
            "m",
            "eulerian",
            "distillation",
            "V",
            (_term(V(X, S, T) - fmcalc.Param("r") * fmcalc.Teacher()(X, S)),),
        ),
        "no schedule",
    ),
    "split that does not match the terms": (
        lambda: methods.get("lsd").replace(split=(0.5, 0.3, 0.2)),
        "one fraction per term",
    ),
    "time-valued residual": (
        lambda: fmcalc.validate(S - T),
        "is a time",
    ),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_specs_are_rejected(case):
    build, match = INVALID[case]
    with pytest.raises((ValueError, TypeError), match=match) as info:
        build()
    assert len(str(info.value)) > 40  # the message explains


def test_every_method_spec_is_short():
    import inspect

    for name in methods.names():
        builder = methods._registry._BUILDERS[name]
        lines = inspect.getsource(builder).splitlines()
        # The spec is the function; the decorator above it carries the metadata.
        start = next(i for i, line in enumerate(lines) if line.startswith("def "))
        doc = inspect.getdoc(builder) or ""
        body = len(lines) - start - len(doc.splitlines())
        assert body <= 25, (name, body)


# ------------------------------------------------------------------- guidance


@pytest.fixture(scope="module")
def labelled():
    return fmcalc.flows.GaussianMixture(
        jnp.array([0.3, 0.2, 0.4, 0.1]),
        jnp.array([[-2.0, 0.0], [2.0, 1.0], [0.0, 2.0], [1.0, -2.0]]),
        jnp.stack([0.2 * jnp.eye(2)] * 4),
        labels=jnp.array([0, 0, 1, 1]),
    )


def _examples(flow, n, cond):
    key = jax.random.key(0)
    x0 = flow.sample(key, n)
    eps = jax.random.normal(jax.random.key(1), x0.shape)
    s = jax.random.uniform(jax.random.key(2), (n,))
    return fmcalc.Batch(x0, eps, s, 0.5 * s, None, cond)


@pytest.mark.slow
def test_guided_teacher_is_the_analytic_guided_velocity(labelled):
    cond = jnp.array([0, 1, -1, 1, 0, -1, 1, 0])
    batch = _examples(labelled, 8, cond)
    for low, high in ((0.0, 1.0), (0.3, 0.7)):
        guided = fmcalc.Guided(fmcalc.Teacher(), 2.5, low, high)(X, S)
        got = jax.vmap(
            lambda ex, g=guided: fmcalc.evaluate(g, ex, teacher=labelled.velocity)
        )(batch)
        for i in range(8):
            x = batch.x0[i] * (1 - batch.s[i]) + batch.s[i] * batch.eps[i]
            s = batch.s[i]
            if cond[i] < 0:
                want = labelled.velocity(x, s)  # dropped label: unconditional
            elif low <= s <= high:
                want = labelled.guided_velocity(x, s, cond[i], 2.5)
            else:
                want = labelled.velocity(x, s, cond=cond[i])
            np.testing.assert_allclose(got[i], want, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_meanflow_guidance_target(labelled):
    cond = jnp.array([0, 1, -1, 1])
    batch = _examples(labelled, 4, cond)
    omega, kappa = 1.5, 0.3
    guided = fmcalc.MeanFlowGuidance(omega, kappa)(X, S)
    got = jax.vmap(lambda ex: fmcalc.evaluate(guided, ex, model=labelled))(batch)
    for i in range(4):
        x = batch.x0[i] * (1 - batch.s[i]) + batch.s[i] * batch.eps[i]
        v_c = batch.eps[i] - batch.x0[i]
        if cond[i] < 0:
            want = v_c
        else:
            c = labelled.velocity(x, batch.s[i], cond=cond[i])
            u = labelled.velocity(x, batch.s[i])
            want = omega * v_c + kappa * c + (1 - omega - kappa) * u
        np.testing.assert_allclose(got[i], want, rtol=1e-10, atol=1e-12)


def test_guided_meanflow_spec():
    """The guided conditional velocity is affine in `eps - x0`, so the spec passes
    validation; `ω = 1, κ = 0` is no guidance at all."""
    guided = methods.get(
        "meanflow", guidance=fmcalc.MeanFlowGuidance(1.0, 0.5), label_dropout=0.1
    )
    assert guided.label_dropout == 0.1
    assert "[y ≠ ∅]" in str(guided) and "V(x, s, s | ∅)" in str(guided)
    plain = methods.get("meanflow", guidance=fmcalc.MeanFlowGuidance(1.0, 0.0))
    assert str(plain.terms[0].residual) == str(
        methods.get("meanflow").terms[0].residual
    )


@pytest.mark.slow
def test_label_dropout_rows(labelled):
    method = methods.get("meanflow", label_dropout=0.25)
    x0 = labelled.sample(jax.random.key(0), 4000)
    cond = jnp.asarray(np.random.default_rng(0).integers(0, 2, 4000))
    batch = method.batch(jax.random.key(1), x0, cond=cond)
    dropped = np.asarray(batch.cond) < 0
    assert abs(dropped.mean() - 0.25) < 0.03
    kept = ~dropped
    np.testing.assert_array_equal(np.asarray(batch.cond)[kept], np.asarray(cond)[kept])
    # A dropped row calls the network without its label.
    seen = []

    class Recorder(eqx.Module):
        def __call__(self, x, s, t, *, cond=None):
            seen.append(cond)
            return jnp.zeros_like(x)

    row = jax.tree.map(lambda a: a[int(np.argmax(dropped))], batch)
    fmcalc.evaluate(method.terms[0].residual, row, model=Recorder())
    assert all(int(c) < 0 for c in seen)


@pytest.mark.slow
def test_unconditional_network_drops_the_label(labelled):
    batch = _examples(labelled, 2, jnp.array([1, 0]))
    expr = fmcalc.Network().without_condition()(X, S, S)
    got = jax.vmap(lambda ex: fmcalc.evaluate(expr, ex, model=labelled))(batch)
    for i in range(2):
        x = batch.x0[i] * (1 - batch.s[i]) + batch.s[i] * batch.eps[i]
        np.testing.assert_allclose(got[i], labelled.velocity(x, batch.s[i]), rtol=1e-10)


def test_replace_keeps_everything_else():
    method = methods.get("psd")
    moved = method.replace(split=(0.5, 0.5), label_dropout=0.1)
    assert moved.split == (0.5, 0.5) and moved.label_dropout == 0.1
    assert dataclasses.replace(moved, split=method.split).terms == method.terms


def test_replace_takes_new_terms_and_moves_their_axes():
    method = methods.get("psd")
    (first, *_) = method.terms
    moved = method.replace(terms=(first,), split=None)
    assert moved.terms == (first,) and moved.name == method.name
    squared = method.replace(terms=(first,), split=None, loss=fmcalc.SquaredError())
    assert squared.terms[0].loss == fmcalc.SquaredError()
    assert squared.terms[0].residual == first.residual
