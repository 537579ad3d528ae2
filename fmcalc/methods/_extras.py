"""Continuous-time and easy consistency models: consistency training (`t = 0`)
written with the same primitives as the taxonomy's methods."""

from .._derivative import JVP, AbstractDerivative
from .._expr import ConditionalVelocity, D, Normalize, Param, sg
from .._losses import AbstractLoss, PseudoHuber, TimeWeighted
from .._method import Method, Term
from .._schedules import AbstractSchedule, Exponential, LinearWarmup
from .._times import AbstractTimeSampler, FixedTarget, LogitNormal
from ._common import F, V, s, t, x
from ._registry import register


@register(
    "sct",
    full_name="Continuous-time consistency training (sCT)",
    citation='Lu, Song, "Simplifying, Stabilizing and Scaling Continuous-Time '
    'Consistency Models", ICLR 2025',
    summary="Train from scratch a map to data: MeanFlow's tangent at t = 0, "
    "normalised and warmed up (sCM's tangent loss).",
    deviations=(
        "The network predicts V in fmcalc's linear interpolant, not TrigFlow's "
        "parameterisation.",
        "Its learned weight is off by default (`loss=fmcalc.LogVariance()` with "
        "`w(s, t)` as `aux`).",
    ),
)
def sct(
    *,
    derivative: AbstractDerivative = JVP(),
    c: float | None = 0.1,
    warmup: AbstractSchedule = LinearWarmup(0.0, 1.0, 10_000),
    times: AbstractTimeSampler = FixedTarget(LogitNormal(-1.0, 1.4)),
) -> Method:
    """Continuous-time consistency training (sCT; Lu & Song 2025), to data (`t = 0`):

    `g = V(x, s, t) - v - r (t - s) D[V](x, s, t)·(v, 1, 0)`, `v = eps - x0`,
    `R = V(x, s, t) - sg[V(x, s, t) - g / (‖g‖ + c)]`.

    The tangent `g` is MeanFlow's residual at `t = 0`; `r` is the tangent warm-up
    (0 -> 1). TrigFlow's `x_τ = cos τ x0 + sin τ z` is our `x_s` (up to scale) at
    `s = tan τ / (1 + tan τ)`, so sCT's `log(σ_d tan τ) ~ N(-1.0, 1.4)` (CIFAR-10)
    is `LogitNormal(-1.0, 1.4)` for data of unit scale. The normalisation is
    not linear in `eps - x0`, so the exact map is a fixed point only where `g`'s
    conditional law is symmetric; `c=None` drops it (then this is MeanFlow at
    `t = 0`, unbiased).
    """
    v = ConditionalVelocity()(x, s)
    dV = D(V, at=(x, s, t), along=(v, 1, 0), by=derivative)
    g = V(x, s, t) - v - Param("r") * (t - s) * dV
    step = g if c is None else Normalize(g, c)
    residual = V(x, s, t) - sg(V(x, s, t) - step)
    biased = None if c is None else "tangent normalisation g / (‖g‖ + c)"
    term = Term("consistency", residual, times, biased=biased)
    return Method(
        "sct", "eulerian", "self-distillation", "V", (term,), schedules={"r": warmup}
    )


def _inverse_source(s, t):
    del t
    return 1 / s


@register(
    "ect",
    full_name="Easy consistency tuning (ECT)",
    citation='Geng, Pokle, Luo, Lin, Kolter, "Consistency Models Made Easy", ICLR 2025',
    summary="Train from scratch a map to data: consistency between s and (1 - r) s "
    "on the same noise, the online network as target, r shrinking over training.",
    deviations=(
        "r follows a schedule (default a geometric decay); ECT halves r every stage "
        "and multiplies it by n(σ) = 1 + 8 sigmoid(-σ).",
    ),
)
def ect(
    *,
    ratio: AbstractSchedule = Exponential(0.1, 0.002, 100_000),
    times: AbstractTimeSampler = FixedTarget(LogitNormal(-1.1, 2.0)),
    loss: AbstractLoss = TimeWeighted(PseudoHuber(), _inverse_source),
) -> Method:
    """Easy consistency tuning (ECT; Geng et al. 2025), to data (`t = 0`):

    `R = F(x, s, t) - sg[F(x - r s (eps - x0), s - r s, t)]`,

    consistency training between `s` and `u = (1 - r) s` on the same noise, with
    the online network under stop-gradient as the target (no EMA) and `r` shrinking
    over training. Their weight `1/(t - r)` is `1/(r s)`: within a stage `∝ 1/s`, the
    default pseudo-Huber weighting. EDM's `log σ ~ N(-1.1, 2.0)` is
    `LogitNormal(-1.1, 2.0)` in our time (`s = σ / (1 + σ)`).
    """
    r = Param("ratio")
    v = ConditionalVelocity()(x, s)
    residual = F(x, s, t) - sg(F(x - r * s * v, s - r * s, t))
    biased = "finite Δs: the target is evaluated at x - r s (eps - x0)"
    term = Term("consistency", residual, times, loss, biased=biased)
    return Method(
        "ect", "eulerian", "self-distillation", "F", (term,), schedules={"ratio": ratio}
    )
