"""Guidance folded into a residual's velocity: classifier-free guidance of a teacher
or of the model itself, MeanFlow's (ω, κ) form, and autoguidance."""

from typing import ClassVar

import equinox as eqx

from ._expr import (
    AbstractExpr,
    AbstractVelocity,
    ConditionalVelocity,
    Diagonal,
    HasLabel,
    Indicator,
    Network,
    Param,
    S,
    Teacher,
    X,
    _wrap,
    sg,
)


def _scale(value: float | str) -> AbstractExpr:
    return Param(value) if isinstance(value, str) else _wrap(value)


def _combination(pairs: list[tuple[float, AbstractExpr]]) -> AbstractExpr | None:
    """`Σ c e` over the pairs, printed readably: zero coefficients dropped, unit
    ones left implicit, negative ones subtracted."""
    total = None
    for c, e in pairs:
        if c == 0:
            continue
        term = e if abs(c) == 1 else abs(c) * e
        if total is None:
            total = term if c > 0 else -term
        else:
            total = total + term if c > 0 else total - term
    return total


def _unconditional(source: AbstractVelocity) -> AbstractVelocity:
    if isinstance(source, Teacher):
        return source.without_condition()
    if isinstance(source, Diagonal):
        return Diagonal(source.network.without_condition())
    raise TypeError(
        "Classifier-free guidance needs a conditional velocity with an unconditional "
        f"counterpart: a Teacher or a Diagonal network; got {type(source).__name__}."
    )


class Guided(AbstractVelocity):
    """Classifier-free guidance of a velocity source (Ho & Salimans 2022):

    `v_w(x, t) = v(x, t | ∅) + w_t (v(x, t | y) - v(x, t | ∅))`, with
    `w_t = w` for `t` in `[low, high]` and `1` outside (guidance interval,
    Kynkäänniemi et al. 2024).

    Rows whose label was dropped (`cond < 0`) get `v(x, t | ∅)`, since then both
    calls are unconditional. Folding the guided teacher into a distillation target
    trains a model that imitates the guided sampler (the usual practice; see
    Dieleman 2026, "Guidance").

    **Arguments:**

    - `source`: a [`fmcalc.Teacher`][] or the model's own [`fmcalc.Diagonal`][]
      (then wrap the target in a stop-gradient, as the builders do).
    - `scale`: the guidance scale `w`, a number, or the name of a
      [`fmcalc.Param`][] (a scale drawn per batch or fed to the network).
    - `low`, `high`: the guidance interval in time.
    """

    source: AbstractVelocity
    scale: float | str = eqx.field(static=True)
    low: float = eqx.field(static=True, default=0.0)
    high: float = eqx.field(static=True, default=1.0)
    network_cost: ClassVar[int] = 0

    @property
    def name(self) -> str:
        return f"{self.source.name}_w"

    def __call__(self, x, t) -> AbstractExpr:
        conditional = self.source(x, t)
        unconditional = _unconditional(self.source)(x, t)
        if (self.low, self.high) == (0.0, 1.0):
            w = _scale(self.scale)
        else:
            gate = Indicator(_wrap(t), self.low, self.high)
            if isinstance(self.scale, str):
                excess = Param(self.scale) - 1
            else:
                excess = _wrap(self.scale - 1)
            w = 1 + (gate if self.scale == 2 else gate * excess)
        return unconditional + w * (conditional - unconditional)


class MeanFlowGuidance(AbstractVelocity):
    """MeanFlow's guided conditional velocity (Geng et al. 2025, their eq. for
    `ṽ_t`), usable only at `(x_s, s)`:

    `v_g = v_c + [y ≠ ∅] [low <= s <= high] ((ω - 1) v_c + κ sg V(x, s, s | y)
    + (1 - ω - κ) sg V(x, s, s | ∅))`,

    i.e. `ω v_c + κ V(·|y) + (1 - ω - κ) V(·|∅)` on labelled rows inside the
    interval and the plain `v_c = eps - x0` elsewhere (dropped labels included, as
    in the official code). It is affine in `v_c`, so MeanFlow stays
    marginal-from-conditional. The model's fixed point is the guided velocity with
    effective scale `ω / (1 - κ)`.

    **Arguments:**

    - `omega`, `kappa`: MeanFlow's `ω` and `κ` (B/4 defaults 1.0 and 0.5).
    - `low`, `high`: the interval of `s` where guidance applies.
    - `network`: the network whose diagonal is used (default online).
    """

    omega: float = eqx.field(static=True)
    kappa: float = eqx.field(static=True, default=0.0)
    low: float = eqx.field(static=True, default=0.0)
    high: float = eqx.field(static=True, default=1.0)
    network: Network = Network()
    network_cost: ClassVar[int] = 0

    @property
    def name(self) -> str:
        return "v_g"

    def __call__(self, x, t) -> AbstractExpr:
        v_c = ConditionalVelocity()(x, t)
        conditional = sg(self.network(X, S, S))
        unconditional = sg(self.network.without_condition()(X, S, S))
        correction = _combination(
            [
                (self.omega - 1, v_c),
                (self.kappa, conditional),
                (1 - self.omega - self.kappa, unconditional),
            ]
        )
        if correction is None:  # ω = 1, κ = 0: no guidance
            return v_c
        gate = HasLabel()
        if (self.low, self.high) != (0.0, 1.0):
            gate = gate * Indicator(S, self.low, self.high)
        return v_c + gate * correction


class Autoguided(AbstractVelocity):
    """Autoguidance (Karras et al. 2024): a teacher guided by a weaker version of
    itself, `v = v_weak + w (v_strong - v_weak)`, as AYF uses it.

    **Arguments:**

    - `weak`: the weaker velocity, e.g. `Diagonal(Network("aux"))` for a weak model
      passed as `aux=`.
    - `scale`: the guidance scale `w`, a number or a [`fmcalc.Param`][] name.
    - `strong`: the strong velocity (default the teacher).
    """

    weak: AbstractVelocity
    scale: float | str = eqx.field(static=True)
    strong: AbstractVelocity = Teacher()
    network_cost: ClassVar[int] = 0

    @property
    def name(self) -> str:
        return "v_auto"

    def __call__(self, x, t) -> AbstractExpr:
        weak = self.weak(x, t)
        return weak + _scale(self.scale) * (self.strong(x, t) - weak)
