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
from ._common import F, V, V_ema, anchor, s, t, x
from ._registry import register


@register("lmd")
def lmd(
    *,
    derivative: AbstractDerivative = JVP(),
    velocity: AbstractVelocity = Teacher(),
    times: AbstractTimeSampler = UniformTriangle(),
) -> Method:
    """Lagrangian map distillation (Boffi et al. 2024, "Flow map matching"):

    `R = ∂_t F(x, s, t) - v(F(x, s, t), t)`, no stop-gradient anywhere.

    The loss is minimised by backpropagating through the JVP and through the
    teacher's input (8 FPE: the seed counts 9, but the teacher's backward needs
    only its input gradient). Paper symbols: their `X_{s,t}` is our `F(·, s, t)`;
    they sample the full square, we default to `s >= t` (sampling direction). The
    2024 code's `lagrangian_distill` takes `∂_t` at `F(x_s)` instead of `x_s` (an
    unused function; not followed).
    """
    residual = rules.lagrangian(
        form="F", stop_gradient="none", derivative=derivative, velocity=velocity
    )
    return Method(
        "lmd", "lagrangian", "distillation", "V", (Term("lagrangian", residual, times),)
    )


@register("lsd")
def lsd(
    *,
    derivative: AbstractDerivative = JVP(),
    times: AbstractTimeSampler = UniformTriangle(),
    split: tuple[float, float] = (0.75, 0.25),
    loss: AbstractLoss = SquaredError(),
) -> Method:
    """Lagrangian self-distillation (Boffi et al. 2025, "How to build a consistency
    model"):

    - anchor: `V(x, s, s) - (eps - x0)` on 75% of the rows (`diag_fraction=0.75`),
    - `R = ∂_t F(x, s, t) - sg[V(sg[F(x, s, t)], t, t)]` on the rest, `(s, t)`
      uniform on the triangle.

    The teacher is the online model's own diagonal under stop-gradient (not an
    EMA), as in the official code; gradients flow through the JVP. Their learned
    log-variance weight `e^{-w} L + w` is available as
    `loss=fmcalc.LogVariance()` with `w(s, t)` passed as `aux`.
    """
    residual = rules.lagrangian(
        form="F", stop_gradient="target", derivative=derivative, velocity=Diagonal()
    )
    terms = (anchor(loss=loss), Term("lagrangian", residual, times, loss))
    return Method("lsd", "lagrangian", "self-distillation", "V", terms, split=split)


@register("ayf-lmd")
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
    backward through it). Two deliberate choices, both measured (300 Adam steps,
    2-D mixture, `tests/test_method_training.py`):

    - the sign: AYF's surrogate `F - sg[F - ĝ]`, read in our convention, moves the
      map *away* from its fixed point for `s > t` (distance to the exact map
      3.8 -> 4e5); the correct `F`-space surrogate is `F - sg[F + ĝ]`;
    - the space: that `F`-space surrogate's update is this one weighted by
      `s - t`, which starves short jumps (distance 3.76 -> 3.83, against -> 2.39
      here).

    AYF's `f(x_t, t, s)` is our `F(x_s, s, t)`. Times: both logit-normal(-0.8, 1)
    and sorted (unofficial code; there is no official training code).
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


@register("tvm")
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
    scaling by `β = 1/w` and the guidance-conditioned network are left to the model;
    gap-first time sampling ([`fmcalc.GapFirst`][]).
    """
    residual = rules.lagrangian(
        form="F",
        stop_gradient="target",
        derivative=derivative,
        velocity=Diagonal(V_ema),
    )
    terms = (Term("lagrangian", residual, times), anchor(anchor_times))
    return Method("tvm", "lagrangian", "self-distillation", "V", terms)


@register("freeflow")
def freeflow(
    *,
    derivative: AbstractDerivative = FiniteDifference(1e-3, "central"),
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
    (`x_1 = eps`). The seed's table lists a stop-gradient on the difference; with
    it, every semi-gradient variant we measured diverges from a random
    initialisation (300 steps, 2-D mixture: distance to the exact map 0.92 -> 22
    with sCM's tangent form, -> 9.1 with `stop_gradient="derivative"`), while this
    one trains (-> 0.91, loss 3.2 -> 2.0); pass `stop_gradient=` to reproduce. The
    distribution-level corrector, which trains an auxiliary denoiser on generated
    samples, needs a second noise sample per row and is not part of this spec; no
    training code is public.
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


@register("pid")
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
    the derivative a finite difference that is backpropagated through (their
    backward difference on a 250-point Karras grid; LPIPS replaced by MSE). Their
    `x_θ(z, σ) = (σ/σ_max) z + (1 - σ/σ_max) net` is our `F(eps, 1, t)` with the
    denoised-field output.
    """
    end = F(x, s, t)
    dF = D(F, at=(x, s, t), along=(0, 0, 1), by=derivative)
    residual = (end - t * dF) - sg(end - t * velocity(end, t))
    return Method(
        "pid", "lagrangian", "distillation", "F", (Term("lagrangian", residual, times),)
    )
