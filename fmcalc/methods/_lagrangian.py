"""Lagrangian methods: `∂_t F(x, s, t) = v(F(x, s, t), t)`."""

from .. import _rules as rules
from .._derivative import JVP, AbstractDerivative, FiniteDifference
from .._expr import AbstractVelocity, D, Diagonal, Normalize, Teacher, sg
from .._losses import AbstractLoss, SquaredError
from .._method import Method, Term
from .._times import (
    AbstractTimeSampler,
    Equal,
    FixedSource,
    GapFirst,
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
    V,
    V_ema,
    anchor,
    compared_by_formula,
    s,
    t,
    x,
)
from ._registry import register


@register(
    "lmd",
    full_name="Lagrangian map distillation",
    citation='Boffi, Albergo, Vanden-Eijnden, "Flow map matching with stochastic '
    'interpolants: A mathematical framework for consistency models", TMLR 2025',
    summary="Distil a teacher: the map's time derivative at its end point must equal "
    "the teacher's velocity there, backpropagated through the JVP and the teacher's "
    "input.",
    deviations=(
        "Times default to s >= t (the sampling direction); the paper samples the "
        "full square.",
        "The 2024 code's `lagrangian_distill` takes the time derivative at F(x_s) "
        "instead of x_s (an unused function); not followed.",
    ),
    dieleman_cost=9,
)
def lmd(
    *,
    derivative: AbstractDerivative = JVP(),
    velocity: AbstractVelocity = Teacher(),
    times: AbstractTimeSampler = UniformTriangle(),
) -> Method:
    """Lagrangian map distillation (Boffi et al. 2024, "Flow map matching"):

    `R = ∂_t F(x, s, t) - v(F(x, s, t), t)`, no stop-gradient anywhere.

    The loss is minimised by backpropagating through the JVP and through the
    teacher's input (8 FPE: Dieleman's table counts 9, but the teacher's backward
    needs only its input gradient). Paper symbols: their `X_{s,t}` is our
    `F(·, s, t)`.
    """
    residual = rules.lagrangian(
        form="F", stop_gradient="none", derivative=derivative, velocity=velocity
    )
    return Method(
        "lmd", "lagrangian", "distillation", "V", (Term("lagrangian", residual, times),)
    )


@register(
    "lsd",
    full_name="Lagrangian self-distillation",
    citation='Boffi, Albergo, Vanden-Eijnden, "How to build a consistency model: '
    'Learning flow maps via self-distillation", NeurIPS 2025',
    summary="Train from scratch: flow matching anchors the diagonal V(x, t, t), and "
    "the map's time derivative follows that diagonal's velocity at the map's end "
    "point, under a stop-gradient.",
    deviations=SELF_DISTILLATION_CODE,
    dieleman_cost=10,
    compared_with=compared_by_formula(SELF_DISTILLATION_SOURCE, SELF_DISTILLATION_TEST),
    presets={"reference": SELF_DISTILLATION_REFERENCE},
)
def lsd(
    *,
    derivative: AbstractDerivative = JVP(),
    times: AbstractTimeSampler = UniformTriangle(),
    split: tuple[float, float] = (0.75, 0.25),
    loss: AbstractLoss = SquaredError(),
    noise_scale: float = 1.0,
) -> Method:
    """Lagrangian self-distillation (Boffi et al. 2025, "How to build a consistency
    model"):

    - anchor: `V(x, s, s) - (eps - x0)` on 75% of the rows (`diag_fraction=0.75`),
    - `R = ∂_t F(x, s, t) - sg[V(sg[F(x, s, t)], t, t)]` on the rest, `(s, t)`
      uniform on the triangle.

    The teacher is the online model's own diagonal under stop-gradient (not an
    EMA), as in the official code; gradients flow through the JVP.
    """
    residual = rules.lagrangian(
        form="F", stop_gradient="target", derivative=derivative, velocity=Diagonal()
    )
    terms = (anchor(loss=loss), Term("lagrangian", residual, times, loss))
    return Method(
        "lsd", "lagrangian", "self-distillation", "V", terms, split=split,
        noise_scale=noise_scale,
    )  # fmt: skip


@register(
    "ayf-lmd",
    full_name="Align Your Flow, Lagrangian form (AYF-LMD)",
    citation='Sabour, Fidler, Kreis, "Align Your Flow: Scaling Continuous-Time Flow '
    'Map Distillation", NeurIPS 2025',
    summary="Distil a teacher with the Lagrangian residual as an sCM-style "
    "normalised tangent; the JVP runs under the stop-gradient.",
    deviations=(
        "The sign: AYF's surrogate `F - sg[F - ĝ]`, read in fmcalc's convention, "
        "moves the map away from its fixed point for s > t (it passes the "
        "fixed-point check and fails `fmcalc.testing.check_stability`); the spec "
        "uses the sign that descends.",
        "The space: the tangent loss acts on V, not F; the F-space surrogate's "
        "update is this one weighted by s - t, which starves short jumps.",
        "There is no official training code; the times follow the unofficial code "
        "(both logit-normal(-0.8, 1), sorted).",
    ),
    dieleman_cost=6,
    read_code="no code from the authors is public, and neither public AYF "
    "implementation (tec-works/FlowWithMe at 5a5cea5, revsic/flowmodels at bae2246) "
    "has the Lagrangian form; the spec follows the paper",
)
def ayf_lmd(
    *,
    derivative: AbstractDerivative = JVP(),
    velocity: AbstractVelocity = Teacher(),
    c: float = 0.1,
    times: AbstractTimeSampler = SortedPair(LogitNormal(-0.8, 1.0)),
) -> Method:
    """Align Your Flow, Lagrangian form (Sabour et al. 2025), sCM-style tangent loss:

    `g = ∂_t F(x, s, t) - v(F(x, s, t), t)`,
    `R = V(x, s, t) - sg[V(x, s, t) - g / (‖g‖ + c)]`,

    so the update is `ĝ ∇_θ V` with the normalised tangent `ĝ` (`g` is also the
    `V`-form Lagrangian residual); the JVP runs under the stop-gradient (no
    backward through it). The correct `F`-space surrogate would be
    `F - sg[F + ĝ]`. AYF's `f(x_t, t, s)` is our `F(x_s, s, t)`.
    """
    g = D(F, at=(x, s, t), along=(0, 0, 1), by=derivative) - velocity(F(x, s, t), t)
    residual = V(x, s, t) - sg(V(x, s, t) - Normalize(g, c))
    return Method(
        "ayf-lmd",
        "lagrangian",
        "distillation",
        "V",
        (Term("lagrangian", residual, times),),
    )


_TVM_CODE = "lumalabs/tvm at 82e8e5d (training/loss.py `TVMLoss`, training/wrapper.py)"


@register(
    "tvm",
    full_name="Terminal velocity matching",
    citation='Zhou, Parger, Haque, Song, "Terminal Velocity Matching", arXiv 2025',
    summary="Train from scratch: the Lagrangian residual with a fast EMA's diagonal "
    "velocity as the target, plus flow matching at an independent time, both on "
    "every row.",
    deviations=(
        "Guidance: their residuals are scaled by 1/w and their network is "
        "conditioned on it (left to the model), and their flow-matching target "
        "mixes in the EMA's unguided velocity, `w v + (1 - w) V_ema(x, s', s' | ∅)` "
        "(`flow_matching(velocity=MeanFlowGuidance(omega=w, kappa=0, "
        "network=Network('ema')))` in a hand-built term); the label-dependent "
        "weight 1/w² has no option. Unguided, their code needs `cfg=1` (it "
        "otherwise draws w per row).",
        f"Their code ({_TVM_CODE}) averages over dimensions, where fmcalc sums "
        "(`reduction='mean'`, which preset='reference' sets); shares one noise and "
        "data row between the two terms, where fmcalc draws fresh noise per term "
        "(the same expected loss; no option); truncates the target-time law at "
        "1 - gap, where `GapFirst` rescales it (no option); zeroes the Lagrangian "
        "term where s = t (gap-first times never draw it); zeroes non-finite rows; "
        "and keeps two EMAs, 0.99 as the target and 0.9999 to sample, where `fit` "
        "keeps one.",
    ),
    dieleman_cost=10,
    presets={"reference": {"reduction": "mean"}},
    compared_with=compared_by_formula(
        _TVM_CODE,
        "tests/test_authors_formulas.py",
        "unguided, with the mean over dimensions and one noise for both terms",
    ),
)
def tvm(
    *,
    derivative: AbstractDerivative = JVP(),
    times: AbstractTimeSampler = GapFirst(),
    anchor_times: AbstractTimeSampler = Equal(LogitNormal(-0.4, 1.0)),
) -> Method:
    """Terminal velocity matching (Zhou et al. 2025):

    - `R = ∂_t F(x, s, t) - sg[V_ema(sg[F(x, s, t)], t, t)]` (gradients through the
      JVP; the teacher is a fast EMA, 0.99 in `im256_w2.yaml`),
    - plus flow matching `V(x, s', s') - (eps - x0)` at an independent time,

    both on every row (no sub-batch). TVM's convention equals ours. Their CFG
    scaling and guidance conditioning are left to the model; gap-first time
    sampling ([`fmcalc.GapFirst`][]).
    """
    residual = rules.lagrangian(
        form="F",
        stop_gradient="target",
        derivative=derivative,
        velocity=Diagonal(V_ema),
    )
    terms = (Term("lagrangian", residual, times), anchor(anchor_times))
    return Method("tvm", "lagrangian", "self-distillation", "V", terms)


@register(
    "freeflow",
    full_name="FreeFlow: flow map distillation without data",
    citation='Tong, Ma, Xie, Jaakkola, "Flow Map Distillation Without Data", '
    "arXiv 2025",
    summary="Distil a teacher without data, from pure noise (s = 1): the map's "
    "generating velocity follows the teacher along the map's own trajectory.",
    deviations=(
        "Dieleman's table lists a stop-gradient on the finite difference; every "
        "semigradient variant measured diverged from a random initialisation, so "
        "the default backpropagates through it (`stop_gradient=` gives the others).",
        "The distribution-level corrector, an auxiliary denoiser trained on "
        "generated samples, is not part of this spec (it needs a second noise "
        "sample per row); no training code is public (ShangyuanTong/FreeFlow holds "
        "sampling code only), so the spec follows the paper: its predictor weighs "
        "the residual by 1/(‖R‖²/d + ε) (`loss=fmcalc.Adaptive(1.0, ε, "
        "reduction='mean')`, ε not stated) and splits the batch 3:1 with the "
        "corrector, with an adaptive balance; its teacher is guided.",
    ),
    dieleman_cost=12,
)
def freeflow(
    *,
    derivative: AbstractDerivative = FiniteDifference(5e-3, "central"),
    velocity: AbstractVelocity = Teacher(),
    times: AbstractTimeSampler = FixedSource(Uniform()),
    stop_gradient: str = "target",
) -> Method:
    """FreeFlow's predictor (Tong et al. 2025, "Flow map distillation without
    data"): the student's generating velocity matched to the teacher along the
    student's own trajectory from pure noise, `s = 1` only:

    `R = D~fd[F](x, 1, t)·(0, 0, 1) - sg[v(sg[F(x, 1, t)], t)]`,

    the time derivative a central finite difference, backpropagated; the teacher's
    velocity at the map's output is the target. The data is never used
    (`x_1 = eps`). The step `h = 5e-3` is about `cbrt(eps)` of float32, where a
    central difference's round-off (`eps / h`) and truncation (`h²`) balance.
    """
    residual = rules.lagrangian(
        form="F", stop_gradient=stop_gradient, derivative=derivative, velocity=velocity
    )
    return Method(
        "freeflow",
        "lagrangian",
        "distillation",
        "V",
        (Term("predictor", residual, times),),
    )


@register(
    "pid",
    full_name="Physics-informed distillation",
    citation='Tee, Zhang, Yoon, Gowda, Kim, Yoo, "Physics Informed Distillation for '
    'Diffusion Models", TMLR 2024',
    summary="Distil a teacher without data into a single-source map from noise, in "
    "data space: the map's implied denoiser matches the teacher's at its output.",
    deviations=(
        "LPIPS is replaced by the squared error.",
        "Their backward difference on a 250-point Karras grid is a finite difference "
        "of step 1e-3 at times uniform in [0.002, 1].",
        "Their code starts the map at σ_max = 80 (`times=FixedSource(..., "
        "source=80/81)`, with zero data rows), takes the second point of the "
        "difference at the neighbouring grid point towards data, where fmcalc "
        "steps towards noise (no option), averages over dimensions in its `l2` "
        "option (`reduction='mean'`), and draws random class labels for ImageNet "
        "(pass them as `cond`). preset='reference' sets the source, times in "
        "[0.002, 0.999] and the mean. Its implied denoiser has the same value in "
        "its σ coordinates as in fmcalc's.",
    ),
    dieleman_cost=7,
    presets={
        "reference": {
            "times": FixedSource(Uniform(0.002, 0.999), source=80 / 81),
            "reduction": "mean",
        }
    },
    compared_with=compared_by_formula(
        "pantheon5100/pid_diffusion at b99605b (cm/karras_diffusion.py "
        "`OneShotDenoiser.ode_losses`, `denoise`)",
        "tests/test_authors_formulas.py",
        "from σ_max with their `l2` distance (the mean over dimensions), their "
        "networks' parameterisation, and the second point at t + h instead of "
        "their next grid point",
    ),
)
def pid(
    *,
    derivative: AbstractDerivative = FiniteDifference(1e-3),
    velocity: AbstractVelocity = Teacher(),
    times: AbstractTimeSampler = FixedSource(Uniform(0.002, 1.0)),
) -> Method:
    """Physics-informed distillation (Tee et al. 2024), a single-source map from
    noise (`s = 1`) trained in data space:

    `R = (F(x, 1, t) - t ∂_t F(x, 1, t)) - sg[F(x, 1, t) - t v(F(x, 1, t), t)]`,

    the implied denoiser against the teacher's denoiser at the map's output, with
    the derivative a finite difference that is backpropagated through. Their
    `x_θ(z, σ) = (σ/σ_max) z + (1 - σ/σ_max) net` is our `F(eps, 1, t)` with the
    denoised-field output.
    """
    end = F(x, s, t)
    dF = D(F, at=(x, s, t), along=(0, 0, 1), by=derivative)
    residual = (end - t * dF) - sg(end - t * velocity(end, t))
    return Method(
        "pid", "lagrangian", "distillation", "F", (Term("lagrangian", residual, times),)
    )
