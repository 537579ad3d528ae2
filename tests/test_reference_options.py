"""Options that reproduce what authors' code does where fmcalc's defaults differ:
the count of diagonal rows and label dropout by a leading block (MeanFlow's code,
Gsunshine/meanflow at d70cb55). The reduction over dimensions is in
tests/test_losses.py."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import without_runtime_typechecks

import fmcalc
from fmcalc import LogitNormal, SortedPair, drop_labels, methods


@pytest.mark.parametrize(
    "n, expected", [(10, {"round": 8, "floor": 7}), (6, {"round": 4, "floor": 4})]
)
def test_the_diagonal_count_rounds_or_floors(n, expected):
    for rule, count in expected.items():
        sampler = SortedPair(
            LogitNormal(-0.4, 1.0), equal_fraction=0.75, equal_count=rule
        )
        times = sampler(jax.random.key(0), n, dtype=jnp.float64)
        equal = np.asarray(times.s == times.t)
        assert sampler.equal_rows(n) == count
        assert equal[:count].all() and not equal[count:].any(), (rule, equal)


def test_leading_dropout_drops_the_same_count_as_a_block():
    labels = jnp.arange(200) % 7
    for seed in range(5):
        key = jax.random.key(seed)
        independent = drop_labels(key, labels, 0.3)
        leading = drop_labels(key, labels, 0.3, rows="leading")
        dropped = np.asarray(leading == fmcalc.NULL_LABEL)
        count = int(np.sum(np.asarray(independent == fmcalc.NULL_LABEL)))
        assert 0 < count < 200
        assert dropped[:count].all() and not dropped[count:].any()
        np.testing.assert_array_equal(leading[count:], labels[count:])


def test_meanflow_with_leading_dropout_drops_diagonal_rows_only():
    method = methods.get("meanflow", label_dropout=0.1, label_dropout_rows="leading")
    x0 = jnp.zeros((64, 2))
    cond = jnp.arange(64) % 3
    seen = 0
    for seed in range(10):
        batch = method.batch(jax.random.key(seed), x0, cond=cond)
        dropped = np.asarray(batch.cond == fmcalc.NULL_LABEL)
        seen += dropped.sum()
        assert np.all(np.asarray(batch.s == batch.t)[dropped])
    assert seen > 0
    # Independent dropout reaches rows off the diagonal.
    plain = methods.get("meanflow", label_dropout=0.5)
    batch = plain.batch(jax.random.key(0), x0, cond=cond)
    off = np.asarray(batch.s != batch.t) & np.asarray(batch.cond == fmcalc.NULL_LABEL)
    assert off.any()


def test_unknown_settings_are_refused_by_name():
    with without_runtime_typechecks():
        with pytest.raises(
            ValueError, match=r"equal_count=.*'round' or 'floor'.*'ceil'"
        ):
            SortedPair(LogitNormal(0.0, 1.0), equal_count="ceil")  # pyright: ignore
        with pytest.raises(
            ValueError, match=r"rows=.*'independent' or 'leading'.*'all'"
        ):
            drop_labels(jax.random.key(0), jnp.zeros(4, int), 0.1, rows="all")  # pyright: ignore
        with pytest.raises(ValueError, match=r"label_dropout_rows.*'trailing'"):
            methods.get("meanflow", label_dropout_rows="trailing")


def test_the_reference_preset_is_the_options_it_lists():
    method = methods.get("meanflow", preset="reference")
    listed = methods.info("meanflow").presets["reference"]
    assert method == methods.get("meanflow", **listed)
    assert method.label_dropout == 0.1 and method.label_dropout_rows == "leading"
    (term,) = method.terms
    assert term.times.equal_rows(10) == 7 and term.loss == fmcalc.Adaptive(c=0.01)
    # An option given with the preset wins over the preset's.
    squared = methods.get("meanflow", preset="reference", loss=fmcalc.SquaredError())
    assert squared.terms[0].loss == fmcalc.SquaredError()
    assert squared.label_dropout_rows == "leading"
    text = methods.doc("meanflow")
    assert "preset 'reference'" in text and "label_dropout_rows = 'leading'" in text
    assert "equal_count='floor'" in methods.doc("meanflow", format="markdown")


def test_presets_are_checked():
    with pytest.raises(
        ValueError, match=r"no preset 'paper'; its presets are \['reference'\]"
    ):
        methods.get("meanflow", preset="paper")
    with pytest.raises(
        ValueError, match=r"'lsd' has no preset 'reference'; its presets are none"
    ):
        methods.get("lsd", preset="reference")
    with pytest.raises(
        TypeError, match=r"preset 'fast' sets \['steps'\], which are not options"
    ):

        @methods.register("preset-check", full_name="x", citation="y", summary="z",
                          presets={"fast": {"steps": 3}})  # fmt: skip
        def _builder(*, split=None):
            raise AssertionError("never built")

    assert "preset-check" not in methods.names()


def test_meanflow_reference_loss_is_the_formula_of_its_authors_code():
    """The preset's loss, recomputed row by row from MeanFlow's formulas as their
    code states them, in fmcalc's convention (their `(t, r)` is our `(s, t)`):
    `z = (1 - s) x0 + s eps`, `v = eps - x0`; on labelled rows
    `v_g = ω v + κ V(z, s, s | y) + (1 - ω - κ) V(z, s, s | ∅)` (no gradient), on
    dropped rows `v_g = v`; `(u, du) = jvp(V(·, ·, t | y), (z, s), (v_g, 1))`;
    `L = ‖u - sg(v_g - (s - t) du)‖²` summed over dimensions, weighted by
    `1 / sg(L + 0.01)`, and averaged over the batch."""
    from fmcalc.nn import MLP

    method = methods.get("meanflow", preset="reference")
    model = MLP(3, width=32, depth=2, num_classes=4, key=jax.random.key(1))
    x0 = jax.random.normal(jax.random.key(2), (40, 3))
    cond = jnp.arange(40) % 4
    batch = method.batch(jax.random.key(3), x0, cond=cond)
    assert (np.asarray(batch.cond) == fmcalc.NULL_LABEL).any()

    def row(model, x0, eps, s, t, y):
        z = (1 - s) * x0 + s * eps
        v = eps - x0
        diagonal = lambda label: jax.lax.stop_gradient(model(z, s, s, cond=label))  # noqa: E731
        guided = (
            1.0 * v + 0.5 * diagonal(y) + (1 - 1.0 - 0.5) * diagonal(fmcalc.NULL_LABEL)
        )
        v_g = jnp.where(y == fmcalc.NULL_LABEL, v, guided)
        u, du = jax.jvp(
            lambda z, s: model(z, s, t, cond=y), (z, s), (v_g, jnp.ones_like(s))
        )
        target = jax.lax.stop_gradient(v_g - (s - t) * du)
        squared = jnp.sum((u - target) ** 2)
        return squared / jax.lax.stop_gradient(squared + 0.01)

    def by_formula(model):
        rows = (batch.x0, batch.eps, batch.s, batch.t, batch.cond)
        return jnp.mean(jax.vmap(lambda *a: row(model, *a))(*rows))

    loss, grads = eqx.filter_value_and_grad(lambda m: method.loss(m, batch)[0])(model)
    expected, expected_grads = eqx.filter_value_and_grad(by_formula)(model)
    np.testing.assert_allclose(loss, expected, rtol=1e-12)
    for a, b in zip(
        jax.tree.leaves(grads), jax.tree.leaves(expected_grads), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
