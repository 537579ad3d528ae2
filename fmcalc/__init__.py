"""fmcalc: flow maps in JAX — consistency rules as composable, verified primitives."""

import importlib.metadata

from . import cost as cost, flows as flows
from ._batch import Batch as Batch
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
from ._ema import ema_update as ema_update
from ._evaluate import evaluate as evaluate, residual_loss as residual_loss
from ._expr import (
    AbstractExpr as AbstractExpr,
    AbstractVelocity as AbstractVelocity,
    Analytic as Analytic,
    Call as Call,
    ConditionalVelocity as ConditionalVelocity,
    Constant as Constant,
    D as D,
    Derivative as Derivative,
    Diagonal as Diagonal,
    FlowMap as FlowMap,
    FlowMapCall as FlowMapCall,
    Network as Network,
    S as S,
    StopGradient as StopGradient,
    T as T,
    Teacher as Teacher,
    U as U,
    Variable as Variable,
    VelocityCall as VelocityCall,
    X as X,
    sg as sg,
)
from ._rules import (
    compositional as compositional,
    eulerian as eulerian,
    flow_matching as flow_matching,
    improved_meanflow as improved_meanflow,
    lagrangian as lagrangian,
    meanflow as meanflow,
)
from ._validate import validate as validate


__version__ = importlib.metadata.version("fmcalc")
