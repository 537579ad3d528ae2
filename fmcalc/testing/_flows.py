import jax.numpy as jnp

from ..flows import GaussianMixture


KIT_STEPS = 512
"""The fixed RK4 steps of the flow map of the default flows of
[`fmcalc.testing.check_fixed_point`][] and [`fmcalc.testing.check_stability`][]:
within about `1e-8` of an adaptive solve at `rtol = 1e-10` on
`asymmetric_mixture()` (end points from `s = 1` to `0`), a smooth function of
`(x, s, t)` and of the perturbation parameters (an adaptive solve's step choices
are not, which finite differences see), and about half the compile time."""


def asymmetric_mixture(*, broad: bool = False, dtype=None, **solver) -> GaussianMixture:
    """The flows of the kit's method checks: skewed 2-D Gaussian mixtures.

    Symmetric data hides a whole class of wrong losses: where the conditional law
    of `eps - x0` given `x_s` is symmetric, a robust location (the fixed point of a
    residual-dependent weighting such as pseudo-Huber) coincides with the mean.
    Unequal weights and components that differ in shape and orientation make the
    posterior over components skewed almost everywhere, so such a shift shows.

    - `broad=False` (the default of [`fmcalc.testing.check_fixed_point`][] and
      [`fmcalc.testing.check_stability`][]): two narrow, anisotropic components
      with weights `(0.8, 0.2)`, far apart, where the shift of a robust weighting
      is large.
    - `broad=True` (the default of [`fmcalc.testing.check_training`][]): three
      broader anisotropic components with weights `(0.6, 0.3, 0.1)`, a distribution
      a small network learns in a few thousand steps.

    **Arguments:**

    - `broad`: which of the two (above).
    - `dtype`: the floating dtype (default: JAX's default float, float64 with
      `jax_enable_x64`).
    - `solver`: options of the ODE solve behind its flow map (`rtol`, `atol`,
      `max_steps`, `adjoint`), passed to [`fmcalc.flows.GaussianMixture`][].

    **Returns:** a [`fmcalc.flows.GaussianMixture`][].
    """
    dtype = jnp.result_type(float) if dtype is None else jnp.dtype(dtype)
    if broad:
        weights = [0.6, 0.3, 0.1]
        means = [[-1.2, -0.4], [1.4, 0.6], [0.2, 1.8]]
        covs = [
            [[0.30, 0.12], [0.12, 0.10]],
            [[0.05, 0.00], [0.00, 0.25]],
            [[0.15, -0.08], [-0.08, 0.12]],
        ]
    else:
        weights = [0.8, 0.2]
        means = [[-0.5, -0.25], [3.0, 1.5]]
        covs = [[[0.03, 0.01], [0.01, 0.02]], [[0.01, 0.0], [0.0, 0.04]]]
    return GaussianMixture(
        jnp.array(weights, dtype),
        jnp.array(means, dtype),
        jnp.array(covs, dtype),
        **solver,
    )
