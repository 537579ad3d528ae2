"""A short training run that tells a working loss from one that only looks right."""

import hashlib
import time
from collections.abc import Callable
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from .._custom_types import Vector
from .._method import Method
from .._sampling import model_velocity, sample, sample_euler
from .._times import Equal, FixedSource, FixedTarget, KarrasGrid
from ..flows._base import AbstractFlow
from ..nn import MLP
from ._flows import asymmetric_mixture
from ._method_checks import checkable


def _worst(*errors: float) -> float:
    """The largest of the errors that are not NaN; NaN if none is (no numpy
    warning about an all-NaN slice)."""
    known = [float(e) for e in errors if not np.isnan(e)]
    return max(known) if known else float("nan")


class TrainingResult(NamedTuple):
    """Outcome of [`fmcalc.testing.check_training`][].

    Errors are paired: the mean distance between the sample a model draws from a
    noise `eps` and the exact end point `F*(eps, 1, 0)` of the same noise.

    - `method`: the method's name.
    - `steps`: the training steps of each run.
    - `one_step`, `two_step`: the method's error with 1 and 2 jumps (`NaN` for
      2 jumps of a map trained only from noise, `s = 1`, or only to data,
      `t = 0`: the jump through `t = 1/2` would use a map it never trained).
    - `flow_matching`: flow matching's error with 128 Euler steps, trained with the
      same budget (model, steps, batch, optimiser, key).
    - `velocity_only`: the 1- and 2-jump errors of that flow-matching network used
      as a map, `F(x, s, t) = x + (t - s) V(x, s, t)`: a network trained on the
      diagonal only, extrapolated off it. A method that learned to jump should do
      better; one that learned only a velocity does about as well.
    - `trivial`: the error of predicting the data mean for every noise.
    - `margin`, `multiple`: the bars (see `passed`).
    - `failure`: why training stopped early, if it did (non-finite or diverging
      steps), else `None`.
    - `seconds`: the wall time of the check (the flow-matching run included unless
      it was cached).
    - `jump_gradient`: how much of the loss's gradient reaches the map off the
      diagonal, before training: `‖g_h‖ / (‖g_h‖ + ‖g_V‖)` for the gradients of the
      loss with respect to a random linear head `h` added as
      `V(x, s, t) + (t - s)² h(x, s, t)` (no change on the diagonal, nor in its first
      derivatives there) and to the network `V`. A loss that never evaluates the map
      off the diagonal with a gradient gives 0, one that trains only a finite
      difference's step `ε` away from it gives `O(ε²)`; `NaN` for a `"diagonal"`
      rule, which learns a velocity by design.
    - `min_jump_gradient`: its bar.
    - `passed`: training finished, `max(one_step, two_step) <= margin · trivial`
      and `<= multiple · flow_matching` (the 2-jump error left out where it is
      `NaN`), and `jump_gradient >= min_jump_gradient` (unless it is `NaN`).
    """

    method: str
    steps: int
    one_step: float
    two_step: float
    flow_matching: float
    trivial: float
    margin: float
    multiple: float
    failure: str | None
    seconds: float
    passed: bool
    velocity_only: tuple[float, float] = (float("nan"), float("nan"))
    jump_gradient: float = float("nan")
    min_jump_gradient: float = 0.0

    def __str__(self) -> str:
        worst = _worst(self.one_step, self.two_step)
        verdict = "pass"
        if self.failure is not None:
            verdict = f"FAIL: training stopped ({self.failure})"
        elif not self.passed:
            reasons = []
            if not worst <= self.margin * self.trivial:
                reasons.append(
                    f"{worst:.3g} is not below {self.margin:g} x the data mean's "
                    f"{self.trivial:.3g}"
                )
            if not worst <= self.multiple * self.flow_matching:
                reasons.append(
                    f"{worst:.3g} is above {self.multiple:g} x flow matching's "
                    f"{self.flow_matching:.3g}"
                )
            if self.jump_gradient < self.min_jump_gradient:
                reasons.append(
                    f"the loss barely reaches the map off the diagonal (jump "
                    f"gradient {self.jump_gradient:.2g} < {self.min_jump_gradient:g}):"
                    " it trains a velocity, not jumps"
                )
            verdict = "FAIL: " + "; ".join(reasons)
        one, two = self.velocity_only
        return (
            f"{self.method} after {self.steps} steps: paired error "
            f"{self.one_step:.3g} (1 jump), {self.two_step:.3g} (2 jumps); flow "
            f"matching {self.flow_matching:.3g} (128 Euler steps), {one:.3g} and "
            f"{two:.3g} as a map (1 and 2 jumps, trained on the diagonal only); "
            f"data mean {self.trivial:.3g}; jump gradient {self.jump_gradient:.2g} "
            f"-> {verdict} ({self.seconds:.0f} s)"
        )


def _one_jump_only(method: Method) -> bool:
    """Whether the method trains its map only from noise (`s = 1`) or only to data
    (`t = 0`): then a 2-jump sample passes through a map it never trained."""
    samplers = [t.times for t in method.terms if not isinstance(t.times, Equal)]
    return bool(samplers) and all(
        (isinstance(times, FixedSource) and times.source == 1)
        or (isinstance(times, FixedTarget) and times.target == 0)
        or isinstance(times, KarrasGrid)
        for times in samplers
    )


@eqx.filter_jit
def jump_samples(
    model: Callable[..., Vector], noise: Float[Array, "n dim"], *, steps: int
) -> Float[Array, "n dim"]:
    """A flow map's samples of a batch of noise in `steps` uniform jumps: the
    per-row [`fmcalc.sample`][], vmapped and jitted.

    **Arguments:**

    - `model`: the average velocity, called per example as `model(x, s, t)`.
    - `noise`: the noise, shape `(n, dim)`.
    - `steps`: the number of jumps.

    **Returns:** the samples, shaped like `noise`; row `i` is drawn from `noise[i]`,
    to compare with [`fmcalc.testing.exact_samples`][] by
    [`fmcalc.testing.paired_error`][].
    """
    return jax.vmap(lambda e: sample(model, e, steps=steps))(noise)


@eqx.filter_jit
def euler_samples(
    model: Callable[..., Vector], noise: Float[Array, "n dim"], *, steps: int
) -> Float[Array, "n dim"]:
    """A model's samples of a batch of noise by `steps` Euler steps of its own
    velocity `v(x, t) = V(x, t, t)`: the flow-matching baseline,
    [`fmcalc.sample_euler`][] of [`fmcalc.model_velocity`][], vmapped and jitted.

    **Arguments:**

    - `model`: the average velocity, called per example as `model(x, s, t)`.
    - `noise`: the noise, shape `(n, dim)`.
    - `steps`: the number of Euler steps.

    **Returns:** the samples, shaped like `noise`, row `i` drawn from `noise[i]`.
    """
    velocity = model_velocity(model)
    return jax.vmap(lambda e: sample_euler(velocity, e, steps=steps))(noise)


@eqx.filter_jit
def exact_samples(
    flow: AbstractFlow, noise: Float[Array, "n dim"]
) -> Float[Array, "n dim"]:
    """The exact end points `F*(eps, 1, 0)` of a batch of noise under an analytic
    flow: what a sampler should return for the same noise.

    **Arguments:**

    - `flow`: an analytic flow (see [`fmcalc.flows`][]).
    - `noise`: the noise, shape `(n, dim)`.

    **Returns:** the data points, shaped like `noise`, row `i` the image of
    `noise[i]`.
    """
    return jax.vmap(lambda e: flow.flow_map(e, 1.0, 0.0))(noise)


def paired_error(
    samples: Float[ArrayLike, "n dim"], exact: Float[ArrayLike, "n dim"]
) -> float:
    """The paired error of samples: the mean Euclidean distance between the sample
    drawn from each noise and the exact end point of the same noise,
    `mean_i ‖samples_i - exact_i‖`.

    Unlike a distance between distributions, it also sees a sampler that draws the
    right distribution along the wrong paths; it is
    [`fmcalc.testing.check_training`][]'s measure.

    **Arguments:**

    - `samples`: the samples, shape `(n, dim)` (e.g. from
      [`fmcalc.testing.jump_samples`][]).
    - `exact`: the exact end points of the same noise, shape `(n, dim)` (e.g. from
      [`fmcalc.testing.exact_samples`][]).

    **Returns:** the mean distance, a Python float.

    **Example:**

    ```python
    flow = fmcalc.flows.Gaussian(jnp.zeros(2), jnp.eye(2))
    eps = jax.random.normal(jax.random.key(0), (1000, 2))
    exact = fmcalc.testing.exact_samples(flow, eps)
    error = fmcalc.testing.paired_error(
        fmcalc.testing.jump_samples(flow, eps, steps=2), exact
    )  # ≈ 0: the exact map is its own sampler
    ```
    """
    distance = np.linalg.norm(np.asarray(samples) - np.asarray(exact), axis=-1)
    return float(np.mean(distance))


class _JumpHead(eqx.Module):
    """`V(x, s, t) + (t - s)² h([x, s, t])`: the network, changed off the diagonal
    only, by a linear head."""

    network: Callable
    head: eqx.nn.Linear

    def __call__(self, x, s, t, *, cond=None):
        z = jnp.concatenate([x, jnp.stack([s, t]).astype(x.dtype)])
        return self.network(x, s, t, cond=cond) + (t - s) ** 2 * self.head(z)


def jump_gradient(
    method: Method,
    model: Callable,
    x0: Float[Array, "n dim"],
    *,
    key: PRNGKeyArray,
    teacher: Callable | None = None,
    aux: Callable | None = None,
) -> float:
    """The share of a loss's gradient that reaches the map off the diagonal:
    [`fmcalc.testing.TrainingResult`][]`.jump_gradient`, on one batch of `x0` with
    the method's curricula at their end.

    **Arguments:**

    - `method`: the [`fmcalc.Method`][].
    - `model`: the network `V`, called as `model(x, s, t, cond=None)`.
    - `x0`: a batch of data, shape `(n, dim)`.
    - `key`: PRNG key (the head's initialisation and the batch).
    - `teacher`, `aux`: the other networks the method reads.

    **Returns:** `‖g_h‖ / (‖g_h‖ + ‖g_V‖)`, a float in `[0, 1]` (0 for a loss
    without gradient).
    """
    k_head, k_batch = jax.random.split(key)
    dim = x0.shape[-1]
    head = eqx.nn.Linear(dim + 2, dim, dtype=x0.dtype, key=k_head)
    joined = _JumpHead(model, head)
    params, static = eqx.partition(joined, eqx.is_array)
    ema = eqx.combine(jax.lax.stop_gradient(params), static)
    batch = method.batch(k_batch, x0)
    step = method.settled_step or 0

    def loss(joined):
        return method.loss(joined, batch, teacher=teacher, ema=ema, aux=aux, step=step)[
            0
        ]

    grads = eqx.filter_jit(eqx.filter_grad(loss))(joined)
    norm = lambda tree: float(  # noqa: E731
        np.sqrt(sum(np.sum(np.square(a)) for a in jax.tree.leaves(tree)))
    )
    on_head, on_network = norm(grads.head), norm(grads.network)
    total = on_head + on_network
    return on_head / total if total > 0 else 0.0


_BASELINES: dict[str, tuple[float, float, float]] = {}


def _train(method, model, flow, *, key, steps, batch_size, learning_rate, **nets):
    from .. import train

    optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
    return train.fit(
        method,
        model,
        flow.sample,
        key=key,
        steps=steps,
        batch_size=batch_size,
        optimizer=optimizer,
        ema=train.EMA(decay=1 - 50 / steps),
        options=train.Options(progress=False),
        **nets,
    ).model


def check_training(
    method: Method,
    *,
    key: PRNGKeyArray,
    flow: AbstractFlow | None = None,
    steps: int = 3000,
    batch_size: int = 256,
    width: int = 64,
    depth: int = 3,
    learning_rate: float = 2e-3,
    n: int = 2000,
    margin: float = 0.6,
    multiple: float = 20.0,
    min_jump_gradient: float = 1e-4,
    teacher: Callable | None = None,
    aux: Callable | None = None,
) -> TrainingResult:
    """Train `method` briefly and compare its samples with the exact ones.

    The fixed-point and stability checks are local: a loss can have the exact map
    as an attracting fixed point and still train to something else from a random
    start (the online network reached only through a frozen network's input does
    this). This check trains a small MLP ([`fmcalc.nn.MLP`][], `skip=True`) with
    [`fmcalc.train.fit`][] (Adam, the learning rate decayed to 0 on a cosine) on
    the broad asymmetric 2-D mixture and measures the paired error of its 1- and
    2-jump samples against the exact end points, next to flow matching trained
    with the same budget (sampled with 128 Euler steps) and the trivial predictor
    (the data mean). A method whose rule is `"diagonal"` learns a velocity and is
    sampled like flow matching.

    What each method gets: the mixture's exact velocity as teacher and its exact
    map as `aux`; an EMA over the last `steps / 50` steps if it reads one; its
    curricula compressed to settle by half the run (a 10k-step warm-up takes
    `steps / 2` here), so a short run trains the method itself rather than its
    first phase.

    The bars are loose on purpose: a correct method need not match flow matching
    after a short run, but one that trains to garbage does not come near it. The
    measured figures for every registry method and for deliberately wrong specs,
    with their times, are in `benchmarks/results/trust.md`.

    **Arguments:**

    - `method`: the [`fmcalc.Method`][].
    - `key`: PRNG key (model initialisation, training, noise).
    - `flow`: the data, an analytic 2-D flow; default
      [`fmcalc.testing.asymmetric_mixture`][]`(broad=True)` (its `aux` map then
      solved at `rtol = 1e-6`: training targets need fewer digits than the end
      points).
    - `steps`, `batch_size`, `learning_rate`: the training budget.
    - `width`, `depth`: the MLP.
    - `n`: how many noise samples the errors average over.
    - `margin`: the worse of the 1- and 2-jump errors must be at most `margin`
      times the data mean's...
    - `multiple`: ...and at most `multiple` times flow matching's.
    - `min_jump_gradient`: the least share of the loss's gradient that must reach
      the map off the diagonal before training
      ([`fmcalc.testing.TrainingResult`][]`.jump_gradient`; the registry's methods
      and the specs that never train jumps, with their values, are in
      `tests/test_training_check.py`).
    - `teacher`, `aux`: override the exact teacher and `aux` map.

    **Returns:** a [`fmcalc.testing.TrainingResult`][]. Flow matching's run is
    cached per process for equal settings, so checking several methods pays for it
    once.
    """
    from .. import methods, train

    checkable(method, "check_training", step=0)
    start = time.perf_counter()
    if flow is None:
        flow = asymmetric_mixture(broad=True)
        # Training targets need far fewer digits than the exact end points.
        aux = (
            asymmetric_mixture(broad=True, rtol=1e-6, atol=1e-6) if aux is None else aux
        )
    dtype = flow.sample(jax.random.key(0), 1).dtype
    dim = flow.sample(jax.random.key(0), 1).shape[-1]
    k_model, k_train, k_noise = jax.random.split(key, 3)
    model = MLP(dim, width=width, depth=depth, skip=True, dtype=dtype, key=k_model)
    budget = dict(
        key=k_train, steps=steps, batch_size=batch_size, learning_rate=learning_rate
    )
    noise = jax.random.normal(k_noise, (n, dim), dtype)
    exact = exact_samples(flow, noise)
    mean = np.mean(np.asarray(flow.sample(jax.random.fold_in(k_noise, 1), 20_000)), 0)
    trivial = paired_error(np.broadcast_to(mean, exact.shape), exact)

    digest = hashlib.sha256(np.asarray(jax.random.key_data(key)).tobytes())
    for leaf in jax.tree.leaves(eqx.filter(flow, eqx.is_array)):
        digest.update(np.asarray(leaf).tobytes())
    cache = f"{digest.hexdigest()}{(steps, batch_size, width, depth, learning_rate)}"
    stopped = (train.NonFiniteError, train.DivergenceError)
    failure = None
    if cache not in _BASELINES:
        try:
            baseline = _train(methods.get("flow-matching"), model, flow, **budget)
        except stopped as error:
            failure = f"flow matching's own run: {str(error).splitlines()[0]}"
            _BASELINES[cache] = (float("nan"), float("nan"), float("nan"))
        else:
            _BASELINES[cache] = (
                paired_error(euler_samples(baseline, noise, steps=128), exact),
                paired_error(jump_samples(baseline, noise, steps=1), exact),
                paired_error(jump_samples(baseline, noise, steps=2), exact),
            )
    flow_matching, *velocity_only = _BASELINES[cache]

    one = two = float("nan")
    nets = dict(
        teacher=flow.velocity if teacher is None else teacher,
        aux=flow if aux is None else aux,
    )
    reach = float("nan")
    if method.rule != "diagonal":
        x0 = flow.sample(jax.random.fold_in(k_noise, 2), batch_size)
        reach = jump_gradient(
            method.for_run(steps), model, x0, key=jax.random.fold_in(k_noise, 3),
            **nets,
        )  # fmt: skip
    try:
        trained = _train(method.for_run(steps), model, flow, **budget, **nets)
    except stopped as error:
        failure = failure or str(error).splitlines()[0]
    else:
        if method.rule == "diagonal":  # a velocity, not a map: sample it as one
            one = two = paired_error(euler_samples(trained, noise, steps=128), exact)
        else:
            one = paired_error(jump_samples(trained, noise, steps=1), exact)
            if not _one_jump_only(method):
                two = paired_error(jump_samples(trained, noise, steps=2), exact)
    worst = _worst(one, two) if failure is None else float("nan")
    passed = bool(
        failure is None
        and worst <= margin * trivial
        and worst <= multiple * flow_matching
        and not reach < min_jump_gradient
    )
    return TrainingResult(
        method.name,
        steps,
        one,
        two,
        flow_matching,
        trivial,
        margin,
        multiple,
        failure,
        time.perf_counter() - start,
        passed,
        (velocity_only[0], velocity_only[1]),
        reach,
        min_jump_gradient,
    )
