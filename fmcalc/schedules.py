"""Curricula: hyperparameters as functions of the training step (a tangent warm-up,
AlphaFlow's α, SoFlow's Δs, FMM's interval annealing). A method's `schedules` map
the names of its [`fmcalc.Param`][] leaves to these."""

from ._schedules import (
    AbstractSchedule as AbstractSchedule,
    Compressed as Compressed,
    Constant as Constant,
    Doubling as Doubling,
    Exponential as Exponential,
    LinearWarmup as LinearWarmup,
    Sigmoid as Sigmoid,
)
