"""Flow maps at work: reward steering with a look-ahead, few-step likelihoods and
inverse maps, each checked against exact answers from the analytic flows.

- **Steering.** [`fmcalc.apps.steer`][] follows the reward's gradient through a
  look-ahead ([`fmcalc.apps.FlowMapLookahead`][], [`fmcalc.apps.TweedieLookahead`][],
  [`fmcalc.apps.NoLookahead`][]); [`fmcalc.apps.importance_sample`][] and
  [`fmcalc.apps.smc`][] select flow-map samples by reward, without gradients.
  [`fmcalc.apps.tilt`][] gives the exact target `p(x) exp(λ r(x)) / Z` of a Gaussian
  mixture and a [`fmcalc.apps.QuadraticReward`][].
- **Likelihood.** [`fmcalc.apps.log_likelihood`][] is `log p0(x0)` by the change of
  variables through the map to noise, in a few jumps;
  [`fmcalc.apps.log_likelihood_ode`][] is the ODE reference, a solve of
  [`fmcalc.apps.augmented_field`][].
- **Inverse maps.** [`fmcalc.apps.round_trip_error`][], [`fmcalc.apps.slerp`][] and
  [`fmcalc.apps.interpolation`][] encode data to noise, edit there and decode.

**Batching and keys.** As in fmcalc's samplers, a function whose examples do not
interact takes one example and is batched with `jax.vmap` (`steer`, with one key
per example, as [`fmcalc.sample_consistency`][]); a function whose particles
interact takes the whole population, shape `(n, dim)` (`importance_sample`, `smc`,
`resample`). A PRNG key is always the keyword `key=`, after the arrays.
"""

from ._inverse import (
    interpolation as interpolation,
    round_trip_error as round_trip_error,
    slerp as slerp,
)
from ._likelihood import (
    AbstractLogDet as AbstractLogDet,
    ExactLogDet as ExactLogDet,
    HutchinsonLogDet as HutchinsonLogDet,
    augmented_field as augmented_field,
    log_likelihood as log_likelihood,
    log_likelihood_ode as log_likelihood_ode,
)
from ._lookahead import (
    AbstractLookahead as AbstractLookahead,
    FlowMapLookahead as FlowMapLookahead,
    NoLookahead as NoLookahead,
    TweedieLookahead as TweedieLookahead,
)
from ._steer import (
    Particles as Particles,
    importance_sample as importance_sample,
    resample as resample,
    smc as smc,
    steer as steer,
)
from ._tilt import (
    QuadraticReward as QuadraticReward,
    expected_reward as expected_reward,
    log_normalizer as log_normalizer,
    tilt as tilt,
)
