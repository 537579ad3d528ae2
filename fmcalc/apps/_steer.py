"""Reward steering: gradient steering through a look-ahead, importance sampling and
sequential Monte Carlo with look-ahead scores."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from .._conventions import interpolate, score_from_velocity
from .._custom_types import Cond, Scalar, Vector
from .._misc import check_example, concrete, time_grid
from ._lookahead import AbstractLookahead, FlowMapLookahead, jump, velocity


Reward = Callable[[Vector], Scalar]


def _jump_all(model, x, s, t, cond):
    return jax.vmap(lambda x: jump(model, x, s, t, cond))(x)


def _check_strength(strength) -> None:
    if jnp.ndim(strength) != 0:
        raise ValueError(
            f"`strength` must be a scalar; got shape {jnp.shape(strength)}."
        )
    value = concrete(strength)
    if value is not None and not np.isfinite(value):
        raise ValueError(f"`strength` must be finite; got {float(value)!r}.")


def _check_reward(reward, example) -> None:
    """`reward` must map one example (shaped like `example`) to a scalar."""
    try:
        out = jax.eval_shape(reward, jax.ShapeDtypeStruct(example.shape, example.dtype))
    except Exception as error:
        raise ValueError(
            f"`reward` must take one example of shape {example.shape}; calling it on "
            f"one failed with {type(error).__name__}: {error}"
        ) from error
    if not (isinstance(out, jax.ShapeDtypeStruct) and out.shape == ()):
        shape = getattr(out, "shape", type(out).__name__)
        raise ValueError(
            f"`reward` must return a scalar per example; on one example of shape "
            f"{example.shape} it returned {shape}. Reduce it (e.g. a sum) or pick "
            "one coordinate."
        )


def _times(steps, grid, default: int, dtype):
    """The sampling grid: `steps` (default `default` without a `grid`) or `grid`."""
    if steps is None:
        steps = default if grid is None else 1
    return time_grid(steps, grid, "sample", dtype)


def _check_lookahead(lookahead) -> None:
    if not isinstance(lookahead, AbstractLookahead):
        raise TypeError(
            "`lookahead` must be a look-ahead such as `fmcalc.apps.FlowMapLookahead()`"
            f", `TweedieLookahead()` or `NoLookahead()`; got {lookahead!r}."
        )


def _check_batch(noise) -> None:
    if jnp.ndim(noise) != 2:
        raise ValueError(
            "`noise` must be a batch of particles of shape (n, dim); got shape "
            f"{jnp.shape(noise)}."
        )
    if not jnp.issubdtype(jnp.result_type(noise), jnp.floating):
        raise TypeError(
            f"`noise` must be a floating array; got dtype {jnp.result_type(noise)}."
        )


def steer(
    model: Callable[..., Vector],
    reward: Reward,
    noise: Vector,
    *,
    key: PRNGKeyArray,
    strength: Float[ArrayLike, ""],
    lookahead: AbstractLookahead = FlowMapLookahead(),
    steps: int | None = None,
    grid: Float[ArrayLike, " _"] | None = None,
    langevin_steps: int = 8,
    step_size: float = 0.2,
    max_drift: float | None = 3.0,
    cond: Cond = None,
) -> Vector:
    """Steer sampling towards `p(x) exp(λ r(x)) / Z` with the reward's gradient taken
    through a look-ahead.

    At each time `t_i` of the grid `1 = t_0 > ... > t_K = 0`, `langevin_steps`
    Langevin moves aim at the tilted density `ρ_t(x) ∝ p_t(x) exp(λ r(x̂0(x, t)))`,

    `x ← x + η (∇ log p_t(x) + λ ∇_x r(x̂0(x, t))) + √(2η) z`, `η = step_size · t²`,

    with the score `∇ log p_t` from the model's velocity
    ([`fmcalc.score_from_velocity`][]) and `∇_x r(x̂0(x, t))` by `jax.grad` through
    the look-ahead `x̂0` (through the flow map, for the default); then the map jumps
    on, `x ← F(x, t_i, t_{i+1})`.

    **When it is exact.** With [`fmcalc.apps.FlowMapLookahead`][] and an exact map,
    `ρ_t` is the tilted data distribution pulled back by `F(·, t, 0)`: the jumps carry
    `ρ_{t_i}` to `ρ_{t_{i+1}}` exactly and the Langevin moves leave it invariant, so
    the samples converge to the tilted distribution as the moves mix (more moves,
    smaller steps); the Langevin discretisation leaves an `O(step_size)` bias. With
    [`fmcalc.apps.TweedieLookahead`][] or [`fmcalc.apps.NoLookahead`][], `ρ_t` is not
    carried by the flow, so the result is biased even with an exact map. With a
    learned map, the result is the tilt of what the map samples, as far as its
    velocity and map agree.

    **Step control.** Near the boundary between two modes the look-ahead's Jacobian
    can be large (on a 3-component mixture `‖∂F(x, 1, 0)/∂x‖` reaches about 100),
    and one move `η λ ∇r` can throw a particle far from every mode, where the
    next moves do not bring it back. With `max_drift`, a move's drift
    `η (∇ log p_t + λ ∇r)` is scaled down to at most `max_drift` times the length
    `√(2 η dim)` of its noise: a trust region that leaves ordinary moves alone
    and biases only the moves it shortens. `max_drift=None` takes every move as
    it is.

    `strength = 0`, or a constant reward, leaves only Langevin moves on `p_t`, which
    change the samples but not (up to the discretisation) their distribution;
    `langevin_steps = 0` is [`fmcalc.sample`][] itself.

    **Arguments:**

    - `model`: the average velocity, called per example as `model(x, s, t, cond=cond)`
      (any fmcalc model, or an analytic flow).
    - `reward`: `r(x) -> scalar` on one data example, differentiable.
    - `noise`: one example of noise, shape `(dim,)`; batch with `jax.vmap` (give each
      example its own `key`).
    - `key`: the PRNG key of the Langevin noise.
    - `strength`: `λ`, a scalar.
    - `lookahead`: how `x̂0(x, t)` is predicted (default: one flow-map jump).
    - `steps`, `grid`: the sampling grid, as in [`fmcalc.sample`][]; `steps`
      defaults to 4 without a `grid`.
    - `langevin_steps`: Langevin moves at each grid time before its jump.
    - `step_size`: the Langevin step relative to `t²` (the noise variance at `t`).
    - `max_drift`: the longest drift of one move, in units of the move's noise
      length (default 3; `None`: no limit). See "Step control".
    - `cond`: conditioning passed on to every model call as `cond=` (when not
      `None`).

    **Returns:** the steered sample at `t = 0`, shaped like `noise`.
    """
    check_example("noise", noise)
    _check_strength(strength)
    _check_reward(reward, noise)
    _check_lookahead(lookahead)
    if isinstance(langevin_steps, bool) or not isinstance(langevin_steps, int):
        raise TypeError(f"`langevin_steps` must be an int; got {langevin_steps!r}.")
    if langevin_steps < 0:
        raise ValueError(f"`langevin_steps` must be ≥ 0; got {langevin_steps}.")
    if not step_size > 0:
        raise ValueError(f"`step_size` must be positive; got {step_size!r}.")
    if max_drift is not None and not max_drift > 0:
        raise ValueError(
            f"`max_drift` must be positive, or None for no limit; got {max_drift!r}."
        )
    times = _times(steps, grid, 4, noise.dtype)
    strength = jnp.asarray(strength, noise.dtype)

    def tilt(x, t):
        return strength * reward(lookahead(model, x, t, cond=cond))

    # Loops, not unrolled: one compiled Langevin move and one jump, whatever the
    # grid (a look-ahead through an ODE-solved map is large to compile).
    def move(i, t, x):
        def langevin(j, x):
            z = jax.random.normal(
                jax.random.fold_in(key, i * langevin_steps + j), x.shape, x.dtype
            )
            eta = step_size * t**2
            score = score_from_velocity(x, t, velocity(model, x, t, cond))
            drift = eta * (score + jax.grad(tilt)(x, t))
            if max_drift is not None:
                longest = max_drift * jnp.sqrt(2 * eta * x.size)
                length = jnp.linalg.norm(drift)
                drift = drift * (longest / jnp.maximum(length, longest))
            return x + drift + jnp.sqrt(2 * eta) * z

        return jax.lax.fori_loop(0, langevin_steps, langevin, x)

    def step(x, inputs):
        i, t, t_next = inputs
        return jump(model, move(i, t, x), t, t_next, cond), None

    count = times.shape[0] - 1
    x, _ = jax.lax.scan(step, noise, (jnp.arange(count), times[:-1], times[1:]))
    return x


class Particles(eqx.Module):
    """Weighted samples: the result of [`fmcalc.apps.importance_sample`][] and
    [`fmcalc.apps.smc`][].

    **Attributes:**

    - `samples`: the particles at `t = 0`, shape `(n, dim)`.
    - `log_weights`: their unnormalised log importance weights, shape `(n,)`.
    - `ess`: the effective sample size `(Σ w)² / Σ w²` at each reweighting before any
      resampling, shape `(steps,)` (one entry for importance sampling).
    - `log_normalizer`: the estimate of `log Z`, `Z = E[exp(λ r(x))]` under what the
      map samples: the log of the product, over the stretches between
      resamplings, of the mean weight of each stretch (the standard sequential
      Monte Carlo estimate; for importance sampling the log of the mean weight).
      `Z` is estimated without bias, `log Z` with a bias that vanishes as `n`
      grows; [`fmcalc.apps.log_normalizer`][] is the exact value for a Gaussian
      (mixture) and a quadratic reward.

    Averages under the target are `Σ_i w_i f(samples_i) / Σ_i w_i`;
    [`fmcalc.apps.resample`][] turns the particles into equally weighted samples.
    """

    samples: Float[Array, "n dim"]
    log_weights: Float[Array, " n"]
    ess: Float[Array, " steps"]
    log_normalizer: Float[Array, ""]

    @property
    def weights(self) -> Float[Array, " n"]:
        """The normalised weights, summing to 1."""
        return jax.nn.softmax(self.log_weights)


def _log_mean(log_weights):
    return jax.nn.logsumexp(log_weights) - jnp.log(log_weights.shape[0])


def _ess(log_weights):
    return jnp.exp(
        2 * jax.nn.logsumexp(log_weights) - jax.nn.logsumexp(2 * log_weights)
    )


def _systematic(key, log_weights, n: int):
    """Indices of systematic resampling: one uniform offset, `n` evenly spaced
    positions through the weights' cumulative sum (lower variance than drawing each
    index independently)."""
    cdf = jnp.cumsum(jax.nn.softmax(log_weights))
    positions = (jax.random.uniform(key, (), cdf.dtype) + jnp.arange(n)) / n
    # "sort" has no while loop, so the FLOP meter can count the whole program.
    index = jnp.searchsorted(cdf, positions, side="right", method="sort")
    return jnp.minimum(index, log_weights.shape[0] - 1)


def resample(
    particles: Particles, n: int | None = None, *, key: PRNGKeyArray | None = None
) -> Float[Array, "m dim"]:
    """Equally weighted samples from weighted particles, by systematic resampling:
    particle `i` is copied about `n w_i` times.

    **Arguments:**

    - `particles`: [`fmcalc.apps.Particles`][].
    - `n`: the number of samples (default: as many as particles).
    - `key`: a PRNG key (a keyword, as in every function of `fmcalc.apps`).

    **Returns:** an array of shape `(n, dim)`.
    """
    if not isinstance(particles, Particles):
        raise TypeError(
            "`resample(particles, n=None, *, key=...)` takes the particles first "
            f"and the key as `key=`; got {type(particles).__name__} as the particles."
        )
    if key is None:
        raise TypeError("`resample` needs a PRNG key: `resample(particles, key=...)`.")
    count = particles.samples.shape[0] if n is None else n
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"`n` must be a positive int or None; got {n!r}.")
    return particles.samples[_systematic(key, particles.log_weights, count)]


def importance_sample(
    model: Callable[..., Vector],
    reward: Reward,
    noise: Float[Array, "n dim"],
    *,
    strength: Float[ArrayLike, ""],
    steps: int | None = None,
    grid: Float[ArrayLike, " _"] | None = None,
    cond: Cond = None,
) -> Particles:
    """Many flow-map samples, weighted by `exp(λ r(x))`: the gradient-free way to
    sample `p(x) exp(λ r(x)) / Z` without any look-ahead.

    Each particle is [`fmcalc.sample`][]`(model, noise_i)`, with log-weight
    `λ r(x_i)`. The weighted particles are consistent (they converge to the tilted
    distribution of what the map samples as `n` grows), but the effective sample size
    shrinks as `λ` grows or as the reward's high region gets rarer. Keeping only the
    best of `n` is the limit `λ → ∞`.

    **Arguments:**

    - `model`: the average velocity, called per example as `model(x, s, t, cond=cond)`.
    - `reward`: `r(x) -> scalar` on one data example.
    - `noise`: the particles' noise, shape `(n, dim)`.
    - `strength`: `λ`, a scalar.
    - `steps`, `grid`: the sampling grid, as in [`fmcalc.sample`][].
    - `cond`: conditioning passed on to every model call as `cond=` (when not
      `None`; the same for every particle).

    **Returns:** [`fmcalc.apps.Particles`][]; pass them to [`fmcalc.apps.resample`][]
    for equally weighted samples.
    """
    _check_batch(noise)
    _check_strength(strength)
    _check_reward(reward, noise[0])
    times = _times(steps, grid, 1, noise.dtype)

    def one(x):
        for i in range(times.shape[0] - 1):
            x = jump(model, x, times[i], times[i + 1], cond)
        return x

    samples = jax.vmap(one)(noise)
    log_weights = jnp.asarray(strength, noise.dtype) * jax.vmap(reward)(samples)
    return Particles(
        samples, log_weights, _ess(log_weights)[None], _log_mean(log_weights)
    )


def smc(
    model: Callable[..., Vector],
    reward: Reward,
    noise: Float[Array, "n dim"],
    *,
    key: PRNGKeyArray,
    strength: Float[ArrayLike, ""],
    lookahead: AbstractLookahead = FlowMapLookahead(),
    steps: int | None = None,
    grid: Float[ArrayLike, " _"] | None = None,
    renoise: bool = True,
    resample_below: float = 0.5,
    cond: Cond = None,
) -> Particles:
    """Sequential Monte Carlo towards `p(x) exp(λ r(x)) / Z`, with look-ahead scores
    and no reward gradients.

    Particles start at the noise; at each time `t_i` of the grid `1 = t_0 > ... >
    t_K = 0` they are scored by `λ r(x̂0(x, t_i))`, resampled (systematically) when
    the effective sample size falls below `resample_below · n`, and moved to
    `t_{i+1}`:

    - `renoise=True` (default): jump to data and re-noise,
      `x ← (1 - t_{i+1}) F(x, t_i, 0) + t_{i+1} eps` with fresh `eps`, as
      [`fmcalc.sample_consistency`][] does. Duplicated particles then part ways.
    - `renoise=False`: the deterministic jump `x ← F(x, t_i, t_{i+1})`; duplicates
      stay duplicates.

    The weight of each move is the change of score, `λ (r(x̂0(x', t_{i+1})) -
    r(x̂0(x, t_i)))`, after an initial weight `λ r(x̂0(noise, 1))`. The moves are
    the map's own (untilted) proposal, so this is sequential Monte Carlo with
    look-ahead potentials, as in Feynman-Kac steering (Singhal et al. 2025, "A
    general framework for inference-time scaling and steering of diffusion
    models"), not twisted SMC (Wu et al. 2023, "Practical and asymptotically exact
    conditional sampling in diffusion models"), whose proposal is tilted as well.
    The mean weight of each stretch between resamplings multiplies into an
    estimate of the normalising constant `Z = E[exp(λ r(x))]`
    (`Particles.log_normalizer`). The log-weights telescope to `λ r(x_K)`, since every
    look-ahead is the identity at `t = 0`, so the weighted particles are consistent
    for *any* look-ahead whenever each move keeps the map's marginals (both moves do
    for an exact map): the look-ahead only decides how early particles are selected,
    hence how many distinct ones survive. The flow-map look-ahead with an exact map
    scores every particle by the reward of its own end point from the start.

    `strength = 0` or a constant reward gives equal weights and no resampling: with
    `renoise=False` the particles are [`fmcalc.sample`][]'s samples.

    **Arguments:**

    - `model`: the average velocity, called per example as `model(x, s, t, cond=cond)`.
    - `reward`: `r(x) -> scalar` on one data example.
    - `noise`: the particles' noise, shape `(n, dim)`.
    - `key`: the PRNG key of resampling and re-noising.
    - `strength`: `λ`, a scalar.
    - `lookahead`: how particles are scored at `t > 0` (default: one flow-map jump).
    - `steps`, `grid`: the grid, as in [`fmcalc.sample`][]; `steps` defaults to 4
      without a `grid`.
    - `renoise`: the move (above).
    - `resample_below`: resample when the effective sample size is below this
      fraction of `n`, in `[0, 1]` (`0` never resamples before the end).
    - `cond`: conditioning passed on to every model call as `cond=` (when not
      `None`; the same for every particle).

    **Returns:** [`fmcalc.apps.Particles`][], weighted; pass them to
    [`fmcalc.apps.resample`][] for equally weighted samples.
    """
    _check_batch(noise)
    _check_strength(strength)
    _check_reward(reward, noise[0])
    _check_lookahead(lookahead)
    if not 0 <= resample_below <= 1:
        raise ValueError(
            f"`resample_below` must lie in [0, 1]; got {resample_below!r}."
        )
    n = noise.shape[0]
    times = _times(steps, grid, 4, noise.dtype)
    strength = jnp.asarray(strength, noise.dtype)
    # One flow-map jump to data is both the look-ahead and the re-noising move's
    # first half: computed once per step.
    shared = renoise and lookahead == FlowMapLookahead(1)

    def ahead(x, t):
        return jax.vmap(lambda x: lookahead(model, x, t, cond=cond))(x)

    x = noise
    predicted = ahead(x, times[0])
    scores = strength * jax.vmap(reward)(predicted)
    log_weights = scores
    log_z = jnp.zeros((), noise.dtype)
    history = []
    for i in range(times.shape[0] - 1):
        t, t_next = times[i], times[i + 1]
        ess = _ess(log_weights)
        history.append(ess)
        step_key = jax.random.fold_in(key, i)
        index = _systematic(jax.random.fold_in(step_key, 0), log_weights, n)
        again = ess < resample_below * n
        x, predicted, scores = (
            jnp.where(again, a[index], a) for a in (x, predicted, scores)
        )
        log_z = log_z + jnp.where(again, _log_mean(log_weights), 0.0)
        log_weights = jnp.where(again, jnp.zeros_like(log_weights), log_weights)
        if renoise:
            data = predicted if shared else _jump_all(model, x, t, 0, cond)
            eps = jax.random.normal(jax.random.fold_in(step_key, 1), x.shape, x.dtype)
            x = interpolate(data, eps, jnp.full(n, t_next))
        else:
            x = _jump_all(model, x, t, t_next, cond)
        predicted = ahead(x, t_next)
        new_scores = strength * jax.vmap(reward)(predicted)
        log_weights = log_weights + new_scores - scores
        scores = new_scores
    log_z = log_z + _log_mean(log_weights)
    return Particles(x, log_weights, jnp.stack(history), log_z)
