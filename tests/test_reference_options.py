"""Options that reproduce what authors' code does where fmcalc's defaults differ:
the count of diagonal rows and label dropout by a leading block (MeanFlow's code,
Gsunshine/meanflow at d70cb55). The reduction over dimensions is in
tests/test_losses.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_same_loss_and_grads, without_runtime_typechecks

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
        ValueError, match=r"'fmm' has no preset 'reference'; its presets are none"
    ):
        methods.get("fmm", preset="reference")
    with pytest.raises(
        TypeError, match=r"preset 'fast' sets \['steps'\], which are not options"
    ):

        @methods.register("preset-check", full_name="x", citation="y", summary="z",
                          presets={"fast": {"steps": 3}})  # fmt: skip
        def _builder(*, split=None):
            raise AssertionError("never built")

    assert "preset-check" not in methods.names()


@pytest.mark.slow
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

    assert_same_loss_and_grads(lambda m: method.loss(m, batch)[0], by_formula, model)


def test_shortcut_reference_times_follow_the_authors_allocation():
    method = methods.get("shortcut", preset="reference")
    batch = method.batch(jax.random.key(0), jnp.zeros((256, 2)))
    step = np.asarray(batch.s - batch.t)
    anchor, bootstrap = step[:224], step[224:]
    # Flow-matching rows: the finest step on the 128-point grid.
    np.testing.assert_array_equal(anchor, 1 / 128)
    grid = np.asarray(batch.s[:224]) * 128
    np.testing.assert_array_equal(grid, np.round(grid))
    # Self-consistency rows: 4 per level, finest first, and the rest d = 1: a
    # quarter of the 32 rows take the largest step.
    expected = np.concatenate([np.repeat(2.0 ** -np.arange(6, -1, -1), 4), [1.0] * 4])
    np.testing.assert_array_equal(bootstrap, expected)
    assert np.mean(bootstrap == 1.0) == 0.25


def test_shortcut_reference_drops_labels_on_flow_matching_rows_only():
    method = methods.get("shortcut", preset="reference")
    cond = jnp.arange(256) % 5
    dropped = np.zeros(256, bool)
    for seed in range(5):
        batch = method.batch(jax.random.key(seed), jnp.zeros((256, 2)), cond=cond)
        dropped |= np.asarray(batch.cond == fmcalc.NULL_LABEL)
    assert dropped[:224].any() and not dropped[224:].any()
    with pytest.raises(
        ValueError, match=r"names \['bootstrap'\].*\['anchor', 'compositional'\]"
    ):
        methods.get("shortcut", label_dropout=0.1, label_dropout_terms=("bootstrap",))


def test_sigma_min_is_the_path_that_ends_at_sigma_min_noise():
    method = methods.get("shortcut", sigma_min=0.25)
    x0 = jax.random.normal(jax.random.key(1), (64, 2))
    batch = method.batch(jax.random.key(2), x0)
    s = batch.s[:, None]
    expected = (1 - s) * x0 + (0.25 + 0.75 * s) * batch.eps
    np.testing.assert_allclose(batch.x, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        batch.eps - batch.x0, 0.75 * batch.eps - x0, rtol=1e-12, atol=1e-12
    )
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match=r"`sigma_min` must lie in \[0, 1\)"):
            methods.get("shortcut", sigma_min=bad)


@pytest.mark.slow
def test_shortcut_reference_loss_is_the_formula_of_its_authors_code():
    """The preset's loss, recomputed row by row from the formulas of shortcut
    models' code (kvfrans/shortcut-models at 6010043, targets_shortcut.py), in
    their convention: `τ = 1 - s` runs from noise to data, `d = s - t`, and their
    network's output is `-V(x, s, s - d)`.

    `x_τ = (1 - (1 - 1e-5) τ) eps + τ x0`. Flow-matching rows: target
    `x0 - (1 - 1e-5) eps` at the label `d = 1/128`. Self-consistency rows, from the
    EMA network: `v1 = v(x_τ, τ, d/2)`, `x2 = clip(x_τ + d/2 v1, ±4)`,
    `v2 = v(x2, τ + d/2, d/2)`, target `clip((v1 + v2)/2, ±4)`. The loss is the
    mean of the squared error over every element of the batch."""
    from fmcalc.nn import MLP

    method = methods.get("shortcut", preset="reference")
    model = MLP(3, width=32, depth=2, num_classes=4, key=jax.random.key(1))
    ema = MLP(3, width=32, depth=2, num_classes=4, key=jax.random.key(5))
    # Data of a large scale, so that clipping at ±4 is active on some rows.
    x0 = 3 * jax.random.normal(jax.random.key(2), (64, 3))
    cond = jnp.arange(64) % 4
    batch = method.batch(jax.random.key(3), x0, cond=cond)
    sigma = 1e-5

    def theirs(net, x, tau, d, y):
        return -net(x, 1 - tau, 1 - tau - d, cond=y)

    def row(model, x0, eps, s, t, y, bootstrap):
        tau, d = 1 - s, s - t
        x = (1 - (1 - sigma) * tau) * eps + tau * x0
        if not bootstrap:
            target = x0 - (1 - sigma) * eps
        else:
            v1 = theirs(ema, x, tau, d / 2, y)
            x2 = jnp.clip(x + d / 2 * v1, -4, 4)
            v2 = theirs(ema, x2, tau + d / 2, d / 2, y)
            target = jnp.clip((v1 + v2) / 2, -4, 4)
        return (theirs(model, x, tau, d, y) - jax.lax.stop_gradient(target)) ** 2

    def by_formula(model):
        parts = []
        for rows, bootstrap in ((slice(0, 56), False), (slice(56, 64), True)):
            args = (x0[rows], batch.eps[rows], batch.s[rows], batch.t[rows],
                    batch.cond[rows])  # fmt: skip
            one = functools.partial(row, model, bootstrap=bootstrap)
            parts.append(jax.vmap(one)(*args))
        return jnp.mean(jnp.concatenate(parts))

    def ours(model):
        return method.loss(model, batch, ema=ema)[0]

    assert_same_loss_and_grads(ours, by_formula, model)
    # The clip is active on some rows, so the test sees it.
    x = batch.x[56:]
    half = batch.s[56:] - (batch.s[56:] - batch.t[56:]) / 2
    first = x + (half - batch.s[56:])[:, None] * jax.vmap(
        lambda x, s, u, y: ema(x, s, u, cond=y)
    )(x, batch.s[56:], half, batch.cond[56:])
    assert (np.abs(np.asarray(first)) > 4).any()


@pytest.mark.slow
def test_the_shortcut_options_are_checked_and_default_to_the_paper():
    from fmcalc import compositional, flow_matching

    with pytest.raises(ValueError, match=r"`clip` must be a positive bound.*-4"):
        compositional(clip=-4.0)
    with without_runtime_typechecks():
        with pytest.raises(ValueError, match=r"Unknown at 'source'"):
            flow_matching(at="source")
    plain = methods.get("shortcut")
    assert plain.sigma_min == 0 and plain.label_dropout_terms is None
    assert "clip" not in str(plain) and "V(x, s, s)" in str(plain)
    # Clipping is a no-op where every value lies inside the bound.
    from fmcalc.nn import MLP

    model = MLP(2, width=8, depth=1, key=jax.random.key(0))
    clipped = methods.get("shortcut", clip=1e6)
    batch = plain.batch(
        jax.random.key(1), jax.random.normal(jax.random.key(2), (16, 2))
    )
    np.testing.assert_allclose(
        plain.loss(model, batch, ema=model)[0], clipped.loss(model, batch, ema=model)[0]
    )


def test_a_preset_is_a_setting_of_parse_and_of_the_command_line():
    parsed = methods.parse("shortcut[preset=reference]")
    assert parsed.terms == methods.get("shortcut", preset="reference").terms
    assert parsed.name == "shortcut[preset=reference]"
    # Settings after the preset win, as in `get`.
    mixed = methods.parse("meanflow", ["preset=reference", "loss=squared"])
    assert mixed.terms[0].loss == fmcalc.SquaredError()
    assert mixed.label_dropout_rows == "leading"
    with pytest.raises(ValueError, match=r"no preset 'paper'; its presets"):
        methods.parse("meanflow[preset=paper]")
    with pytest.raises(ValueError, match=r"names 2 presets, \['reference', 'x'\]"):
        methods.parse("meanflow[preset=reference,preset=x]")


@pytest.mark.slow
def test_reduction_mean_divides_every_term_by_the_dimension_and_is_checked():
    from fmcalc.nn import MLP

    model = MLP(3, width=8, depth=1, key=jax.random.key(0))
    method = methods.get("facm")
    batch = method.batch(
        jax.random.key(1), jax.random.normal(jax.random.key(2), (8, 3))
    )

    other = MLP(3, width=8, depth=1, key=jax.random.key(5))

    def teacher(x, t, *, cond=None):
        return other(x, t, t)

    summed = method.loss(model, batch, teacher=teacher)[1]
    averaged = methods.get("facm", reduction="mean").loss(model, batch, teacher=teacher)
    # The consistency term's adaptive weight is a ratio of powers of the norm:
    # sg[(‖R‖²/3 + c)^p] where the sum has sg[(‖R‖² + c)^p], so only the flow-matching
    # anchor's squared error is exactly a third; its cosine part is unchanged.
    parsed = methods.parse("facm[reduction=mean]")
    assert parsed.terms == methods.get("facm").replace(reduction="mean").terms
    assert str(parsed).count("‖R‖²/dim") == 3 and "‖R‖² " not in str(parsed)
    assert set(summed) == set(averaged[1])
    losses = [name for name in summed if name.endswith("/loss")]
    assert len(losses) == 2
    for name in summed:  # every term's loss moves, nothing else does
        same = np.allclose(summed[name], averaged[1][name], rtol=1e-12)
        assert same == (name not in losses), name
    plain = methods.get("lsd")
    lsd_batch = plain.batch(
        jax.random.key(3), jax.random.normal(jax.random.key(4), (8, 3))
    )
    np.testing.assert_allclose(
        methods.get("lsd", reduction="mean").loss(model, lsd_batch)[0],
        plain.loss(model, lsd_batch)[0] / 3,
        rtol=1e-12,
    )
    # Given explicitly, "sum" applies too: it undoes a preset's averaged losses.
    summed_preset = methods.get("shortcut", preset="reference", reduction="sum")
    assert "/dim" not in str(summed_preset) and "/dim" in str(
        methods.get("shortcut", preset="reference")
    )
    with pytest.raises(ValueError, match=r"Method 'lsd': `reduction` must be.*'max'"):
        methods.get("lsd", reduction="max")
    with pytest.raises(ValueError, match=r"option 'reduction' cannot be 'max'"):
        methods.parse("lsd[reduction=max]")


def test_reduction_refuses_a_loss_it_cannot_set():
    class Plain(fmcalc.AbstractLoss):
        @property
        def depends_on_residual(self):
            return False

        @property
        def formula(self):
            return "|R|"

        @property
        def gradient_weight(self):
            return None

        def __call__(self, residual, *, prediction, s, t, aux=None):
            return jnp.sum(jnp.abs(residual))

    method = methods.get("lsd").replace(loss=Plain())
    with pytest.raises(
        TypeError, match=r"reduction='mean' on .*Plain\(\): it has no `reduction`"
    ):
        method.replace(reduction="mean")
