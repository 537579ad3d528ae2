"""Time samplers: where in the `(s, t)` (and `u`) plane a training step looks.

A sampler draws, for a batch of `n` rows, a source time `s`, a target time `t` and
optionally an intermediate time `u`, all in `[0, 1]` (`t = 0` data, `t = 1` noise).
Every sampler but one has `s ≥ t` on every row (`ordered = True`) and, where `u` is
drawn, `u` between `t` and `s`. Samplers whose paper truncates a distribution to keep
that ordering rescale it instead, as each docstring says. The exception is
[`fmcalc.UniformSquare`][] (`ordered = False`), which also draws backward maps
(`t > s`) for flow map matching.

One-dimensional distributions ([`fmcalc.AbstractTimeDistribution`][]) are the
building blocks; samplers ([`fmcalc.AbstractTimeSampler`][]) combine them.
"""

import abc
from typing import TYPE_CHECKING, ClassVar, Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from ._convert import _as_float, _as_int, _check_int, _check_positive, _check_real


# Pyright reads `AbstractClassVar` as a `ClassVar` only when imported so, in the
# module that uses it (equinox's docs; a re-export loses it).
if TYPE_CHECKING:
    from typing import ClassVar as AbstractClassVar
else:
    from equinox import AbstractClassVar


class Times(NamedTuple):
    """The times of one batch, one entry per row.

    - `s`: source times, shape `(n,)`.
    - `t`: target times, shape `(n,)`, with `t ≤ s`.
    - `u`: intermediate times with `t ≤ u ≤ s`, shape `(n,)`, or `None` for samplers
      that draw none (`uses_u = False`).
    """

    s: Float[Array, " n"]
    t: Float[Array, " n"]
    u: Float[Array, " n"] | None = None


def _check_unit(owner: str, name: str, value) -> float:
    value = _check_real(owner, name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(
            f"`{owner}({name}=...)` must lie in [0, 1] (t = 0 is data, t = 1 is "
            f"noise); got {value!r}."
        )
    return value


def _check_distribution(owner: str, name: str, value) -> None:
    if not isinstance(value, AbstractTimeDistribution):
        raise TypeError(
            f"`{owner}({name}=...)` must be a time distribution such as "
            f"`fmcalc.LogitNormal(-0.4, 1.0)`; got {value!r}."
        )


def _check_call(owner: str, n, dtype) -> None:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(
            f"`{owner}` draws a positive, static number of rows `n`; got {n!r}."
        )
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"Times must have a floating dtype; got {jnp.dtype(dtype)}.")


def _unit(x: Array) -> Array:
    """Clip round-off that could escape `[0, 1]`."""
    return jnp.clip(x, 0.0, 1.0)


class AbstractTimeDistribution(eqx.Module):
    """A one-dimensional distribution on `[0, 1]`, the building block of samplers.

    `distribution.sample(key, shape, dtype)` returns independent draws of the given
    shape, every one of them in `[0, 1]` exactly.
    """

    @abc.abstractmethod
    def sample(
        self, key: PRNGKeyArray, shape: tuple[int, ...], dtype=jnp.float32
    ) -> Float[Array, "..."]:
        """Independent draws of shape `shape`, in `[0, 1]`."""


class Uniform(AbstractTimeDistribution):
    """The uniform distribution on `[low, high]`.

    **Arguments:**

    - `low`: the lower end, in `[0, 1]` (default 0).
    - `high`: the upper end, in `[0, 1]` with `low < high` (default 1).
    """

    low: float = eqx.field(static=True, default=0.0, converter=_as_float)
    high: float = eqx.field(static=True, default=1.0, converter=_as_float)

    def __check_init__(self):
        low = _check_unit("Uniform", "low", self.low)
        high = _check_unit("Uniform", "high", self.high)
        if not low < high:
            raise ValueError(
                f"`Uniform` needs low < high; got low={low!r}, high={high!r}."
            )

    def sample(
        self, key: PRNGKeyArray, shape: tuple[int, ...], dtype=jnp.float32
    ) -> Float[Array, "..."]:
        draw = jax.random.uniform(key, shape, dtype, self.low, self.high)
        return jnp.clip(draw, self.low, self.high)


class LogitNormal(AbstractTimeDistribution):
    """The logit-normal distribution: `sigmoid(z)` with `z ~ N(mean, std²)`.

    The default of flow-matching time sampling since Esser et al. (2024). In our
    convention a negative `mean` favours the data side. MeanFlow (Geng et al. 2025)
    uses `LogitNormal(-0.4, 1.0)` on ImageNet, pixel MeanFlow `LogitNormal(0.8, 0.8)`,
    TVM `LogitNormal(-0.8, 1.0)` for its gap.

    **Arguments:**

    - `mean`: the mean of `z`.
    - `std`: the standard deviation of `z`, positive.
    """

    mean: float = eqx.field(static=True, converter=_as_float)
    std: float = eqx.field(static=True, converter=_as_float)

    def __check_init__(self):
        _check_real("LogitNormal", "mean", self.mean)
        _check_positive("LogitNormal", "std", self.std)

    def sample(
        self, key: PRNGKeyArray, shape: tuple[int, ...], dtype=jnp.float32
    ) -> Float[Array, "..."]:
        z = self.mean + self.std * jax.random.normal(key, shape, dtype)
        return _unit(jax.nn.sigmoid(z))


class ArctanLogNormal(AbstractTimeDistribution):
    """FACM's time distribution: `(2/π) arctan(exp(z))` with `z ~ N(mean, std²)`.

    FACM (Peng et al. 2025) samples an EDM noise level `σ = exp(z)` and maps it to
    TrigFlow time `τ = arctan σ`; in our time (`t = 1` noise) this is
    `s = (2/π) arctan(σ)`. FACM's ImageNet setting is `ArctanLogNormal(-0.8, 1.6)`.

    **Arguments:**

    - `mean`: the mean of `z = log σ`.
    - `std`: the standard deviation of `z`, positive.
    """

    mean: float = eqx.field(static=True, converter=_as_float)
    std: float = eqx.field(static=True, converter=_as_float)

    def __check_init__(self):
        _check_real("ArctanLogNormal", "mean", self.mean)
        _check_positive("ArctanLogNormal", "std", self.std)

    def sample(
        self, key: PRNGKeyArray, shape: tuple[int, ...], dtype=jnp.float32
    ) -> Float[Array, "..."]:
        z = self.mean + self.std * jax.random.normal(key, shape, dtype)
        # exp may overflow to inf: arctan(inf) = π/2 is still right.
        return _unit((2 / jnp.pi) * jnp.arctan(jnp.exp(z)))


class AbstractTimeSampler(eqx.Module):
    """Draws the times `(s, t, u)` of a batch.

    Calling `sampler(key, n, dtype=...)` returns [`fmcalc.Times`][] with `n` rows,
    all times in `[0, 1]`. `n` is static (a Python int), so each sampler is usable
    under `jax.jit` with `n` fixed. Each sampler declares

    - `uses_u`: whether it draws an intermediate time `u` (compositional rules need
      one; [`fmcalc.WithIntermediate`][] adds one to any sampler that does not);
    - `ordered`: whether `s ≥ t` on every row (only [`fmcalc.UniformSquare`][]
      draws `t > s` too). Where `u` is drawn it lies between `t` and `s`.
    """

    uses_u: AbstractClassVar[bool]

    @property
    @abc.abstractmethod
    def ordered(self) -> bool:
        """Whether `s ≥ t` on every row."""

    @abc.abstractmethod
    def __call__(self, key: PRNGKeyArray, n: int, *, dtype=jnp.float32) -> Times:
        """Draw the times of `n` rows."""


class UniformTriangle(AbstractTimeSampler):
    """`(s, t)` uniform on the triangle `{0 ≤ t ≤ s ≤ 1}`.

    `s = max(a, b)`, `t = min(a, b)` with `a, b ~ U[0, 1]` independent: the
    off-diagonal rows of Boffi et al. (2025) (LSD / PSD / ESD).

    **Arguments:** none.
    """

    uses_u: ClassVar[bool] = False

    @property
    def ordered(self) -> bool:
        return True

    def __call__(self, key: PRNGKeyArray, n: int, *, dtype=jnp.float32) -> Times:
        _check_call("UniformTriangle", n, dtype)
        draws = jax.random.uniform(key, (2, n), dtype)
        return Times(s=jnp.max(draws, axis=0), t=jnp.min(draws, axis=0))


class UniformSquare(AbstractTimeSampler):
    """`(s, t)` uniform on the square `[0, 1]²`: `s, t ~ U[0, 1]` independent.

    The one sampler with `ordered = False`: half the rows have `t > s` (backward
    maps, towards noise). Flow map matching trained directly (Boffi et al. 2024)
    samples the full square, so that the map is learned in both directions.

    **Arguments:** none.
    """

    uses_u: ClassVar[bool] = False

    @property
    def ordered(self) -> bool:
        return False

    def __call__(self, key: PRNGKeyArray, n: int, *, dtype=jnp.float32) -> Times:
        _check_call("UniformSquare", n, dtype)
        draws = jax.random.uniform(key, (2, n), dtype)
        return Times(s=draws[0], t=draws[1])


class SortedPair(AbstractTimeSampler):
    """Two independent draws, sorted: `s = max(a, b)`, `t = min(a, b)`, with a
    deterministic fraction of rows on the diagonal `t = s`.

    `a ~ first`, `b ~ second` (default: `first`). The **first**
    `round(equal_fraction · n)` rows get `t = s` (with `s` still the maximum of the
    two draws), as MeanFlow's `arange` mask does, so code that lines up other masks
    with the row index (label dropout, batch splits) sees the same rows every step.
    `round` is Python's (ties to even); `equal_count="floor"` takes
    `int(equal_fraction · n)` instead, as MeanFlow's code does (`data_size =
    int(bz * data_proportion)`, Gsunshine/meanflow at d70cb55).

    Settings from the literature (translated into our convention):

    - MeanFlow ImageNet (Geng et al. 2025): `SortedPair(LogitNormal(-0.4, 1.0),
      equal_fraction=0.75)`;
    - MeanFlow CIFAR-10 (paper): `SortedPair(LogitNormal(-2.0, 2.0),
      equal_fraction=0.25)`;
    - improved MeanFlow: `SortedPair(LogitNormal(-0.4, 1.0), equal_fraction=0.5)`;
    - DMF's MeanFlow term: `SortedPair(LogitNormal(0.4, 1.0),
      LogitNormal(-1.2, 1.0))`.

    **Arguments:**

    - `first`: the distribution of the first draw.
    - `second`: the distribution of the second draw; `None` (default) uses `first`.
    - `equal_fraction`: the fraction of rows with `t = s`, in `[0, 1]` (default 0).
    - `equal_count`: how that fraction of `n` becomes a count of rows: `"round"`
      (default) or `"floor"`.
    """

    first: AbstractTimeDistribution
    second: AbstractTimeDistribution | None = None
    equal_fraction: float = eqx.field(static=True, default=0.0, converter=_as_float)
    equal_count: Literal["round", "floor"] = eqx.field(static=True, default="round")

    uses_u: ClassVar[bool] = False

    @property
    def ordered(self) -> bool:
        return True

    def __check_init__(self):
        _check_distribution("SortedPair", "first", self.first)
        if self.second is not None:
            _check_distribution("SortedPair", "second", self.second)
        _check_unit("SortedPair", "equal_fraction", self.equal_fraction)
        if self.equal_count not in ("round", "floor"):
            raise ValueError(
                "`SortedPair(equal_count=...)` must be 'round' or 'floor'; got "
                f"{self.equal_count!r}."
            )

    def equal_rows(self, n: int) -> int:
        """How many of `n` rows get `t = s`."""
        exact = self.equal_fraction * n
        return int(exact) if self.equal_count == "floor" else round(exact)

    def __call__(self, key: PRNGKeyArray, n: int, *, dtype=jnp.float32) -> Times:
        _check_call("SortedPair", n, dtype)
        key_a, key_b = jax.random.split(key)
        second = self.first if self.second is None else self.second
        a = self.first.sample(key_a, (n,), dtype)
        b = second.sample(key_b, (n,), dtype)
        s, t = jnp.maximum(a, b), jnp.minimum(a, b)
        equal = jnp.arange(n) < self.equal_rows(n)
        return Times(s=s, t=jnp.where(equal, s, t))


class Equal(AbstractTimeSampler):
    """The diagonal: `t = s ~ distribution`.

    The rows of plain flow matching and of the diagonal (velocity) anchor of
    self-distillation: Boffi et al. (2025) use `Equal(Uniform())`, SoFlow
    `Equal(LogitNormal(-0.2, 1.0))`, DMF `Equal(LogitNormal(0.0, 1.0))`.

    **Arguments:**

    - `distribution`: the distribution of `s`.
    """

    distribution: AbstractTimeDistribution

    uses_u: ClassVar[bool] = False

    @property
    def ordered(self) -> bool:
        return True

    def __check_init__(self):
        _check_distribution("Equal", "distribution", self.distribution)

    def __call__(self, key: PRNGKeyArray, n: int, *, dtype=jnp.float32) -> Times:
        _check_call("Equal", n, dtype)
        s = self.distribution.sample(key, (n,), dtype)
        return Times(s=s, t=s)


class FixedTarget(AbstractTimeSampler):
    """A fixed target time: `t = target`, `s = target + (1 - target) · a`,
    `a ~ distribution`.

    With the default `target = 0` this is `s ~ distribution`, mapped to data: the
    consistency function `F(x_s, s, 0)` of consistency models (Song et al. 2023) and
    of FACM's consistency branch (`FixedTarget(ArctanLogNormal(-0.8, 1.6))`). For
    `target > 0` the draw is rescaled onto `[target, 1]` (rather than truncated), so
    that `s ≥ t` on every row.

    **Arguments:**

    - `distribution`: the distribution of `a`.
    - `target`: the target time, in `[0, 1]` (default 0).
    """

    distribution: AbstractTimeDistribution
    target: float = eqx.field(static=True, default=0.0, converter=_as_float)

    uses_u: ClassVar[bool] = False

    @property
    def ordered(self) -> bool:
        return True

    def __check_init__(self):
        _check_distribution("FixedTarget", "distribution", self.distribution)
        _check_unit("FixedTarget", "target", self.target)

    def __call__(self, key: PRNGKeyArray, n: int, *, dtype=jnp.float32) -> Times:
        _check_call("FixedTarget", n, dtype)
        a = self.distribution.sample(key, (n,), dtype)
        t = jnp.full((n,), self.target, dtype)
        s = jnp.clip(self.target + (1 - self.target) * a, t, 1.0)
        return Times(s=s, t=t)


class FixedSource(AbstractTimeSampler):
    """A fixed source time: `s = source`, `t = source · a`, `a ~ distribution`.

    With the default `source = 1` this is `t ~ distribution`, mapped from pure
    noise: the single-source maps `F(eps, 1, t)` of PID (Tee et al. 2024), BOOT
    (Gu et al. 2024) and FreeFlow (Tong et al. 2025). For `source < 1` the draw is
    rescaled onto `[0, source]` (rather than truncated), so that `s ≥ t`.

    **Arguments:**

    - `distribution`: the distribution of `a`.
    - `source`: the source time, in `[0, 1]` (default 1).
    """

    distribution: AbstractTimeDistribution
    source: float = eqx.field(static=True, default=1.0, converter=_as_float)

    uses_u: ClassVar[bool] = False

    @property
    def ordered(self) -> bool:
        return True

    def __check_init__(self):
        _check_distribution("FixedSource", "distribution", self.distribution)
        _check_unit("FixedSource", "source", self.source)

    def __call__(self, key: PRNGKeyArray, n: int, *, dtype=jnp.float32) -> Times:
        _check_call("FixedSource", n, dtype)
        a = self.distribution.sample(key, (n,), dtype)
        s = jnp.full((n,), self.source, dtype)
        t = jnp.clip(self.source * a, 0.0, s)
        return Times(s=s, t=t)


class DyadicSteps(AbstractTimeSampler):
    """The dyadic grid of shortcut models (Frans et al. 2025).

    A step `d = 2^-k` with `k` uniform in `{0, …, levels - 1}`, then `s` uniform on
    the grid `{d, 2d, …, 1}`, `t = s - d` and the midpoint `u = s - d/2`. All values
    are exact binary fractions, so the grid holds exactly.

    Translation: shortcut models run `t = 0` noise to `1` data and condition on
    `(τ, d)` with `τ ∈ {0, d, …, 1 - d}`; our `s = 1 - τ` covers `{d, …, 1}`. The
    paper's `levels = 7` gives `d ∈ {1, 1/2, …, 1/64}` (its flow-matching rows use
    the finest label `d = 1/128`; draw them with [`fmcalc.Equal`][]). The paper
    spreads `k` evenly over the self-consistency rows: `allocation="even"` does
    the same; by default `k` is drawn per row.

    **Arguments:**

    - `levels`: the number of step sizes, `≥ 1` (default 7).
    - `allocation`: how rows get their level. `"random"` (default): `k` uniform per
      row. `"even"`: `n // levels` rows per level, finest first (`k = levels - 1`,
      …, `0`), and the remaining `n % levels` rows the largest step `d = 1`, in
      that row order (as shortcut models' code does: at their 32 self-consistency
      rows of 7 levels, a quarter of the rows take `d = 1`).
    """

    levels: int = eqx.field(static=True, default=7, converter=_as_int)
    allocation: Literal["random", "even"] = eqx.field(static=True, default="random")

    uses_u: ClassVar[bool] = True

    @property
    def ordered(self) -> bool:
        return True

    def __check_init__(self):
        _check_int("DyadicSteps", "levels", self.levels, 1)
        if self.allocation not in ("random", "even"):
            raise ValueError(
                "`DyadicSteps(allocation=...)` must be 'random' or 'even'; got "
                f"{self.allocation!r}."
            )

    def __call__(self, key: PRNGKeyArray, n: int, *, dtype=jnp.float32) -> Times:
        _check_call("DyadicSteps", n, dtype)
        key_k, key_j = jax.random.split(key)
        if self.allocation == "even":
            per = n // self.levels
            k = jnp.asarray(
                np.concatenate(
                    [
                        np.repeat(np.arange(self.levels)[::-1], per),
                        np.zeros(n % self.levels, int),
                    ]
                )
            )
        else:
            k = jax.random.randint(key_k, (n,), 0, self.levels)
        count = jnp.left_shift(1, k)
        j = jax.random.randint(key_j, (n,), 1, count + 1)
        d = jnp.ldexp(jnp.ones((n,), dtype), -k)
        s = j.astype(dtype) * d
        return Times(s=s, t=s - d, u=s - d / 2)


class GridStep(AbstractTimeSampler):
    """One step of a uniform grid: `s` uniform on `{1/N, 2/N, …, 1}` and
    `t = s - 1/N`.

    Shortcut models' flow-matching rows (Frans et al. 2025): their times lie on the
    128-point grid and the network is asked for the finest step `d = 1/128`, not
    `d = 0`. With [`fmcalc.flow_matching`][]`(at="target")` the residual is then
    `V(x, s, s - 1/N) - (eps - x0)`, whose minimiser is the velocity at `s`, off
    the exact map's `V` by `O(1/N)`.

    **Arguments:**

    - `count`: the number of grid steps `N ≥ 1` (default 128).
    """

    count: int = eqx.field(static=True, default=128, converter=_as_int)

    uses_u: ClassVar[bool] = False

    @property
    def ordered(self) -> bool:
        return True

    def __check_init__(self):
        _check_int("GridStep", "count", self.count, 1)

    def __call__(self, key: PRNGKeyArray, n: int, *, dtype=jnp.float32) -> Times:
        _check_call("GridStep", n, dtype)
        j = jax.random.randint(key, (n,), 1, self.count + 1).astype(dtype)
        return Times(s=j / self.count, t=(j - 1) / self.count)


class KarrasGrid(AbstractTimeSampler):
    """The discrete noise grid of consistency training and distillation.

    The EDM grid (Karras et al. 2022), in increasing order,
    `σ_i = (σ_min^{1/ρ} + i/(N-1) (σ_max^{1/ρ} - σ_min^{1/ρ}))^ρ`, `i = 0, …, N-1`,
    is mapped to our time by `s = σ/(1 + σ)` (EDM's `x_σ = x0 + σ eps` is
    `(1 + σ) x_s`). An index `i` is drawn uniformly from `{0, …, N-2}`; then
    `s = time(σ_{i+1})`, `u = time(σ_i)` (the adjacent, less noisy point where the
    target network is evaluated) and `t = 0` (consistency models map to data).

    Song et al. (2023) use `N = 18` for CD; CT and iCT grow `N` during training
    (see [`fmcalc.schedules.Doubling`][]). `steps` is static: a curriculum rebuilds
    the sampler, e.g. `KarrasGrid(int(schedule(step)))` outside `jit`. iCT's
    log-normal weighting over the grid indices is not implemented (the index is
    uniform).

    **Arguments:**

    - `steps`: the number of grid points `N ≥ 2` (default 18).
    - `sigma_min`, `sigma_max`: the ends of the grid, `0 < sigma_min < sigma_max`
      (default 0.002, 80).
    - `rho`: the grid exponent, positive (default 7).
    """

    steps: int = eqx.field(static=True, default=18, converter=_as_int)
    sigma_min: float = eqx.field(static=True, default=0.002, converter=_as_float)
    sigma_max: float = eqx.field(static=True, default=80.0, converter=_as_float)
    rho: float = eqx.field(static=True, default=7.0, converter=_as_float)

    uses_u: ClassVar[bool] = True

    @property
    def ordered(self) -> bool:
        return True

    def __check_init__(self):
        _check_int("KarrasGrid", "steps", self.steps, 2)
        low = _check_positive("KarrasGrid", "sigma_min", self.sigma_min)
        high = _check_positive("KarrasGrid", "sigma_max", self.sigma_max)
        if not low < high:
            raise ValueError(
                f"`KarrasGrid` needs sigma_min < sigma_max; got sigma_min={low!r}, "
                f"sigma_max={high!r}."
            )
        _check_positive("KarrasGrid", "rho", self.rho)

    @property
    def grid(self) -> np.ndarray:
        """The grid times `σ_i/(1 + σ_i)`, increasing, shape `(steps,)`, float64."""
        inv = 1 / self.rho
        frac = np.linspace(0.0, 1.0, self.steps)
        lo, hi = self.sigma_min**inv, self.sigma_max**inv
        sigma = (lo + frac * (hi - lo)) ** self.rho
        return sigma / (1 + sigma)

    def __call__(self, key: PRNGKeyArray, n: int, *, dtype=jnp.float32) -> Times:
        _check_call("KarrasGrid", n, dtype)
        grid = jnp.asarray(self.grid, dtype)
        i = jax.random.randint(key, (n,), 0, self.steps - 1)
        return Times(s=grid[i + 1], t=jnp.zeros((n,), dtype), u=grid[i])


class GapFirst(AbstractTimeSampler):
    """Gap first: `ℓ ~ gap`, `t = a (1 - ℓ)` with `a ~ target`, `s = t + ℓ`.

    Terminal Velocity Matching (Zhou et al. 2025) draws the gap `ℓ = s - t` first and
    then the target time conditioned on `t + ℓ ≤ 1`. TVM's code truncates the target
    distribution to `[0, 1 - ℓ]`; here it is **rescaled** onto that interval instead,
    so `t / (1 - ℓ) ~ target` exactly and no draw is rejected. The two coincide for a
    uniform `target`: `GapFirst(gap=LogitNormal(μ, σ), target=Uniform())` is the
    AYF reproduction's sampler (gap `sigmoid(N(μ, σ))`, `t ~ U(0, 1 - ℓ)`).

    **Arguments:**

    - `gap`: the distribution of `ℓ = s - t` (default `LogitNormal(-0.8, 1.0)`).
    - `target`: the distribution of `t / (1 - ℓ)` (default `LogitNormal(-0.4, 1.0)`).
    """

    gap: AbstractTimeDistribution = LogitNormal(-0.8, 1.0)
    target: AbstractTimeDistribution = LogitNormal(-0.4, 1.0)

    uses_u: ClassVar[bool] = False

    @property
    def ordered(self) -> bool:
        return True

    def __check_init__(self):
        _check_distribution("GapFirst", "gap", self.gap)
        _check_distribution("GapFirst", "target", self.target)

    def __call__(self, key: PRNGKeyArray, n: int, *, dtype=jnp.float32) -> Times:
        _check_call("GapFirst", n, dtype)
        key_gap, key_target = jax.random.split(key)
        gap = self.gap.sample(key_gap, (n,), dtype)
        a = self.target.sample(key_target, (n,), dtype)
        t = a * (1 - gap)
        s = jnp.clip(t + gap, t, 1.0)
        return Times(s=s, t=t)


class WithIntermediate(AbstractTimeSampler):
    """Adds an intermediate time `u = s + r (t - s)` to a sampler's `(s, t)`.

    - `fraction=None`: `r ~ U[0, 1]` per row, the split point of SplitMeanFlow
      (Guo et al. 2025; its `λ` is our `r`) and of PSD-uniform (Boffi et al. 2025);
    - `fraction=0.5`: the midpoint `u = (s + t)/2` of PSD-midpoint, a continuous-time
      shortcut model.

    `u` is clipped to `[t, s]` against round-off (to `[s, t]` for the backward rows
    of [`fmcalc.UniformSquare`][]).

    **Arguments:**

    - `base`: a sampler that draws no `u` of its own.
    - `fraction`: the fixed fraction `r` in `[0, 1]`, or `None` (default) for
      `r ~ U[0, 1]`.
    """

    base: AbstractTimeSampler
    fraction: float | None = eqx.field(static=True, default=None, converter=_as_float)

    uses_u: ClassVar[bool] = True

    @property
    def ordered(self) -> bool:
        return self.base.ordered

    def __check_init__(self):
        if not isinstance(self.base, AbstractTimeSampler):
            raise TypeError(
                "`WithIntermediate(base=...)` must be a time sampler such as "
                f"`fmcalc.UniformTriangle()`; got {self.base!r}."
            )
        if self.base.uses_u:
            raise ValueError(
                f"`WithIntermediate` adds `u` to a sampler that draws none, but "
                f"{type(self.base).__name__} already draws its own `u`."
            )
        if self.fraction is not None:
            _check_unit("WithIntermediate", "fraction", self.fraction)

    def __call__(self, key: PRNGKeyArray, n: int, *, dtype=jnp.float32) -> Times:
        _check_call("WithIntermediate", n, dtype)
        key_base, key_r = jax.random.split(key)
        times = self.base(key_base, n, dtype=dtype)
        s, t = times.s, times.t
        if self.fraction is None:
            r = jax.random.uniform(key_r, (n,), dtype)
        else:
            r = jnp.full((n,), self.fraction, dtype)
        u = s + r * (t - s)
        return Times(s=s, t=t, u=jnp.clip(u, jnp.minimum(s, t), jnp.maximum(s, t)))
