"""Local stability of the exact map under a method's expected update."""

from collections.abc import Callable
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PRNGKeyArray

from .._method import Method
from ..flows._base import AbstractFlow
from ._fixed_point import _marginal
from ._flows import KIT_STEPS, asymmetric_mixture
from ._method_checks import checkable
from ._precision import full_precision
from ._unbiased import AffinePerturbation, perturbed


class StabilityResult(NamedTuple):
    """Outcome of [`fmcalc.testing.check_stability`][].

    - `eigenvalues`: the eigenvalues of the Jacobian `J` of the expected update
      `E[∇θ L](θ)` at the exact map, over the directions the method's loss
      constrains, sorted by real part (complex, numpy).
    - `smallest_real`: the smallest real part, relative to the largest modulus: a
      scale-free margin, negative when some direction is pushed away.
    - `neutral`: how many directions of the perturbation family the loss does not
      see at all (e.g. the dependence on `t` of a map trained at `t = 0` only); they
      are left out of `eigenvalues`.
    - `update`: `‖E[∇θ L](0)‖`, the expected update at the exact map (zero up to
      noise at a fixed point).
    - `step`: the training step the method's schedules were evaluated at.
    - `passed`: every eigenvalue has a positive real part (`smallest_real > tol`).
    - `reads_ema`: whether the method reads the EMA network, whose lag behind the
      model this check does not model (see [`fmcalc.testing.check_stability`][]).
    """

    eigenvalues: np.ndarray
    smallest_real: float
    neutral: int
    update: float
    step: int
    passed: bool
    reads_ema: bool = False

    def __str__(self) -> str:
        verdict = "pass" if self.passed else "FAIL: a direction is pushed away"
        if self.passed and self.reads_ema:
            verdict += " (with the EMA equal to the model: its lag is not modelled)"
        values = ", ".join(f"{v.real:.3g}{v.imag:+.2g}j" for v in self.eigenvalues)
        return (
            f"stability at training step {self.step}: smallest real part "
            f"{self.smallest_real:.3g} of the largest |λ| ({len(self.eigenvalues)} "
            f"directions, {self.neutral} neutral), update at the exact map "
            f"{self.update:.2g} -> {verdict}\n  λ = [{values}]"
        )


def _flat(model: AffinePerturbation) -> jax.Array:
    return jnp.concatenate([model.A.ravel(), model.b, model.c, model.e])


def _unflat(model: AffinePerturbation, theta: jax.Array) -> AffinePerturbation:
    dim = model.b.shape[0]
    sizes = np.cumsum([dim * dim, dim, dim])
    A, b, c, e = jnp.split(theta, sizes)
    return eqx.tree_at(
        lambda m: (m.A, m.b, m.c, m.e), model, (A.reshape(dim, dim), b, c, e)
    )


@full_precision
def check_stability(
    method: Method,
    flow: AbstractFlow | None = None,
    *,
    key: PRNGKeyArray,
    n: int = 256,
    teacher: Callable | None = None,
    aux: Callable | None = None,
    step: int | None = None,
    delta: float | None = None,
    tol: float = 1e-3,
) -> StabilityResult:
    """Check that the exact map is a *locally attracting* fixed point of `method`'s
    expected gradient descent.

    The model is the affine family `V_θ = V* + A x + b + c s + e t` around the exact
    average velocity `V*` of `flow` ([`fmcalc.testing.perturbed`][]; `θ = 0` is the
    exact map). Gradient descent follows `dθ/dτ = -G(θ)`, `G(θ) = E[∇θ L(θ)]`; the
    exact map attracts it when every eigenvalue of the Jacobian `J = ∂G/∂θ` at
    `θ = 0` has a positive real part. The fixed-point test cannot see this (at
    `θ = 0` a flipped update is zero too); a wrong sign or a target that runs
    ahead of the model shows here as a negative real part.

    The targets move with `θ` as they do in training: terms under a stop-gradient
    and the EMA network (taken equal to the online one, as at a fixed point) are
    evaluated at the same `θ`. Differentiating through `jax.lax.stop_gradient`
    would instead give the Jacobian of a frozen target; `J` is therefore taken by
    central differences in `θ`, every column on the same batch (common random
    numbers), which leaves only the Monte Carlo error of `n` rows in `J` itself.
    The conditional velocity `eps - x0` is replaced by the exact velocity in every
    term that does not declare a structural bias (`Term(biased=...)`): such a
    term's update is affine in `eps - x0` (what [`fmcalc.validate`][] enforces), so
    its Jacobian is too, and the substitution gives the same expected `J` without
    the noise of `eps - x0`. A residual-dependent weighting (MeanFlow's adaptive
    loss) is then evaluated at the exact residual: the check sees the direction of
    its update, not the sensitivity of its weight, whose expected Jacobian comes
    from the rare examples with `‖R‖² ≲ c` and is beyond a Monte Carlo estimate.
    Directions the loss does not see at all (e.g. `e` for a map trained at `t = 0`
    only) have a zero eigenvalue; they are counted as neutral and left out.

    **What it cannot see: the EMA's lag.** The EMA is taken equal to the online
    weights, so `J` is the Jacobian of a method whose targets follow the model at
    once. In training the EMA trails the model; a target built from the EMA alone
    then chases an older model, and the pair (model, EMA) can oscillate or diverge
    where this check passes (a target built wholly from the EMA, inside a
    finite-difference derivative too, has diverged in training after passing it).
    For a method that reads the EMA, a pass here says the exact map attracts when
    the EMA keeps up; [`fmcalc.testing.check_training`][] is the check with a lag.

    Distillation terms use `flow.velocity` as teacher and `flow` as the `aux`
    map, as in [`fmcalc.testing.check_fixed_point`][].

    **Arguments:**

    - `method`: the [`fmcalc.Method`][].
    - `flow`: an analytic flow; default
      [`fmcalc.testing.asymmetric_mixture`][]`(steps=512)`, its map solved in
      [`fmcalc.testing.KIT_STEPS`][] fixed RK4 steps (the differences in `θ` need
      a smooth `G`, not the last digits of the map).
    - `key`: PRNG key (data and batch; fix it for a deterministic check).
    - `n`: the number of data rows.
    - `teacher`, `aux`: the other networks (defaults above).
    - `step`: the training step for the method's curricula; default the end of
      every schedule (`method.settled_step`).
    - `delta`: the step in `θ` of the central differences (default `1e-4` in
      float64, `1e-2` in float32).
    - `tol`: the margin: passed if the smallest real part exceeds `-tol` times the
      largest modulus (room for the Monte Carlo error of `J`).

    **Returns:** a [`fmcalc.testing.StabilityResult`][].
    """
    if flow is None:
        flow = asymmetric_mixture(steps=KIT_STEPS)
    step = checkable(method, "check_stability", step)
    k_data, k_batch = jax.random.split(key)
    x0 = flow.sample(k_data, n)
    dtype = x0.dtype
    if delta is None:
        delta = 1e-4 if dtype == jnp.float64 else 1e-2
    model = perturbed(flow, x0.shape[-1])
    model = jax.tree.map(lambda a: a.astype(dtype) if eqx.is_array(a) else a, model)
    teacher = flow.velocity if teacher is None else teacher
    aux = flow if aux is None else aux
    batch = method.batch(k_batch, x0)
    theta0 = _flat(model)
    # Where a term's update is affine in eps - x0 (every term that does not declare
    # a structural bias), so is its Jacobian: the exact velocity in its place gives
    # the same expected Jacobian without its Monte Carlo noise.
    terms = tuple(t if t.biased else _marginal(t, flow) for t in method.terms)
    method = eqx.tree_at(lambda m: m.terms, method, terms)

    def update(theta):
        current = _unflat(model, theta)

        def loss(online):
            return method.loss(
                online, batch, teacher=teacher, ema=current, aux=aux, step=step
            )[0]

        return _flat(eqx.filter_grad(loss)(current))

    size = theta0.shape[0]
    offsets = delta * jnp.eye(size, dtype=dtype)
    # Every point in one call: one compiled program.
    base = theta0[None, :]
    points = jnp.concatenate([base + offsets, base - offsets, base])
    evaluated = np.asarray(jax.jit(jax.vmap(update))(points), np.float64)
    plus, minus, at_map = evaluated[:size], evaluated[size:-1], evaluated[-1]
    # Column j of J is ∂G/∂θ_j.
    jacobian = ((plus - minus) / (2 * delta)).T

    eigenvalues = np.linalg.eigvals(jacobian)
    largest = float(np.max(np.abs(eigenvalues)))
    # Directions the loss never sees (no gradient reaches them, and moving along
    # them changes nothing it evaluates) have an eigenvalue of zero up to round-off.
    seen = np.abs(eigenvalues) > 1e-8 * largest
    eigenvalues = np.sort_complex(eigenvalues[seen])
    smallest = float(eigenvalues.real.min() / largest) if largest > 0 else float("nan")
    passed = bool(largest > 0 and smallest > -tol)
    return StabilityResult(
        eigenvalues,
        smallest,
        int(size - seen.sum()),
        float(np.linalg.norm(at_map)),
        int(step),
        passed,
        "ema" in method.networks,
    )
