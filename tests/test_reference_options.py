"""Options that reproduce what authors' code does where fmcalc's defaults differ:
the count of diagonal rows and label dropout by a leading block (MeanFlow's code,
Gsunshine/meanflow at d70cb55). The reduction over dimensions is in
tests/test_losses.py."""

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
