"""Per-example losses: a distance on the residual and its weighting.

A loss acts on one example's residual `R = prediction - target` and returns a scalar;
batch it with `jax.vmap` and reduce by a mean. Each loss declares
`depends_on_residual`: whether its per-example weight depends on the residual. Such
a weight changes *what* a marginal-from-conditional loss learns (a robust location
of the conditional velocity instead of its mean; see [`fmcalc.Adaptive`][]); a
weight of the times alone does not.
"""

import abc
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ._convert import _as_float, _check_positive, _check_real
from ._custom_types import Time


def _check_loss(owner: str, value) -> None:
    if not isinstance(value, AbstractLoss):
        raise TypeError(
            f"`{owner}` takes losses such as `fmcalc.SquaredError()`; got {value!r}."
        )


Reduction = Literal["sum", "mean"]


def _check_reduction(owner: str, reduction) -> None:
    if reduction not in ("sum", "mean"):
        raise ValueError(
            f"`{owner}(reduction=...)` must be 'sum' (over dimensions, the default) "
            f"or 'mean' (the sum divided by the dimension); got {reduction!r}."
        )


def _squared_norm(x: Array, reduction: Reduction = "sum") -> Array:
    total = jnp.sum(x**2)
    return total / x.size if reduction == "mean" else total


def _norm(reduction: Reduction) -> str:
    """`‖R‖²` as the formulas print it under `reduction`."""
    return "‖R‖²" if reduction == "sum" else "‖R‖²/dim"


def _per_dim(reduction: Reduction) -> str:
    return "" if reduction == "sum" else "/dim"


def _safe_norm(x: Array) -> Array:
    """`‖x‖` with a zero (not NaN) gradient at `x = 0`."""
    squared = jnp.sum(x**2)
    positive = squared > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


class AbstractLoss(eqx.Module):
    """A per-example loss `ℓ(R; prediction, s, t)` of a residual `R`.

    Called as `loss(residual, prediction=..., s=..., t=..., aux=None)` on one example
    (batch with `jax.vmap`); returns a scalar. `residual = prediction - target`, so
    `target = prediction - residual`; most losses read only the residual.

    `depends_on_residual` says whether the per-example weight depends on the
    residual. If it does, marginal-from-conditional learning (a target built from
    the conditional velocity `eps - x0`) no longer converges to the conditional
    *mean* (the marginal velocity) but to a robust location of the conditional law:
    see [`fmcalc.Adaptive`][] for the size of the shift. With an exact teacher the
    residual vanishes per example and no weighting moves the fixed point.
    """

    @property
    @abc.abstractmethod
    def depends_on_residual(self) -> bool:
        """Whether the per-example weight depends on the residual."""

    @property
    def formula(self) -> str:
        """The loss as a formula of the residual `R` (and the prediction `P`), for
        printing a method."""
        return f"{type(self).__name__}(R)"

    @property
    def gradient_weight(self) -> str | None:
        """The weight `w` in the loss's gradient, `∇θ ℓ = w · R · ∂θ R`, as a formula;
        `None` if the gradient is not of that form."""
        return None

    def __str__(self) -> str:
        return self.formula

    @abc.abstractmethod
    def __call__(
        self,
        residual: Float[Array, " dim"],
        *,
        prediction: Float[Array, " dim"],
        s: Time,
        t: Time,
        aux: Callable | None = None,
    ) -> Float[Array, ""]:
        """The loss of one example."""


class SquaredError(AbstractLoss):
    """The squared norm `‖R‖² = Σ_i R_i²`, summed over dimensions.

    The sum (not the mean) over dimensions follows MeanFlow's code (Geng et al.
    2025); it sets the scale at which the constants of [`fmcalc.Adaptive`][] and
    [`fmcalc.PseudoHuber`][] act. Its minimiser in expectation is the conditional
    mean, so marginal-from-conditional learning is unbiased.

    **Arguments:**

    - `reduction`: `"sum"` over dimensions (default) or `"mean"`, `‖R‖²/dim`, as
      code that averages over every element of the residual computes it. The mean
      divides the loss and its gradient by `dim`, so a learning rate tuned for one
      does not carry over to the other (Adam's updates are unchanged by it, up to
      its `eps`).
    """

    reduction: Reduction = eqx.field(static=True, default="sum")

    def __check_init__(self):
        _check_reduction("SquaredError", self.reduction)

    @property
    def depends_on_residual(self) -> bool:
        return False

    @property
    def formula(self) -> str:
        return _norm(self.reduction)

    @property
    def gradient_weight(self) -> str | None:
        return "2" + _per_dim(self.reduction)

    def __call__(
        self,
        residual: Float[Array, " dim"],
        *,
        prediction: Float[Array, " dim"],
        s: Time,
        t: Time,
        aux: Callable | None = None,
    ) -> Float[Array, ""]:
        return _squared_norm(residual, self.reduction)


class PseudoHuber(AbstractLoss):
    """The pseudo-Huber distance `√(‖R‖² + c²) - c` of iCT (Song & Dhariwal 2024).

    Quadratic (`‖R‖²/(2c)`) for `‖R‖ ≪ c`, linear (`‖R‖`) for `‖R‖ ≫ c`. The
    default `c = 0.00054 √dim` is the paper's (with pixel values in `[-1, 1]`).

    The norm is of the **whole sample**, as in the paper: one `√` per example. Some
    ports (e.g. Kinyugo/consistency_models) apply it per element and sum, which is a
    different, per-coordinate robust loss.

    Its gradient is `R / √(‖R‖² + c²)`, half that of
    `Adaptive(p=0.5, c=c²)`: a per-example weight `1/(2√(‖R‖² + c²))` on
    `‖R‖²` that depends on the residual, so `depends_on_residual = True`. It moves
    the fixed point of marginal-from-conditional learning towards the conditional
    median (see [`fmcalc.Adaptive`][]).

    **Arguments:**

    - `c`: the transition scale, positive; `None` (default) for `0.00054 √dim`.
    - `reduction`: `"sum"` (default) for `‖R‖²` summed over dimensions, `"mean"`
      for `‖R‖²/dim` in its place (`c` unchanged).
    """

    c: float | None = eqx.field(static=True, default=None, converter=_as_float)
    reduction: Reduction = eqx.field(static=True, default="sum")

    @property
    def depends_on_residual(self) -> bool:
        return True

    def __check_init__(self):
        if self.c is not None:
            _check_positive("PseudoHuber", "c", self.c)
        _check_reduction("PseudoHuber", self.reduction)

    @property
    def formula(self) -> str:
        c = "0.00054√dim" if self.c is None else f"{self.c:g}"
        return f"√({_norm(self.reduction)} + c²) - c, c = {c}"

    @property
    def gradient_weight(self) -> str | None:
        return f"1{_per_dim(self.reduction)}/√({_norm(self.reduction)} + c²)"

    def __call__(
        self,
        residual: Float[Array, " dim"],
        *,
        prediction: Float[Array, " dim"],
        s: Time,
        t: Time,
        aux: Callable | None = None,
    ) -> Float[Array, ""]:
        c = 0.00054 * residual.shape[0] ** 0.5 if self.c is None else self.c
        return jnp.sqrt(_squared_norm(residual, self.reduction) + c**2) - c


class Adaptive(AbstractLoss):
    """MeanFlow's adaptive weighting `‖R‖² / sg((‖R‖² + c)^p)`.

    With `L = ‖R‖²` (summed over dimensions), the value is `L / (L + c)^p` with the
    weight under a stop-gradient, so the gradient is `∇L / (L + c)^p`: that of
    `log(L + c)` for `p = 1` and of `(L + c)^{1-p} / (1 - p)` otherwise. `p = 0` is
    plain squared error. Settings of Geng et al. (2025): ImageNet `c = 0.01, p = 1`;
    CIFAR-10 `c = 1e-3, p = 0.75`. FACM's consistency term uses `p = 0.5`; AlphaFlow
    uses `p = 1` with the mean over dimensions (`reduction="mean"`), and iMF `p = 1`,
    `c = 0.01` with the sum.

    **This weighting moves the fixed point of marginal-from-conditional learning.**
    With a target built from the conditional velocity `eps - x0`, plain squared
    error converges to its conditional mean given `x_s`, the marginal velocity. A
    weight that depends on the residual instead makes the loss estimate a *robust
    location* of the conditional velocity (a mode-seeking one for `p = 1`, near the
    median for `p = 0.5`). The two coincide only when the conditional law is
    symmetric (e.g. Gaussian data) and differ otherwise. On one-dimensional data on
    two points `±1` with equal weights, at `s = 0.5`, `x_s = 0.3` (posterior
    0.77 / 0.23, conditional velocities −1.4 / 2.6), the conditional velocity's mean
    is −0.47, but the fixed point of `p = 1` is −1.40 (`c = 1e-3` or `1e-2`) and of
    `p = 0.5` −1.39: the dominant point's velocity, not the mean. (For `p = 1`,
    `E log(L + c)` is not convex: a second, worse stable point sits near the other
    point's velocity, +2.6.) [`fmcalc.SquaredError`][] and time-only weights
    ([`fmcalc.TimeWeighted`][], [`fmcalc.LogVariance`][]) leave the fixed point at
    the mean.

    **Arguments:**

    - `p`: the exponent, `≥ 0` (default 1).
    - `c`: the constant, positive (default 1e-3).
    - `reduction`: `"sum"` (default) for `L = ‖R‖²` summed over dimensions,
      `"mean"` for `L = ‖R‖²/dim` (the convention of code that averages over
      elements, where `c` is on the scale of one element's squared error).
    """

    p: float = eqx.field(static=True, default=1.0, converter=_as_float)
    c: float = eqx.field(static=True, default=1e-3, converter=_as_float)
    reduction: Reduction = eqx.field(static=True, default="sum")

    @property
    def depends_on_residual(self) -> bool:
        return True

    def __check_init__(self):
        if not 0 <= _check_real("Adaptive", "p", self.p):
            raise ValueError(f"`Adaptive(p=...)` must be ≥ 0; got {self.p!r}.")
        _check_positive("Adaptive", "c", self.c)
        _check_reduction("Adaptive", self.reduction)

    @property
    def formula(self) -> str:
        norm = _norm(self.reduction)
        return f"{norm} / sg[({norm} + {self.c:g})^{self.p:g}]"

    @property
    def gradient_weight(self) -> str | None:
        norm = _norm(self.reduction)
        return f"2{_per_dim(self.reduction)}/sg[({norm} + {self.c:g})^{self.p:g}]"

    def __call__(
        self,
        residual: Float[Array, " dim"],
        *,
        prediction: Float[Array, " dim"],
        s: Time,
        t: Time,
        aux: Callable | None = None,
    ) -> Float[Array, ""]:
        squared = _squared_norm(residual, self.reduction)
        weight = jax.lax.stop_gradient((squared + self.c) ** self.p)
        return squared / weight


class LogVariance(AbstractLoss):
    """Learned log-variance (uncertainty) weighting `e^{-w} ‖R‖² + w`,
    `w = aux(s, t)`.

    `aux` is a learned scalar function of the times, e.g. a small network; it is
    trained jointly with the model. For fixed times the optimum is
    `w = log E[‖R‖² | s, t]`, so the weight `e^{-w}` normalises each time's loss to
    about 1 (EDM2, Karras et al. 2024; Boffi et al. 2025's self-distillation;
    FastGen's sCM, which divides `‖R‖²` by `dim`). Because `w` depends only on the
    times, it does not move the fixed point of marginal-from-conditional learning
    (`depends_on_residual = False`).

    **Arguments:**

    - `reduction`: `"sum"` (default) for `‖R‖²` summed over dimensions, `"mean"`
      for `‖R‖²/dim` in its place.
    - `source`: where `w` comes from. `"aux"` (default): the function passed as
      `aux=` when calling, which `fit` holds fixed (its `aux=` network).
      `"model"`: the trained model's own `log_variance(s, t)`, learned with it: wrap
      the network in [`fmcalc.nn.WithLogVariance`][] (a
      [`fmcalc.nn.LogVarianceMLP`][] for `w`).
    """

    reduction: Reduction = eqx.field(static=True, default="sum")
    source: Literal["aux", "model"] = eqx.field(static=True, default="aux")

    def __check_init__(self):
        _check_reduction("LogVariance", self.reduction)
        if self.source not in ("aux", "model"):
            raise ValueError(
                f"`LogVariance(source=...)` must be 'aux' or 'model'; got "
                f"{self.source!r}."
            )

    @property
    def depends_on_residual(self) -> bool:
        return False

    @property
    def formula(self) -> str:
        return f"e^(-w(s, t)) {_norm(self.reduction)} + w(s, t)"

    @property
    def gradient_weight(self) -> str | None:
        return f"2 e^(-w(s, t)){_per_dim(self.reduction)}"

    def __call__(
        self,
        residual: Float[Array, " dim"],
        *,
        prediction: Float[Array, " dim"],
        s: Time,
        t: Time,
        aux: Callable | None = None,
    ) -> Float[Array, ""]:
        if aux is None:
            raise ValueError(
                "`LogVariance` needs the learned log-variance `aux(s, t) -> scalar`; "
                "got aux=None. Pass `aux=` when calling the loss, or use "
                "`LogVariance(source='model')` with a model wrapped in "
                "`fmcalc.nn.WithLogVariance`."
            )
        w = aux(s, t)
        if jnp.shape(w) != ():
            raise ValueError(
                f"`LogVariance`: `aux(s, t)` must return a scalar; got shape "
                f"{jnp.shape(w)}."
            )
        return jnp.exp(-w) * _squared_norm(residual, self.reduction) + w


class Cosine(AbstractLoss):
    """The cosine distance `1 - ⟨P, T⟩ / (‖P‖ ‖T‖ + tiny)` of prediction `P` and
    target `T = P - R`.

    FACM's auxiliary flow-matching term (Peng et al. 2025), there taken along the
    channels and averaged; here over the whole vector. Zero vectors give a distance
    of 1 and a finite gradient. It is scale-invariant and its minimiser in
    expectation is not the conditional mean (it is the direction of
    `E[T/‖T‖]`), so it is tagged `depends_on_residual = True`; use it beside a
    squared error, as FACM does: `Sum(SquaredError(), Cosine())`.

    **Arguments:** none.
    """

    @property
    def depends_on_residual(self) -> bool:
        return True

    @property
    def formula(self) -> str:
        return "1 - ⟨P, P - R⟩ / (‖P‖ ‖P - R‖)"

    def __call__(
        self,
        residual: Float[Array, " dim"],
        *,
        prediction: Float[Array, " dim"],
        s: Time,
        t: Time,
        aux: Callable | None = None,
    ) -> Float[Array, ""]:
        target = prediction - residual
        tiny = jnp.finfo(jnp.result_type(prediction, residual)).tiny
        scale = _safe_norm(prediction) * _safe_norm(target) + tiny
        return 1 - jnp.dot(prediction, target) / scale


class TimeWeighted(AbstractLoss):
    """A loss times a weight of the times alone: `weight(s, t) · loss(R)`.

    A time-only weight rescales each time's contribution but not which `V` a time's
    loss is minimised by, so it does not move the fixed point of
    marginal-from-conditional learning; `depends_on_residual` is that of `loss`.
    Examples: FACM's consistency weight `cos(π(1 - s)/2)` (FACM's `cos(τπ/2)` with
    `τ = 1 - s`), iCT's `1/(σ_{i+1} - σ_i)`.

    **Arguments:**

    - `loss`: the loss to weight.
    - `weight`: a function `(s, t) -> scalar`, non-negative.
    """

    loss: AbstractLoss
    weight: Callable

    def __check_init__(self):
        _check_loss("TimeWeighted", self.loss)
        if not callable(self.weight):
            raise TypeError(
                f"`TimeWeighted(weight=...)` must be a function (s, t) -> scalar; "
                f"got {self.weight!r}."
            )

    @property
    def depends_on_residual(self) -> bool:
        return self.loss.depends_on_residual

    @property
    def formula(self) -> str:
        return f"{self._name}(s, t) · [{self.loss.formula}]"

    @property
    def gradient_weight(self) -> str | None:
        inner = self.loss.gradient_weight
        return None if inner is None else f"{self._name}(s, t) · {inner}"

    @property
    def _name(self) -> str:
        name = getattr(self.weight, "__name__", "w").lstrip("_")
        return "w" if name == "<lambda>" else name

    def __call__(
        self,
        residual: Float[Array, " dim"],
        *,
        prediction: Float[Array, " dim"],
        s: Time,
        t: Time,
        aux: Callable | None = None,
    ) -> Float[Array, ""]:
        weight = self.weight(s, t)
        if jnp.shape(weight) != ():
            raise ValueError(
                f"`TimeWeighted`: `weight(s, t)` must return a scalar; got shape "
                f"{jnp.shape(weight)}."
            )
        value = self.loss(residual, prediction=prediction, s=s, t=t, aux=aux)
        return weight * value


class Sum(AbstractLoss):
    """The sum of several losses of the same residual.

    FACM's flow-matching term is `Sum(SquaredError(), Cosine())`.
    `depends_on_residual` is true if it is for any term.

    **Arguments:**

    - `*losses`: one or more losses.
    """

    losses: tuple[AbstractLoss, ...]

    def __init__(self, *losses: AbstractLoss):
        self.losses = losses

    def __check_init__(self):
        if not self.losses:
            raise ValueError("`Sum` needs at least one loss; got none.")
        for loss in self.losses:
            _check_loss("Sum", loss)

    @property
    def depends_on_residual(self) -> bool:
        return any(loss.depends_on_residual for loss in self.losses)

    @property
    def formula(self) -> str:
        return " + ".join(f"[{loss.formula}]" for loss in self.losses)

    @property
    def gradient_weight(self) -> str | None:
        weights = [loss.gradient_weight for loss in self.losses]
        if None in weights:
            return None
        return "(" + " + ".join(weights) + ")"  # pyright: ignore[reportCallIssue,reportArgumentType]

    def __call__(
        self,
        residual: Float[Array, " dim"],
        *,
        prediction: Float[Array, " dim"],
        s: Time,
        t: Time,
        aux: Callable | None = None,
    ) -> Float[Array, ""]:
        values = [
            loss(residual, prediction=prediction, s=s, t=t, aux=aux)
            for loss in self.losses
        ]
        return sum(values[1:], start=values[0])


def with_reduction(loss: AbstractLoss, reduction: Reduction) -> AbstractLoss:
    """`loss` with every squared norm inside it reduced over dimensions by
    `reduction` (`"sum"` or `"mean"`), through `Sum` and `TimeWeighted`; `Cosine`, a
    ratio of norms, is the same under either. A loss with no `reduction` of its own
    raises `TypeError` rather than being left as it was."""
    _check_reduction("with_reduction", reduction)
    if isinstance(loss, Sum):
        return Sum(*(with_reduction(part, reduction) for part in loss.losses))
    if isinstance(loss, TimeWeighted):
        return TimeWeighted(with_reduction(loss.loss, reduction), loss.weight)
    if isinstance(loss, Cosine):
        return loss
    if "reduction" not in {field.name for field in dataclasses.fields(loss)}:
        raise TypeError(
            f"Cannot set reduction={reduction!r} on {loss!r}: it has no `reduction` "
            "field. Give the loss one, or set it on the term's loss by hand."
        )
    return dataclasses.replace(loss, reduction=reduction)  # pyright: ignore[reportCallIssue]


def mask_nonfinite(
    per_example: Float[Array, " n"],
) -> tuple[Float[Array, " n"], Int[Array, ""]]:
    """Replace non-finite per-example losses by 0 and count the finite ones.

    The guard of rCM (NaN rows masked) and TVM (NaN → 0): one diverging example does
    not poison the batch. Average over the kept rows with
    `masked.sum() / jnp.maximum(count, 1)`, or over all rows with `masked.mean()`.

    A masked row gets a zero cotangent, but if the row's own backward pass meets an
    inf or NaN, `0 · NaN` is still NaN in the parameter gradient. Mask the row's
    inputs as well where that can happen (the "double `where`" of JAX's FAQ).

    **Arguments:**

    - `per_example`: the losses of a batch, shape `(n,)`.

    **Returns:** `(masked, count)`: the losses with non-finite entries set to 0, and
    the number of finite entries.
    """
    finite = jnp.isfinite(per_example)
    masked = jnp.where(finite, per_example, jnp.zeros_like(per_example))
    return masked, jnp.sum(finite)


def drop_labels(
    key: PRNGKeyArray,
    labels: Int[Array, " n"],
    probability: float,
    null: int = -1,
    *,
    rows: Literal["independent", "leading"] = "independent",
) -> Int[Array, " n"]:
    """Label dropout for classifier-free guidance: each label becomes `null` with
    probability `probability`, independently (`rows="independent"`, the default).

    `rows="leading"` draws the same binomial count of dropped rows but drops the
    *first* that many rows, as MeanFlow's code does (`cond_drop`, Gsunshine/meanflow
    at d70cb55). With a sampler that puts its `t = s` rows first
    ([`fmcalc.SortedPair`][]), the dropped rows then all lie on the diagonal
    whenever the count is at most the diagonal's, so the unconditional model is
    trained on the diagonal only.

    The default is [`fmcalc.NULL_LABEL`][] (`-1`), the one "no label" value that
    batches, methods and the `fmcalc.nn` models understand (the models map it to
    their unconditional embedding row). Rows that already hold the null label stay
    as they are. MeanFlow, iMF and TVM drop with probability 0.1.

    **Arguments:**

    - `key`: a PRNG key.
    - `labels`: integer labels, shape `(n,)`.
    - `probability`: the dropout probability, in `[0, 1]`.
    - `null`: the label of a dropped row (default `NULL_LABEL`, -1).
    - `rows`: `"independent"` or `"leading"` (above).

    **Returns:** the labels with dropped rows set to `null`.
    """
    if isinstance(probability, bool) or not isinstance(probability, int | float):
        raise TypeError(
            f"`drop_labels(probability=...)` must be a Python float; got "
            f"{probability!r}."
        )
    if not 0 <= probability <= 1:
        raise ValueError(
            f"`drop_labels(probability=...)` must lie in [0, 1]; got {probability!r}."
        )
    if rows not in ("independent", "leading"):
        raise ValueError(
            f"`drop_labels(rows=...)` must be 'independent' or 'leading'; got {rows!r}."
        )
    drop = jax.random.bernoulli(key, probability, labels.shape)
    if rows == "leading":
        drop = jnp.arange(labels.shape[0]) < jnp.sum(drop)
    return jnp.where(drop, jnp.asarray(null, labels.dtype), labels)


def weight_source(loss: AbstractLoss, networks: Mapping[str, Any]) -> Callable | None:
    """What a term's loss receives as `aux=`: the `"aux"` network, or the online
    model's learned log-variance where a [`fmcalc.LogVariance`][] in `loss` says
    `source="model"`."""
    found = jax.tree.leaves(loss, is_leaf=lambda node: isinstance(node, LogVariance))
    sources = {node.source for node in found if isinstance(node, LogVariance)}
    if "model" not in sources:
        return networks["aux"]
    if "aux" in sources:
        raise ValueError(
            f"The loss {loss!r} holds LogVariance weights from both the model and "
            "`aux`; use one source."
        )
    model = networks["online"]
    weight = getattr(model, "log_variance", None)
    if weight is None:
        raise ValueError(
            "`LogVariance(source='model')` reads the model's learned "
            f"`log_variance(s, t)`, and the model ({type(model).__name__}) has none: "
            "wrap it, `fmcalc.nn.WithLogVariance(network, "
            "fmcalc.nn.LogVarianceMLP(key=...))`."
        )
    return weight
