"""Eulerian methods: `∂_s F(x, s, t) + ∇_x F(x, s, t) · v(x, s) = 0`."""

from typing import Literal

import jax.numpy as jnp

from .. import _rules as rules
from .._derivative import JVP, AbstractDerivative, FiniteDifference
from .._expr import (
    AbstractVelocity,
    Clip,
    ConditionalVelocity,
    D,
    Diagonal,
    Normalize,
    Param,
    Teacher,
    TimeFunction,
    sg,
)
from .._guidance import MeanFlowGuidance
from .._losses import (
    AbstractLoss,
    Adaptive,
    Cosine,
    SquaredError,
    Sum,
    TimeWeighted,
)
from .._method import Method, Term
from .._schedules import AbstractSchedule, LinearWarmup
from .._times import (
    AbstractTimeSampler,
    ArctanLogNormal,
    Equal,
    FixedTarget,
    GapFirst,
    KarrasGrid,
    LogitNormal,
    SortedPair,
    Uniform,
    UniformTriangle,
)
from ._common import (
    SELF_DISTILLATION_CODE,
    SELF_DISTILLATION_REFERENCE,
    SELF_DISTILLATION_SOURCE,
    SELF_DISTILLATION_TEST,
    F,
    F_aux,
    F_ema,
    V,
    anchor,
    compared_by_formula,
    s,
    t,
    u,
    x,
)
from ._registry import register


@register(
    "ct",
    full_name="Consistency training",
    citation='Song, Dhariwal, Chen, Sutskever, "Consistency Models", ICML 2023',
    summary="Train from scratch a map to data (t = 0): the map at s must equal the "
    "EMA map at the adjacent, less noisy grid point on the same noise.",
    deviations=(
        "LPIPS is replaced by the squared error; iCT's pseudo-Huber loss is "
        "`loss=fmcalc.PseudoHuber()`.",
    ),
    dieleman_cost=4,
)
def ct(
    *,
    times: AbstractTimeSampler = KarrasGrid(18),
    loss: AbstractLoss = SquaredError(),
) -> Method:
    """Consistency training (Song et al. 2023), a map to data (`t = 0` only):

    `R = F(x, s, 0) - sg[F_ema(x + (u - s)(eps - x0), u, 0)]`,

    `u` the adjacent, less noisy point of the Karras grid (their `σ_n < σ_{n+1}`
    map to our `u < s` by `s = σ / (1 + σ)`); `x + (u - s)(eps - x0)` is exactly
    `x_u` on the same noise. The target uses an EMA network. Biased at finite
    `Δs = s - u`: the conditional velocity moves the point the network is evaluated
    at, so the expected update at the exact map is `O(Δs²)` (relative `O(Δs)`),
    vanishing as `Δs -> 0`. iCT's pseudo-Huber is `loss=fmcalc.PseudoHuber()`.
    """
    v = ConditionalVelocity()(x, s)
    residual = F(x, s, t) - sg(F_ema(x + (u - s) * v, u, t))
    biased = "finite Δs: the target network is evaluated at x + (u - s)(eps - x0)"
    term = Term("consistency", residual, times, loss, biased=biased)
    return Method("ct", "eulerian", "self-distillation", "F", (term,))


@register(
    "cd",
    full_name="Consistency distillation",
    citation='Song, Dhariwal, Chen, Sutskever, "Consistency Models", ICML 2023',
    summary="Distil a teacher into a map to data (t = 0): the target is the EMA map "
    "after one Euler step of the teacher to the adjacent grid point.",
    deviations=(
        "One Euler step of the teacher where the original takes a Heun step (two "
        "teacher calls).",
        "LPIPS is replaced by the squared error.",
    ),
    dieleman_cost=5,
)
def cd(
    *,
    velocity: AbstractVelocity = Teacher(),
    times: AbstractTimeSampler = KarrasGrid(18),
    loss: AbstractLoss = SquaredError(),
) -> Method:
    """Consistency distillation (Song et al. 2023), `t = 0` only:

    `R = F(x, s, 0) - sg[F_ema(x + (u - s) v(x, s), u, 0)]`,

    one Euler step of the teacher from `s` to the adjacent grid point `u` (the
    original uses Heun). At the exact map the residual is the
    Euler step's local error, `O(Δs²)`.
    """
    residual = F(x, s, t) - sg(F_ema(x + (u - s) * velocity(x, s), u, t))
    biased = "finite Δs: the target is one Euler step of the teacher, error O(Δs²)"
    term = Term("consistency", residual, times, loss, biased=biased)
    return Method("cd", "eulerian", "distillation", "F", (term,))


@register(
    "ctm",
    full_name="Consistency trajectory models",
    citation="Kim, Lai, Liao, Murata, Takida, Uesaka, He, Mitsufuji, Ermon, "
    '"Consistency Trajectory Models: Learning Probability Flow ODE Trajectory of '
    'Diffusion", ICLR 2024',
    summary="Distil a teacher's solver into a two-time map, compared in data space "
    "through the EMA map to t = 0.",
    deviations=(
        "The DSM and GAN terms are omitted.",
        "Counts 8 FPE against Dieleman's 7: the gradient also flows back through "
        "the EMA map at the loss point, F_ema(F(x, s, t), t, 0), into its input.",
        "Their code compares the two points with LPIPS (no squared-error option; "
        "no fmcalc counterpart), at σ_min = 0.002 rather than at t = 0; draws the "
        "intermediate point k Karras-grid steps away (k drawn once per step), "
        "where fmcalc moves a fixed fraction 0.1 of the gap; draws times uniformly "
        "over grid indices; and solves with Heun in σ, which `HeunMap` (Heun in "
        "fmcalc's time) matches only to second order. Where the gradient flows, "
        "through the EMA map's input included, agrees.",
    ),
    dieleman_cost=7,
    read_code="sony/ctm at 87cca3b (code/cm/karras_diffusion.py `ctm_losses`, "
    "`get_ctm_estimate`, `get_ctm_target`, `heun_solver`)",
)
def ctm(
    *,
    times: AbstractTimeSampler = UniformTriangle(),
    fraction: float = 0.1,
    loss: AbstractLoss = SquaredError(),
) -> Method:
    """Consistency trajectory models (Kim et al. 2024), compared at `t = 0`:

    `R = F_ema(F(x, s, t), t, 0) - sg[F_ema(F(F_aux(x, s, u), u, t), t, 0)]`,

    with `u = s + r (t - s)` a short teacher solve (`r = fraction`). `F_aux` is the
    teacher's ODE solver as a flow map (pass e.g. a diffrax solve of the teacher, or
    an analytic flow, as `aux=`); the outer network is the EMA (no parameter
    gradient, but gradients flow through its input); the inner target uses the
    online weights under stop-gradient (`ctm_target_inner_type='model_sg'`). The
    online map's gradient reaches the loss directly through `F_ema`'s identity part,
    `F_ema(y, t, 0) = y - t V_ema(y, t, 0)`, preconditioned by `V_ema`'s input
    Jacobian (`fmcalc.explain("ctm")` lists both paths). Their
    `G(x_t, t, s)` with `t > s` is our `F(x_s, s, t)`.
    """
    mid = s + fraction * (t - s)
    target = F_ema(F(F_aux(x, s, mid), mid, t), t, 0)
    residual = F_ema(F(x, s, t), t, 0) - sg(target)
    term = Term("consistency", residual, times, loss)
    return Method("ctm", "eulerian", "distillation", "F", (term,))


@register(
    "emd",
    full_name="Eulerian map distillation",
    citation='Boffi, Albergo, Vanden-Eijnden, "Flow map matching with stochastic '
    'interpolants: A mathematical framework for consistency models", TMLR 2025',
    summary="Distil a teacher: the map must not change as its source moves along the "
    "teacher's flow, with no stop-gradient (a space-time JVP, backpropagated).",
    dieleman_cost=7,
)
def emd(
    *,
    derivative: AbstractDerivative = JVP(),
    velocity: AbstractVelocity = Teacher(),
    times: AbstractTimeSampler = UniformTriangle(),
) -> Method:
    """Eulerian map distillation (Boffi et al. 2024):
    `R = ∂_s F(x, s, t) + ∇_x F(x, s, t) · v(x, s)`, no stop-gradient (a full
    space-time JVP, backpropagated)."""
    residual = rules.eulerian(
        form="F", stop_gradient="none", derivative=derivative, velocity=velocity
    )
    return Method(
        "emd", "eulerian", "distillation", "V", (Term("eulerian", residual, times),)
    )


@register(
    "esd",
    full_name="Eulerian self-distillation",
    citation='Boffi, Albergo, Vanden-Eijnden, "How to build a consistency model: '
    'Learning flow maps via self-distillation", NeurIPS 2025',
    summary="Train from scratch: flow matching anchors the diagonal, and the "
    "Eulerian residual uses that diagonal as the velocity, the spatial JVP under a "
    "stop-gradient.",
    deviations=(
        "Counts 11 FPE against Dieleman's 10: V(x, s, s), the spatial JVP's "
        "tangent, is a forward pass of its own, since the anchor has its own rows "
        "and times.",
        *SELF_DISTILLATION_CODE,
    ),
    dieleman_cost=10,
    compared_with=compared_by_formula(SELF_DISTILLATION_SOURCE, SELF_DISTILLATION_TEST),
    presets={"reference": SELF_DISTILLATION_REFERENCE},
)
def esd(
    *,
    derivative: AbstractDerivative = JVP(),
    times: AbstractTimeSampler = UniformTriangle(),
    split: tuple[float, float] = (0.75, 0.25),
    loss: AbstractLoss = SquaredError(),
    noise_scale: float = 1.0,
) -> Method:
    """Eulerian self-distillation (Boffi et al. 2025), `"full"` stop-gradient:

    `R = ∂_s F(x, s, t) + sg[∇_x F(x, s, t) · V(x, s, s)]` on 25% of the rows, with
    the flow-matching anchor on the rest. The temporal derivative keeps its gradient;
    the advective term is a spatial JVP under stop-gradient (two JVPs at one point
    share the primal). Reported "highly unstable" without heavy engineering.
    """
    residual = rules.eulerian(
        form="F", stop_gradient="spatial", derivative=derivative, velocity=Diagonal()
    )
    terms = (anchor(loss=loss), Term("eulerian", residual, times, loss))
    return Method(
        "esd", "eulerian", "self-distillation", "V", terms, split=split,
        noise_scale=noise_scale,
    )  # fmt: skip


@register(
    "ayf-emd",
    full_name="Align Your Flow, Eulerian form (AYF-EMD)",
    citation='Sabour, Fidler, Kreis, "Align Your Flow: Scaling Continuous-Time Flow '
    'Map Distillation", NeurIPS 2025',
    summary="Distil a teacher with MeanFlow's residual as an sCM-style normalised "
    "tangent, with a tangent warm-up.",
    deviations=(
        "The tangent warm-up reaches r = 1; the unofficial code stops at 0.99, which "
        "keeps a flow-matching pull towards straight maps.",
        "There is no official training code; the times follow the unofficial code.",
        "Both unofficial codes average over dimensions "
        "(`reduction='mean'`) and cap the warm-up at "
        "0.99 (`warmup=LinearWarmup(0.0, 0.99, 1980)`); one of them "
        "(revsic/flowmodels at bae2246) takes the surrogate in F space, which "
        "weighs fmcalc's update by s - t (a hand-built residual); the other "
        "(tec-works/FlowWithMe at 5a5cea5) draws the gap first "
        "(`times=GapFirst(LogitNormal(-0.6, 1.6), Uniform())`) and an autoguidance "
        "scale per row that also conditions the student (no option). "
        "preset='reference' sets FlowWithMe's times, warm-up and mean.",
    ),
    dieleman_cost=6,
    presets={
        "reference": {
            "times": GapFirst(LogitNormal(-0.6, 1.6), Uniform()),
            "warmup": LinearWarmup(0.0, 0.99, 1980),
            "reduction": "mean",
        }
    },
    compared_with=compared_by_formula(
        "tec-works/FlowWithMe at 5a5cea5 (main.py `get_ayf_emd_loss`), not the "
        "authors' (they published none)",
        "tests/test_authors_formulas.py",
        "with `times=GapFirst(LogitNormal(-0.6, 1.6), Uniform())`, "
        "`warmup=LinearWarmup(0.0, 0.99, 1980)`, the mean over dimensions and an "
        "unguided teacher",
    ),
    read_code="revsic/flowmodels at bae2246 (alignyourflow.py), not the authors'",
)
def ayf_emd(
    *,
    derivative: AbstractDerivative = JVP(),
    velocity: AbstractVelocity = Teacher(),
    c: float = 0.1,
    warmup: AbstractSchedule = LinearWarmup(0.0, 1.0, 10_000),
    times: AbstractTimeSampler = SortedPair(LogitNormal(-0.8, 1.0)),
) -> Method:
    """Align Your Flow, Eulerian form (Sabour et al. 2025), the sCM-style tangent
    loss with a teacher:

    `g = V(x, s, t) - v(x, s) - r (t - s) D[V](x, s, t)·(v(x, s), 1, 0)`,
    `R = V(x, s, t) - sg[V(x, s, t) - g / (‖g‖ + c)]`,

    whose update is MeanFlow's with a teacher and a normalised tangent. `r` is the
    tangent warm-up (0 -> 1). The JVP runs under the stop-gradient
    and its primal is the prediction. Autoguidance: `velocity=Autoguided(...)`.
    """
    v = velocity(x, s)
    dV = D(V, at=(x, s, t), along=(v, 1, 0), by=derivative)
    g = V(x, s, t) - v - Param("r") * (t - s) * dV
    residual = V(x, s, t) - sg(V(x, s, t) - Normalize(g, c))
    term = Term("eulerian", residual, times)
    return Method(
        "ayf-emd", "eulerian", "distillation", "V", (term,), schedules={"r": warmup}
    )


@register(
    "soflow",
    full_name="Solution flow models (SoFlow)",
    citation='Luo, Yuan, Liu, "SoFlow: Solution Flow Models for One-Step Generative '
    'Modeling", ICLR 2026',
    summary="Train from scratch: MeanFlow's residual with a finite-difference "
    "derivative along eps - x0, plus a flow-matching anchor on 75% of the rows.",
    deviations=(
        "A fixed finite-difference step h; SoFlow anneals it (from 0.1 to 0.002 of "
        "s - t).",
        "Its adaptive weight is off by default (`loss=fmcalc.Adaptive(...)`).",
        "Their code steps its difference back towards the target time through F, "
        "by a step relative to the gap (annealed, floored at 1e-4) with the "
        "coefficient t - u, where fmcalc steps by h towards noise (an O(h) bias "
        "either way; a hand-built residual gives theirs); weighs both terms "
        "adaptively with the mean over dimensions "
        "(`Adaptive(1.0, 0.01, reduction='mean')`), the consistency term's "
        "gradient halved; clamps the times instead of sorting them, so about 14 % "
        "of consistency rows sit 1e-4 from the diagonal (no sampler); splits by "
        "`int(0.75 n)` rows; and guides with velocity mixing on ImageNet (no "
        "option).",
    ),
    dieleman_cost=7,
    compared_with=compared_by_formula(
        "zlab-princeton/SoFlow at 3b60d60 (models.py `get_velocity_loss`, "
        "`get_consistency_loss`, `get_middle_time`; train.py)",
        "tests/test_authors_formulas.py",
        "not the registry's spec but one that test builds from fmcalc's "
        "primitives (their difference quotient at a fixed step ratio, adaptive "
        "weights with the mean over dimensions, the consistency term at half "
        "weight), on their times; the gradient, as their consistency loss is a "
        "surrogate whose value is not a squared error",
    ),
)
def soflow(
    *,
    derivative: AbstractDerivative = FiniteDifference(1e-3),
    times: AbstractTimeSampler = SortedPair(
        LogitNormal(0.2, 0.8), LogitNormal(-1.0, 0.8)
    ),
    anchor_times: AbstractTimeSampler = Equal(LogitNormal(-0.2, 1.0)),
    split: tuple[float, float] = (0.75, 0.25),
    loss: AbstractLoss = SquaredError(),
) -> Method:
    """Solution flow models (Luo et al. 2026): MeanFlow with a finite-difference
    derivative and a flow-matching anchor on 75% of the rows (ImageNet config):

    `R = V(x, s, t) - sg[v + (t - s) (V(x + h v, s + h, t) - V(x, s, t)) / h]`,
    `v = eps - x0`. SoFlow's `(t, s)` is our `(s, t)`. The difference quotient
    evaluates the network at `x + h (eps - x0)`, so the update is biased at `O(h)`;
    here `h` is fixed.
    """
    v = ConditionalVelocity()(x, s)
    dV = D(V, at=(x, s, t), along=(v, 1, 0), by=derivative)
    residual = V(x, s, t) - sg(v + (t - s) * dV)
    biased = (
        None
        if isinstance(derivative, JVP)
        else "finite difference along eps - x0: O(h), vanishing as h -> 0"
    )
    term = Term("eulerian", residual, times, loss, biased=biased)
    terms = (anchor(anchor_times), term)
    return Method("soflow", "eulerian", "self-distillation", "V", terms, split=split)


@register(
    "facm",
    full_name="Flow-anchored consistency models",
    citation='Peng, Zhu, Liu, Wu, Li, Sun, Wu, "FACM: Flow-Anchored Consistency '
    'Models", arXiv 2025',
    summary="Distil a teacher: a flow-matching anchor (squared error plus cosine) "
    "and a clipped, relaxed MeanFlow-style consistency term to data, on every row.",
    deviations=(
        "Counts 9 FPE against Dieleman's 8: the anchor and the consistency term each "
        "have their own rows and times, so the teacher runs at both points.",
        "Their code averages both terms over dimensions, where fmcalc sums "
        "(`reduction='mean'`, which preset='reference' sets); takes the cosine "
        "per pixel over channels, where fmcalc takes it over the whole vector "
        "(equal for flat data); shares one data row, noise, time and teacher call "
        "between the two terms (the same expected loss; no option); and guides "
        "its teacher, 1.75 up to s = 0.875 (`velocity=Guided(Teacher(), 1.75, "
        "low=0.0, high=0.875)`).",
    ),
    dieleman_cost=8,
    presets={"reference": {"reduction": "mean"}},
    compared_with=compared_by_formula(
        "ali-vilab/FACM at 9be03f7 (losses.py `FACMLoss.__call__`, train.py, "
        "scripts/train.sh)",
        "tests/test_authors_formulas.py",
        "with both losses averaged over dimensions, one shared row per data point "
        "and flat data, an unguided teacher, the clamp idle and active",
    ),
)
def facm(
    *,
    derivative: AbstractDerivative = JVP(),
    velocity: AbstractVelocity = Teacher(),
    times: AbstractTimeSampler = FixedTarget(ArctanLogNormal(-0.8, 1.6)),
) -> Method:
    """Flow-anchored consistency models (Peng et al. 2025), on every row:

    - anchor: `V(x, s, s) - v(x, s)`, squared error plus cosine distance;
    - consistency, to data (`t = 0`), with `g = V(x, s, 0) - [v + (0 - s) D_s V]`:
      `R = V(x, s, 0) - sg[V(x, s, 0) - (1 - √(1 - s)) clip(g, -1, 1)]`,
      weighted by `cos(π (1 - s) / 2)` and adaptively with `p = 0.5`.

    FACM's time `τ = 1 - s` runs from noise (0) to data (1); its FM branch's time
    input `2 - τ` is our diagonal `V(x, s, s)`, its CM branch our `V(x, s, 0)`. The
    JVP's primal is the prediction.
    """
    v = velocity(x, s)
    target = v + (t - s) * D(V, at=(x, s, t), along=(v, 1, 0), by=derivative)
    relax = 1 - TimeFunction("sqrt", 1 - s)
    g = Clip(V(x, s, t) - target, -1.0, 1.0)
    residual = V(x, s, t) - sg(V(x, s, t) - relax * g)
    weight = TimeWeighted(Adaptive(p=0.5, c=1e-3), _facm_weight)
    terms = (
        anchor(
            Equal(ArctanLogNormal(-0.8, 1.6)),
            Sum(SquaredError(), Cosine()),
            velocity=velocity,
        ),
        Term("consistency", residual, times, weight),
    )
    return Method("facm", "eulerian", "distillation", "V", terms)


def _facm_weight(s, t):
    del t
    return jnp.cos(jnp.pi * (1 - s) / 2)


@register(
    "meanflow",
    full_name="MeanFlow",
    citation='Geng, Deng, Bai, Kolter, He, "Mean Flows for One-step Generative '
    'Modeling", NeurIPS 2025',
    summary="Train from scratch, marginal-from-conditional: the Eulerian identity "
    "in average-velocity form, with eps - x0 inside a stop-gradient target.",
    deviations=(
        "The adaptive weight's c = 1e-3 is CIFAR-10's and its p = 1 ImageNet's "
        "(ImageNet: c = 0.01; CIFAR-10: p = 0.75).",
        "Their code (Gsunshine/meanflow at d70cb55) counts the t = s rows as "
        "int(0.75 n), where the default rounds, and drops the labels of a leading "
        "block of rows, all on the diagonal, where the default drops rows "
        "independently; it trains with label dropout 0.1 and guidance ω = 1, "
        "κ = 0.5. preset='reference' sets all of these.",
    ),
    dieleman_cost=4,
    compared_with=compared_by_formula("Gsunshine/meanflow at d70cb55"),
    presets={
        "reference": {
            "times": SortedPair(
                LogitNormal(-0.4, 1.0), equal_fraction=0.75, equal_count="floor"
            ),
            "loss": Adaptive(p=1.0, c=0.01),
            "guidance": MeanFlowGuidance(omega=1.0, kappa=0.5),
            "label_dropout": 0.1,
            "label_dropout_rows": "leading",
        }
    },
)
def meanflow(
    *,
    derivative: AbstractDerivative = JVP(),
    times: AbstractTimeSampler = SortedPair(
        LogitNormal(-0.4, 1.0), equal_fraction=0.75
    ),
    loss: AbstractLoss = Adaptive(p=1.0, c=1e-3),
    guidance: MeanFlowGuidance | None = None,
    label_dropout: float = 0.0,
    label_dropout_rows: Literal["independent", "leading"] = "independent",
) -> Method:
    """MeanFlow (Geng et al. 2025):

    `R = V(x, s, t) - sg[v + (t - s) D[V](x, s, t)·(v, 1, 0)]`, `v = eps - x0`,

    marginal-from-conditional: the target is affine in `v` (a JVP is linear in its
    tangent) and evaluated at `(x_s, s)`, and the stop-gradient keeps the update
    affine. Their `u(z_t, r, t)` with `(t, r)` is our `V(x, s, t)` with `(s, t)`.
    Defaults: both times logit-normal(-0.4, 1), sorted, 75% of rows with `t = s`
    (ImageNet); adaptive weight `1/sg(‖R‖² + c)^p`, `p = 1` (ImageNet `c = 0.01`,
    CIFAR `c = 1e-3, p = 0.75`). The adaptive weight makes the fixed point a robust
    location of `eps - x0 | x_s`, not its mean, on non-Gaussian data (see
    [`fmcalc.Adaptive`][]); `loss=fmcalc.SquaredError()` removes it. CFG folded
    into the target: `guidance=fmcalc.MeanFlowGuidance(omega, kappa)` with
    `label_dropout=0.1`; their code drops a leading block of rows
    (`label_dropout_rows="leading"`, which with the default times drops diagonal
    rows) and counts the diagonal rows with `int`
    (`SortedPair(..., equal_count="floor")`).
    """
    velocity = ConditionalVelocity() if guidance is None else guidance
    residual = rules.meanflow(derivative=derivative, velocity=velocity)
    term = Term("meanflow", residual, times, loss)
    return Method(
        "meanflow", "eulerian", "marginal-from-conditional", "V", (term,),
        label_dropout=label_dropout, label_dropout_rows=label_dropout_rows,
        biased=_robust_shift(loss),
    )  # fmt: skip


def _robust_shift(loss: AbstractLoss) -> str | None:
    """The declaration of MeanFlow's and iMF's residual-dependent weighting."""
    if not loss.depends_on_residual:
        return None
    return (
        f"{loss} weighs each example by its residual: the fixed point is a robust "
        "location of eps - x0 given x_s (the paper's choice; SquaredError() removes it)"
    )


_IMF_CODE = "Lyy-iiis/imeanflow at bf60cd7 (imf.py `iMeanFlow.forward`)"


@register(
    "imf",
    full_name="Improved MeanFlow",
    citation='Geng, Lu, Zu, Shechtman, Kolter, He, "Improved Mean Flows: On the '
    'Challenges of Fastforward Generative Models", arXiv 2025',
    summary="Train from scratch: a compound velocity, V minus a stop-gradient JVP "
    "along the model's own diagonal, trained by flow matching.",
    deviations=(
        "The auxiliary velocity head is the model's own diagonal V(x, s, s). Their "
        f"code ({_IMF_CODE}) trains a separate head for the tangent, with a "
        "flow-matching term of its own on every row; with one head that term is a "
        "second `Term` of flow matching at t = s on the same rows (the test builds "
        "it), and a separately trained head has no option.",
        "The network sees (s, t); iMF's network is not conditioned on s (a model "
        "wrapper `V(x, s, t) = φ(x, s - t)` gives theirs).",
        "Their code always trains with guidance (a scale drawn per row, folded into "
        "the target and the tangent, the network conditioned on it); for one fixed "
        "scale ω the target is `MeanFlowGuidance(omega=1, kappa=1 - 1/ω)`, the "
        "per-row scale has no option. It drops labels in a leading block "
        "(`label_dropout_rows='leading'`) and counts `int(n / 2)` diagonal rows "
        "(`SortedPair(..., equal_count='floor')`; equal for even batches).",
    ),
    dieleman_cost=5,
    compared_with=compared_by_formula(
        _IMF_CODE,
        "tests/test_authors_formulas.py",
        "at its defaults, unguided, with the tangent's head the model's diagonal",
    ),
)
def imf(
    *,
    derivative: AbstractDerivative = JVP(),
    times: AbstractTimeSampler = SortedPair(LogitNormal(-0.4, 1.0), equal_fraction=0.5),
    loss: AbstractLoss = Adaptive(p=1.0, c=0.01),
) -> Method:
    """Improved MeanFlow (Geng et al. 2025b): the compound velocity predictor

    `W = V(x, s, t) - (t - s) sg[D[V](x, s, t)·(V(x, s, s), 1, 0)]`,
    `R = W - (eps - x0)`,

    trained by flow matching; the JVP's tangent is the model's own diagonal, so the
    conditional velocity only enters additively (unbiased even without the
    stop-gradient, which saves the second-order backward). iMF writes
    `V + (s - t) sg(D_s V)` in their `(t, r)`; same sign in ours. Defaults:
    logit-normal(-0.4, 1) sorted, 50% of rows `t = s`, adaptive `c = 0.01, p = 1`.
    """
    residual = rules.improved_meanflow(derivative=derivative)
    return Method(
        "imf", "eulerian", "marginal-from-conditional", "V",
        (Term("imf", residual, times, loss),), biased=_robust_shift(loss),
    )  # fmt: skip
