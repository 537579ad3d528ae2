"""Time samplers: ranges, orderings, the distributions they claim, bad parameters."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmcalc._times import (
    AbstractTimeSampler,
    ArctanLogNormal,
    DyadicSteps,
    Equal,
    FixedSource,
    FixedTarget,
    GapFirst,
    GridStep,
    KarrasGrid,
    LogitNormal,
    SortedPair,
    Times,
    Uniform,
    UniformSquare,
    UniformTriangle,
    WithIntermediate,
)


KEY = jax.random.PRNGKey(0)
N = 20_000

SAMPLERS = {
    "triangle": UniformTriangle(),
    "sorted": SortedPair(LogitNormal(-0.4, 1.0), equal_fraction=0.75),
    "sorted-two": SortedPair(LogitNormal(0.4, 1.0), LogitNormal(-1.2, 1.0)),
    "equal": Equal(LogitNormal(0.0, 1.0)),
    "fixed-target": FixedTarget(ArctanLogNormal(-0.8, 1.6)),
    "fixed-target-0.3": FixedTarget(Uniform(), target=0.3),
    "fixed-source": FixedSource(Uniform()),
    "fixed-source-0.6": FixedSource(LogitNormal(0.0, 1.0), source=0.6),
    "dyadic": DyadicSteps(),
    "dyadic-even": DyadicSteps(5, allocation="even"),
    "grid-step": GridStep(),
    "grid-step-3": GridStep(3),
    "karras": KarrasGrid(),
    "gap-first": GapFirst(),
    "split": WithIntermediate(UniformTriangle()),
    "midpoint": WithIntermediate(GapFirst(), fraction=0.5),
    "square": UniformSquare(),
    "square-split": WithIntermediate(UniformSquare()),
}


def _draw(sampler, n=N, dtype=jnp.float64, key=KEY) -> Times:
    return jax.jit(lambda k: sampler(k, n, dtype=dtype))(key)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_ranges_and_order(name, dtype):
    sampler = SAMPLERS[name]
    times = _draw(sampler, dtype=dtype)
    s, t, u = (None if a is None else np.asarray(a) for a in times)
    assert s.shape == t.shape == (N,)
    assert s.dtype == t.dtype == jnp.dtype(dtype)
    assert np.all((0 <= s) & (s <= 1) & (0 <= t) & (t <= 1))
    assert bool(np.all(t <= s)) is sampler.ordered
    assert (u is not None) == sampler.uses_u
    if u is not None:
        assert u.shape == (N,) and u.dtype == jnp.dtype(dtype)
        assert np.all((np.minimum(s, t) <= u) & (u <= np.maximum(s, t)))


def test_extreme_distributions_stay_in_unit_interval():
    for dist in (LogitNormal(0.0, 60.0), ArctanLogNormal(0.0, 200.0)):
        x = np.asarray(dist.sample(KEY, (N,), jnp.float32))
        assert np.all((0 <= x) & (x <= 1))
        assert x.min() == 0.0 and x.max() == 1.0


def _moments_of_normal(z):
    return float(np.mean(z)), float(np.std(z))


def test_logit_normal_and_arctan_log_normal():
    x = np.asarray(LogitNormal(-0.4, 1.3).sample(KEY, (N,), jnp.float64))
    mean, std = _moments_of_normal(np.log(x / (1 - x)))
    assert abs(mean + 0.4) < 0.03 and abs(std - 1.3) < 0.03
    x = np.asarray(ArctanLogNormal(-0.8, 1.6).sample(KEY, (N,), jnp.float64))
    mean, std = _moments_of_normal(np.log(np.tan(np.pi * x / 2)))
    assert abs(mean + 0.8) < 0.04 and abs(std - 1.6) < 0.04


def test_uniform():
    x = np.asarray(Uniform(0.2, 0.7).sample(KEY, (N,), jnp.float64))
    assert np.all((0.2 <= x) & (x <= 0.7))
    assert abs(x.mean() - 0.45) < 0.005


def test_uniform_triangle():
    s, t, _ = _draw(UniformTriangle())
    # max / min of two uniforms: E s = 2/3, E t = 1/3, E (s - t) = 1/3.
    assert abs(float(jnp.mean(s)) - 2 / 3) < 0.01
    assert abs(float(jnp.mean(t)) - 1 / 3) < 0.01


def test_uniform_square():
    s, t, _ = _draw(UniformSquare())
    s, t = np.asarray(s), np.asarray(t)
    assert abs(np.mean(t > s) - 0.5) < 0.01
    assert abs(s.mean() - 0.5) < 0.01 and abs(t.mean() - 0.5) < 0.01
    assert abs(np.corrcoef(s, t)[0, 1]) < 0.03
    assert not UniformSquare().ordered and not WithIntermediate(UniformSquare()).ordered
    assert WithIntermediate(UniformTriangle()).ordered


@pytest.mark.parametrize("n, fraction, expected", [(8, 0.75, 6), (10, 0.25, 2)])
def test_sorted_pair_equal_rows_come_first(n, fraction, expected):
    sampler = SortedPair(Uniform(), equal_fraction=fraction)
    s, t, _ = sampler(KEY, n, dtype=jnp.float64)
    equal = np.asarray(s == t)
    assert equal[:expected].all() and not equal[expected:].any()


def test_sorted_pair_is_max_and_min_of_the_two_draws():
    first, second = LogitNormal(0.4, 1.0), LogitNormal(-1.2, 1.0)
    s, t, _ = SortedPair(first, second)(KEY, 64, dtype=jnp.float64)
    key_a, key_b = jax.random.split(KEY)
    a = first.sample(key_a, (64,), jnp.float64)
    b = second.sample(key_b, (64,), jnp.float64)
    assert jnp.array_equal(s, jnp.maximum(a, b))
    assert jnp.array_equal(t, jnp.minimum(a, b))


def test_equal_and_fixed_times():
    dist = LogitNormal(0.0, 1.0)
    draw = dist.sample(KEY, (64,), jnp.float64)
    s, t, _ = Equal(dist)(KEY, 64, dtype=jnp.float64)
    assert jnp.array_equal(s, draw) and jnp.array_equal(t, draw)
    s, t, _ = FixedTarget(dist)(KEY, 64, dtype=jnp.float64)
    assert jnp.array_equal(s, draw) and jnp.all(t == 0)
    s, t, _ = FixedSource(dist)(KEY, 64, dtype=jnp.float64)
    assert jnp.all(s == 1) and jnp.array_equal(t, draw)
    s, t, _ = FixedTarget(dist, target=0.25)(KEY, 64, dtype=jnp.float64)
    assert jnp.all(t == 0.25) and jnp.allclose(s, 0.25 + 0.75 * draw)
    s, t, _ = FixedSource(dist, source=0.5)(KEY, 64, dtype=jnp.float64)
    assert jnp.all(s == 0.5) and jnp.allclose(t, 0.5 * draw)


@pytest.mark.slow
def test_dyadic_steps_grid():
    levels = 4
    s, t, u = _draw(DyadicSteps(levels))
    assert u is not None
    s, t, u = np.asarray(s), np.asarray(t), np.asarray(u)
    d = s - t
    k = -np.log2(d)
    assert np.array_equal(k, np.round(k)) and set(k.astype(int)) == set(range(levels))
    j = s / d
    assert np.array_equal(j, np.round(j)) and np.all((1 <= j) & (j <= 2**k))
    assert np.array_equal(u, s - d / 2)
    # Each level equally likely, and s uniform on its grid.
    counts = np.bincount(k.astype(int), minlength=levels) / N
    assert np.allclose(counts, 1 / levels, atol=0.02)
    finest = k == levels - 1
    assert set(j[finest].astype(int)) == set(range(1, 2 ** (levels - 1) + 1))
    s1, t1, u1 = DyadicSteps(1)(KEY, 4)
    assert np.all(s1 == 1) and np.all(t1 == 0) and u1 is not None and np.all(u1 == 0.5)


def test_karras_grid():
    sampler = KarrasGrid(steps=5, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    sigma = np.array(
        [
            (0.002 ** (1 / 7) + i / 4 * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7
            for i in range(5)
        ]
    )
    grid = sigma / (1 + sigma)
    np.testing.assert_allclose(sampler.grid, grid, rtol=1e-12)
    assert sampler.grid[0] == pytest.approx(0.002 / 1.002)
    assert sampler.grid[-1] == pytest.approx(80 / 81)
    s, t, u = _draw(sampler)
    assert u is not None
    index = np.searchsorted(grid, np.asarray(s))
    np.testing.assert_allclose(np.asarray(s), grid[index], rtol=1e-12)
    np.testing.assert_allclose(np.asarray(u), grid[index - 1], rtol=1e-12)
    assert np.all(np.asarray(t) == 0)
    counts = np.bincount(index, minlength=5)[1:] / N
    assert np.allclose(counts, 0.25, atol=0.02)


def test_gap_first_distribution():
    gap_dist, target_dist = LogitNormal(-0.8, 1.0), LogitNormal(-0.4, 1.0)
    s, t, _ = _draw(GapFirst(gap_dist, target_dist))
    s, t = np.asarray(s), np.asarray(t)
    gap = s - t
    mean, std = _moments_of_normal(np.log(gap / (1 - gap)))
    assert abs(mean + 0.8) < 0.03 and abs(std - 1.0) < 0.03
    a = t / (1 - gap)
    mean, std = _moments_of_normal(np.log(a / (1 - a)))
    assert abs(mean + 0.4) < 0.03 and abs(std - 1.0) < 0.03


def test_gap_first_with_uniform_target_is_uniform_below_the_gap():
    s, t, _ = _draw(GapFirst(LogitNormal(-0.8, 1.0), Uniform()))
    r = np.asarray(t / (1 - (s - t)))
    assert abs(r.mean() - 0.5) < 0.01 and abs(r.var() - 1 / 12) < 0.005


def test_with_intermediate():
    s, t, u = _draw(WithIntermediate(UniformTriangle(), fraction=0.5))
    assert u is not None
    np.testing.assert_allclose(np.asarray(u), np.asarray((s + t) / 2), rtol=1e-14)
    s, t, u = _draw(WithIntermediate(UniformTriangle()))
    assert u is not None
    r = np.asarray((s - u) / (s - t))
    assert abs(r.mean() - 0.5) < 0.01 and abs(r.var() - 1 / 12) < 0.005


def test_samplers_are_abstract_or_final():
    assert all(isinstance(x, AbstractTimeSampler) for x in SAMPLERS.values())
    with pytest.raises(TypeError):
        AbstractTimeSampler()  # pyright: ignore[reportAbstractUsage]


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda: Uniform(0.5, 0.5), ValueError, r"low < high.*0\.5"),
        (lambda: Uniform(-0.1, 0.5), ValueError, r"low=.*\[0, 1\].*-0\.1"),
        (lambda: LogitNormal(0.0, 0.0), ValueError, r"std=.*positive.*0\.0"),
        (lambda: LogitNormal(0.0, -1.0), ValueError, r"std=.*positive"),
        (lambda: ArctanLogNormal(0.0, 0.0), ValueError, r"std=.*positive"),
        (lambda: LogitNormal(math.nan, 1.0), ValueError, r"mean=.*finite"),
        (lambda: LogitNormal("0", 1.0), TypeError, r"mean=.*Python number"),
        (lambda: SortedPair(Uniform(), equal_fraction=1.5), ValueError, r"1\.5"),
        (lambda: SortedPair(Uniform(), equal_fraction=-0.1), ValueError, r"-0\.1"),
        # Under the test suite's beartype hook the annotation rejects these first;
        # either message names the argument.
        (lambda: SortedPair(0.5), TypeError, r"first"),
        (lambda: Equal(UniformTriangle()), TypeError, r"distribution"),
        (lambda: FixedTarget(Uniform(), target=1.2), ValueError, r"target=.*1\.2"),
        (lambda: FixedSource(Uniform(), source=-1.0), ValueError, r"source="),
        (lambda: DyadicSteps(0), ValueError, r"levels=.*≥ 1.*0"),
        (lambda: DyadicSteps(2.0), TypeError, r"levels=.*int"),
        (
            lambda: DyadicSteps(allocation="uniform"),  # pyright: ignore
            (ValueError, TypeError),
            r"allocation",
        ),
        (lambda: GridStep(0), ValueError, r"count=.*≥ 1.*0"),
        (lambda: KarrasGrid(steps=1), ValueError, r"steps=.*≥ 2"),
        (lambda: KarrasGrid(sigma_min=80.0, sigma_max=1.0), ValueError, "sigma_min <"),
        (lambda: KarrasGrid(sigma_min=0.0), ValueError, r"sigma_min=.*positive"),
        (lambda: KarrasGrid(rho=-7.0), ValueError, r"rho=.*positive"),
        (lambda: GapFirst(gap=0.3), TypeError, r"gap"),
        (lambda: WithIntermediate(DyadicSteps()), ValueError, r"DyadicSteps already"),
        (lambda: WithIntermediate(Uniform()), TypeError, r"base"),
        (
            lambda: WithIntermediate(UniformTriangle(), fraction=2.0),
            ValueError,
            r"fraction=.*2\.0",
        ),
    ],
)
def test_bad_parameters(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_bad_call():
    with pytest.raises(ValueError, match=r"number of rows `n`; got 0"):
        UniformTriangle()(KEY, 0)
    with pytest.raises(TypeError, match=r"floating dtype; got int32"):
        UniformTriangle()(KEY, 4, dtype=jnp.int32)
