"""Continuous-time and easy consistency models: consistency training (`t = 0`)
written with the same primitives as the taxonomy's methods."""

from .._derivative import JVP, AbstractDerivative
from .._expr import ConditionalVelocity, D, Normalize, Param, sg
from .._losses import AbstractLoss, PseudoHuber, SquaredError, TimeWeighted
from .._method import Method, Term
from .._schedules import AbstractSchedule, Exponential, LinearWarmup
from .._times import AbstractTimeSampler, FixedTarget, LogitNormal
from ._common import F, V, compared_by_formula, s, t, x
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
        "Its learned weight is off by default (`loss=fmcalc.LogVariance("
        "source='model')` with a `fmcalc.nn.WithLogVariance` network, or "
        "`LogVariance()` with `w(s, t)` as `aux`).",
        "No code from the authors is public. The implementation read (not the "
        "authors') normalises the TrigFlow tangent, so its c acts as c/((1 - s)ρ_s) "
        "in fmcalc's units and its update vanishes near pure noise; its residual "
        "is in F units (a time factor); during the warm-up its r multiplies a "
        "different part of the tangent (equal once r = 1); and it averages over "
        "dimensions (`loss=SquaredError(reduction='mean')`), learns a log-variance "
        "weight, and by default adds a prior weight (1 - s)/s. Hand-built "
        "residuals with `Normalize` and a time factor give each of these.",
    ),
    compared_with=compared_by_formula(
        "NVlabs/FastGen at 34f30e8 (fastgen/methods/consistency_model/sCM.py "
        "`SCMModel._compute_scm_loss`), not the authors' (they published none), "
        "without its own additions (a prior weight and √dim scalings)",
        "tests/test_authors_formulas.py",
        "not the registry's spec but one that test builds from fmcalc's "
        "primitives (TrigFlow's units, its normalisation and warm-up, the mean "
        "over dimensions and a learned log-variance), during the warm-up and after",
    ),
    read_code="revsic/flowmodels at bae2246 (sct.py), not the authors'",
)
def sct(
    *,
    derivative: AbstractDerivative = JVP(),
    c: float | None = 0.1,
    warmup: AbstractSchedule = LinearWarmup(0.0, 1.0, 10_000),
    times: AbstractTimeSampler = FixedTarget(LogitNormal(-1.0, 1.4)),
    loss: AbstractLoss = SquaredError(),
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
    term = Term("consistency", residual, times, loss, biased=biased)
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
        "Their code's step is a fraction of σ, not of s, and is clamped at the "
        "data, so early stages target x0 itself at most noise levels (a "
        "hand-built residual with `TimeFunction` and `Clip` gives it); it weighs "
        "by 1/(σ - σ_u) = (1 - s)(1 - u)/(s - u), where fmcalc weighs by 1/s "
        "(`TimeWeighted(loss, w)` with the stage's w); its pseudo-Huber constant "
        "is 0, the plain norm, which `PseudoHuber` refuses (c = 1e-12 agrees to "
        "about 1e-12); and it shares dropout masks between the prediction and "
        "the target (fmcalc's networks have none).",
    ),
    compared_with=compared_by_formula(
        "locuslab/ect at 4311059 (training/loss.py `ECMLoss`, training/networks.py "
        "`ECMPrecond`, run_ecm.sh)",
        "tests/test_authors_formulas.py",
        "not the registry's spec but one that test builds from fmcalc's "
        "primitives at a fixed stage (their step in σ, its clamp at the data, "
        "their weight, pseudo-Huber with c = 0.03)",
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
    over training. Their weight `1/(σ - σ_u)`, in σ units, is
    `(1 - s)(1 - u)/(s - u)` in ours; the default weighs by `1/s`, which is its
    `1/(r s)` at a fixed ratio in s, with pseudo-Huber. EDM's `log σ ~ N(-1.1, 2.0)` is
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
