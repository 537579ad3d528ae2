"""Compositional methods: `F(F(x, s, u), u, t) = F(x, s, t)`."""

from .. import _rules as rules
from .._derivative import JVP, AbstractDerivative
from .._expr import ConditionalVelocity, D, Network, Teacher, U
from .._losses import AbstractLoss, SquaredError
from .._method import Method, Term
from .._times import (
    AbstractTimeSampler,
    DyadicSteps,
    UniformSquare,
    UniformTriangle,
    WithIntermediate,
)
from ._common import (
    SELF_DISTILLATION_CODE,
    SELF_DISTILLATION_REFERENCE,
    SELF_DISTILLATION_SOURCE,
    SELF_DISTILLATION_TEST,
    F,
    anchor,
    compared_by_formula,
    s,
    shortcut_anchor,
    t,
    x,
)
from ._registry import register


_SHORTCUT_CODE = "kvfrans/shortcut-models at 6010043 (targets_shortcut.py)"
_FMM_CODE = (
    "jc-bao/flow_map_matching_public at 27a4ada, a runnable fork of the 2024 code "
    "(py/common/losses.py `lagrangian`, run.sh)"
)


@register(
    "shortcut",
    full_name="Shortcut models",
    citation='Frans, Hafner, Levine, Abbeel, "One Step Diffusion via Shortcut '
    'Models", ICLR 2025',
    summary="Train from scratch: flow matching on 7/8 of the rows; on the rest, one "
    "jump must equal two half jumps of an EMA target, on a dyadic grid of steps.",
    deviations=(
        "The network sees (s, t); theirs is conditioned on t and the step size "
        "k = log2(1/d).",
        f"Their code ({_SHORTCUT_CODE}) clips the first half jump and the target "
        "to ±4 (`clip=4`); gives each step size an equal block of the "
        "self-consistency rows and the rest d = 1, a quarter of them at their "
        "batch (`DyadicSteps(7, allocation='even')`); draws its flow-matching "
        "rows on a 128-point grid and labels them with the finest step d = 1/128 "
        "(`anchor_grid=128`); ends the path at 1e-5 eps (`sigma_min=1e-5`); "
        "drops labels on its flow-matching rows only "
        "(`label_dropout_terms=('anchor',)`); and averages the squared error "
        "over dimensions (`SquaredError(reduction='mean')`), where fmcalc sums. "
        "preset='reference' sets all of these. Its split takes n // 8 rows for "
        "self-consistency, which equals the default's for batches that are "
        "multiples of 8.",
    ),
    dieleman_cost=8,
    compared_with=compared_by_formula(_SHORTCUT_CODE),
    presets={
        "reference": {
            "times": DyadicSteps(7, allocation="even"),
            "loss": SquaredError(reduction="mean"),
            "anchor_loss": SquaredError(reduction="mean"),
            "clip": 4.0,
            "anchor_grid": 128,
            "sigma_min": 1e-5,
            "label_dropout": 0.1,
            "label_dropout_terms": ("anchor",),
        }
    },
)
def shortcut(
    *,
    times: AbstractTimeSampler = DyadicSteps(7),
    split: tuple[float, float] = (7 / 8, 1 / 8),
    target_network: Network = Network("ema"),
    loss: AbstractLoss = SquaredError(),
    anchor_loss: AbstractLoss = SquaredError(),
    clip: float | None = None,
    anchor_grid: int | None = None,
    sigma_min: float = 0.0,
    label_dropout: float = 0.0,
    label_dropout_terms: tuple[str, ...] | None = None,
) -> Method:
    """Shortcut models (Frans et al. 2025):

    - flow matching on 7/8 of the rows (`bootstrap_every=8`),
    - `R = V(x, s, t) - sg[½ V_ema(x, s, u) + ½ V_ema(F_ema(x, s, u), u, t)]`,
      `u = (s + t)/2`, on the rest, with the step `s - t = 2^-k` on a dyadic grid.

    Their time runs from noise (0) to data (1) and they condition on `k = log2(1/d)`
    rather than on `t`. The EMA target (0.999) follows `bootstrap_ema=1`.

    **Arguments:** `times` and `loss` of the self-consistency term, `anchor_loss`
    of the flow-matching term, `split` and `target_network` as above; `clip`: see
    [`fmcalc.compositional`][]; `anchor_grid`: `None` for flow matching on the
    diagonal `t = s` (default), or `N` for their flow-matching rows, on an
    `N`-point grid with the network asked for the finest step
    ([`fmcalc.GridStep`][], biased by `O(1/N)`); `sigma_min`, `label_dropout` and
    `label_dropout_terms`: see [`fmcalc.Method`][].
    """
    residual = rules.compositional(target_network=target_network, clip=clip)
    first = shortcut_anchor(anchor_grid, anchor_loss)
    terms = (first, Term("compositional", residual, times, loss))
    return Method(
        "shortcut", "compositional", "self-distillation", "V", terms, split=split,
        label_dropout=label_dropout, label_dropout_terms=label_dropout_terms,
        sigma_min=sigma_min,
    )  # fmt: skip


_SPLITMEANFLOW_CODE = "tiaotiaohu-777/SplitMeanFlow at 6404d90 (src/splitmeanflow.py)"


@register(
    "splitmeanflow",
    full_name="SplitMeanFlow",
    citation="Guo, Wang, Yuan, Cao, Chen, Chen, Huo, Zhang, Wang, Liu, Wang, "
    '"SplitMeanFlow: Interval Splitting Consistency in Few-Step Generative '
    'Modeling", arXiv 2025',
    summary="Distil a teacher: the teacher's velocity on the diagonal, and interval "
    "splitting V(x, s, t) = r V(x, s, u) + (1 - r) V(F(x, s, u), u, t) at a random "
    "split point.",
    deviations=(
        "Public re-implementations choose the branch per step with probability "
        "1/2; here each batch gives half its rows to each (the same expectation).",
        "The authors published no training code. The implementation compared with "
        f"({_SPLITMEANFLOW_CODE}, not the authors') runs both terms on every row, "
        "each weighing 1 (`split=None`); averages over dimensions "
        "(`reduction='mean'`); preset='reference' sets both. It takes the split "
        "targets from an EMA of the student, where fmcalc uses the online network "
        "under a stop-gradient (a hand-built `compositional(target_network="
        "Network('ema'))`); and drops labels for the student only (no option).",
    ),
    dieleman_cost=9,
    presets={"reference": {"split": None, "reduction": "mean"}},
    compared_with=compared_by_formula(
        _SPLITMEANFLOW_CODE,
        "tests/test_authors_formulas.py",
        "with both terms on every row, the mean over dimensions and the target "
        "network equal to the student",
    ),
)
def splitmeanflow(
    *,
    times: AbstractTimeSampler = WithIntermediate(UniformTriangle()),
    split: tuple[float, float] | None = (0.5, 0.5),
) -> Method:
    """SplitMeanFlow (Guo et al. 2025), interval splitting with a teacher boundary:

    - boundary: `V(x, s, s) - v(x, s)` (teacher velocity),
    - `R = V(x, s, t) - sg[r V(x, s, u) + (1 - r) V(F(x, s, u), u, t)]` with
      `u = s + r (t - s)`, `r ~ U[0, 1]` (their `λ`).

    The split targets use the online weights under stop-gradient.
    """
    residual = rules.compositional(form="V", u=U)
    terms = (anchor(velocity=Teacher()), Term("compositional", residual, times))
    return Method(
        "splitmeanflow", "compositional", "distillation", "V", terms, split=split
    )


@register(
    "psd",
    full_name="Progressive self-distillation",
    citation='Boffi, Albergo, Vanden-Eijnden, "How to build a consistency model: '
    'Learning flow maps via self-distillation", NeurIPS 2025',
    summary="Train from scratch: a flow-matching anchor plus SplitMeanFlow's "
    "interval splitting (a uniform split point, or the midpoint).",
    deviations=SELF_DISTILLATION_CODE,
    dieleman_cost=8,
    compared_with=compared_by_formula(SELF_DISTILLATION_SOURCE, SELF_DISTILLATION_TEST),
    presets={"reference": SELF_DISTILLATION_REFERENCE},
)
def psd(
    *,
    midpoint: bool = False,
    times: AbstractTimeSampler = UniformTriangle(),
    split: tuple[float, float] = (0.75, 0.25),
    loss: AbstractLoss = SquaredError(),
    noise_scale: float = 1.0,
) -> Method:
    """Progressive self-distillation (Boffi et al. 2025): the flow-matching anchor on
    75% of the rows and, on the rest,

    `R = V(x, s, t) - sg[r V(x, s, u) + (1 - r) V(F(x, s, u), u, t)]`,

    `u = s + r (t - s)` with `r ~ U[0, 1]` (`psd_type="uniform"`, the SplitMeanFlow
    identity) or `r = 1/2` (`midpoint=True`, a continuous-time shortcut model). The
    target uses the online weights under stop-gradient, as in the official code.
    """
    residual = rules.compositional(form="V", u=0.5 if midpoint else U)
    sampler = times if midpoint else WithIntermediate(times)
    terms = (anchor(loss=loss), Term("compositional", residual, sampler, loss))
    return Method(
        "psd", "compositional", "self-distillation", "V", terms, split=split,
        noise_scale=noise_scale,
    )  # fmt: skip


@register(
    "fmm",
    full_name="Flow map matching",
    citation='Boffi, Albergo, Vanden-Eijnden, "Flow map matching with stochastic '
    'interpolants: A mathematical framework for consistency models", TMLR 2025',
    summary="Train from scratch, marginal-from-conditional: map x_s to t and "
    "differentiate the way back at its end; that velocity at x_s is matched to "
    "eps - x0.",
    deviations=(
        "The paper's invertibility term is omitted, as in the code.",
        f"Their code ({_FMM_CODE}) runs time from noise (0) to data (1) and "
        "parameterises the map as `X_{s,t}(x) = x + (t - s)(φ - x)`: the network's "
        "output `φ` is `x - V` in fmcalc's convention, so `V(x, s, t) = x - "
        "φ(x, 1 - s, 1 - t)` makes the two losses equal. Its curricula "
        "(`box_anneal`, `diagonal_anneal`) are off in its run script, as here.",
    ),
    dieleman_cost=9,
    compared_with=compared_by_formula(
        _FMM_CODE, "tests/test_fmm_reference.py", "at its defaults"
    ),
)
def fmm(
    *,
    derivative: AbstractDerivative = JVP(),
    times: AbstractTimeSampler = UniformSquare(),
) -> Method:
    """Flow map matching (Boffi et al. 2024), trained directly (`losses.lagrangian`):

    `R = ∂_a F(F(x, s, t), t, a)|_{a = s} - (eps - x0)`,

    the velocity at `x_s` recovered by mapping `x_s` to `t` and differentiating the
    way back at its end. The conditional velocity enters only additively, so the
    learning is marginal-from-conditional with no stop-gradient at all; both
    network calls get gradients (9 FPE). Times cover the full square (backward
    maps are learned too).
    """
    back = D(F, at=(F(x, s, t), t, s), along=(0, 0, 1), by=derivative)
    residual = back - ConditionalVelocity()(x, s)
    return Method(
        "fmm", "compositional", "marginal-from-conditional", "V",
        (Term("compositional", residual, times),),
    )  # fmt: skip


@register(
    "pfmm",
    full_name="Progressive flow map matching",
    citation='Boffi, Albergo, Vanden-Eijnden, "Flow map matching with stochastic '
    'interpolants: A mathematical framework for consistency models", TMLR 2025',
    summary="Distil a pre-trained partial flow map (passed as `aux=`) into one that "
    "jumps twice as far.",
    deviations=(
        "The code refreshes a frozen teacher snapshot every `distill_steps` and "
        "doubles the window |t - s| each phase; here the teacher is fixed and "
        "`times` is restricted by hand.",
    ),
    dieleman_cost=5,
)
def pfmm(
    *,
    times: AbstractTimeSampler = UniformTriangle(),
) -> Method:
    """Progressive flow map matching (Boffi et al. 2024): distil a pre-trained
    partial flow map `F_aux` (passed as `aux=`) into one that jumps twice as far,

    `R = F(x, s, t) - sg[F_aux(F_aux(x, s, u), u, t)]`, `u = (s + t)/2`.
    """
    residual = rules.compositional(form="F", u=0.5, target_network=Network("aux"))
    return Method(
        "pfmm", "compositional", "distillation", "V",
        (Term("compositional", residual, times),),
    )  # fmt: skip
