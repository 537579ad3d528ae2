"""fmcalc: flow maps in JAX — consistency rules as composable, verified primitives."""

import importlib
import importlib.metadata

from . import (
    apps as apps,
    cost as cost,
    datasets as datasets,
    flows as flows,
    methods as methods,
    nn as nn,
    schedules as schedules,
    train as train,
)
from ._batch import NULL_LABEL as NULL_LABEL, Batch as Batch
from ._conventions import (
    average_velocity_from_denoised as average_velocity_from_denoised,
    average_velocity_from_flow_map as average_velocity_from_flow_map,
    conditional_velocity as conditional_velocity,
    denoised_from_average_velocity as denoised_from_average_velocity,
    denoiser_from_velocity as denoiser_from_velocity,
    flow_map_from_average_velocity as flow_map_from_average_velocity,
    flow_map_from_denoised as flow_map_from_denoised,
    interpolate as interpolate,
    score_from_velocity as score_from_velocity,
    velocity_from_denoiser as velocity_from_denoiser,
    velocity_from_score as velocity_from_score,
)
from ._derivative import (
    JVP as JVP,
    AbstractDerivative as AbstractDerivative,
    FiniteDifference as FiniteDifference,
)
from ._diagnostics import CallRole as CallRole, Finding as Finding
from ._ema import ema_update as ema_update
from ._evaluate import evaluate as evaluate, residual_loss as residual_loss
from ._explain import (
    Explanation as Explanation,
    TermExplanation as TermExplanation,
    explain as explain,
)
from ._expr import (
    AbstractExpr as AbstractExpr,
    AbstractVelocity as AbstractVelocity,
    Analytic as Analytic,
    Call as Call,
    Clip as Clip,
    ConditionalVelocity as ConditionalVelocity,
    Constant as Constant,
    D as D,
    Derivative as Derivative,
    Diagonal as Diagonal,
    FlowMap as FlowMap,
    FlowMapCall as FlowMapCall,
    HasLabel as HasLabel,
    Indicator as Indicator,
    Network as Network,
    Normalize as Normalize,
    Param as Param,
    S as S,
    StopGradient as StopGradient,
    T as T,
    Teacher as Teacher,
    TimeFunction as TimeFunction,
    U as U,
    Variable as Variable,
    VelocityCall as VelocityCall,
    X as X,
    sg as sg,
)
from ._guidance import (
    Autoguided as Autoguided,
    Guided as Guided,
    MeanFlowGuidance as MeanFlowGuidance,
)
from ._losses import (
    AbstractLoss as AbstractLoss,
    Adaptive as Adaptive,
    Cosine as Cosine,
    LogVariance as LogVariance,
    PseudoHuber as PseudoHuber,
    SquaredError as SquaredError,
    Sum as Sum,
    TimeWeighted as TimeWeighted,
    drop_labels as drop_labels,
    mask_nonfinite as mask_nonfinite,
)
from ._method import Method as Method, Term as Term
from ._rules import (
    compositional as compositional,
    eulerian as eulerian,
    flow_matching as flow_matching,
    improved_meanflow as improved_meanflow,
    lagrangian as lagrangian,
    meanflow as meanflow,
)
from ._run import Run as Run, load_run as load_run
from ._sampling import (
    HeunMap as HeunMap,
    invert as invert,
    model_velocity as model_velocity,
    sample as sample,
    sample_batch as sample_batch,
    sample_consistency as sample_consistency,
    sample_dpm2m as sample_dpm2m,
    sample_euler as sample_euler,
    sample_heun as sample_heun,
    sample_ode as sample_ode,
)
from ._times import (
    AbstractTimeDistribution as AbstractTimeDistribution,
    AbstractTimeSampler as AbstractTimeSampler,
    ArctanLogNormal as ArctanLogNormal,
    DyadicSteps as DyadicSteps,
    Equal as Equal,
    FixedSource as FixedSource,
    FixedTarget as FixedTarget,
    GapFirst as GapFirst,
    GridStep as GridStep,
    KarrasGrid as KarrasGrid,
    LogitNormal as LogitNormal,
    SortedPair as SortedPair,
    Times as Times,
    Uniform as Uniform,
    UniformSquare as UniformSquare,
    UniformTriangle as UniformTriangle,
    WithIntermediate as WithIntermediate,
)
from ._validate import validate as validate
from ._warnings import (
    DataScaleWarning as DataScaleWarning,
    EMAHorizonWarning as EMAHorizonWarning,
    FiniteDifferenceStepWarning as FiniteDifferenceStepWarning,
    FixedPointShiftWarning as FixedPointShiftWarning,
    FmcalcWarning as FmcalcWarning,
    GradientPathWarning as GradientPathWarning,
)


__version__ = importlib.metadata.version("fmcalc")


def __getattr__(name: str):
    # `fmcalc.testing` (the kit, with hypothesis strategies) loads on first use, so
    # `import fmcalc` neither needs hypothesis nor pays for the kit's imports.
    if name == "testing":
        return importlib.import_module(".testing", __name__)
    raise AttributeError(f"module 'fmcalc' has no attribute {name!r}")
