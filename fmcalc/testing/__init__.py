"""Property-testing kit: check any flow map, analytic or trained, against the
identities of an exact flow.

Requires `hypothesis` (the `test` extra) for the strategies.
"""

from ._checks import (
    all_residuals as all_residuals,
    boundary_residual as boundary_residual,
    derivative_convergence as derivative_convergence,
    diagonal_residual as diagonal_residual,
    eulerian_residual as eulerian_residual,
    inverse_residual as inverse_residual,
    lagrangian_residual as lagrangian_residual,
    parameterisation_residual as parameterisation_residual,
    semigroup_residual as semigroup_residual,
    tolerance as tolerance,
)
from ._fixed_point import (
    TRUNCATION_CONSTANT as TRUNCATION_CONSTANT,
    FixedPointResult as FixedPointResult,
    TermCheck as TermCheck,
    check_fixed_point as check_fixed_point,
    descent_alignment as descent_alignment,
    uses_conditional_velocity as uses_conditional_velocity,
)
from ._flows import KIT_STEPS as KIT_STEPS, asymmetric_mixture as asymmetric_mixture
from ._stability import (
    StabilityResult as StabilityResult,
    check_stability as check_stability,
)
from ._strategies import (
    EDGE_TIMES as EDGE_TIMES,
    PROFILE as PROFILE,
    dimensions as dimensions,
    gaussian_mixtures as gaussian_mixtures,
    gaussians as gaussians,
    means as means,
    property_settings as property_settings,
    seeds as seeds,
    spd_covariances as spd_covariances,
    time_pairs as time_pairs,
    time_triples as time_triples,
    times as times,
)
from ._training import (
    TrainingResult as TrainingResult,
    check_training as check_training,
    euler_samples as euler_samples,
    exact_samples as exact_samples,
    jump_gradient as jump_gradient,
    jump_samples as jump_samples,
    paired_error as paired_error,
)
from ._unbiased import (
    AffinePerturbation as AffinePerturbation,
    UnbiasedResult as UnbiasedResult,
    check_unbiased as check_unbiased,
    hotelling as hotelling,
    perturbed as perturbed,
)
