"""Look-aheads: from a state `x_t`, a guess of the data point sampling will end at."""

import abc
from collections.abc import Callable

import equinox as eqx
import jax.numpy as jnp

from .._conventions import denoiser_from_velocity, flow_map_from_average_velocity
from .._custom_types import Cond, Time, Vector
from .._misc import call
from ..flows import AbstractFlow


def jump(model: Callable[..., Vector], x: Vector, s, t, cond: Cond) -> Vector:
    """`F(x, s, t) = x + (t - s) V(x, s, t)`."""
    return flow_map_from_average_velocity(x, s, t, call(model, x, s, t, cond=cond))


def velocity(model: Callable[..., Vector], x: Vector, t, cond: Cond) -> Vector:
    """The model's velocity `v(x, t) = V(x, t, t)`."""
    if isinstance(model, AbstractFlow):
        # An analytic flow's own velocity is closed-form; `flow(x, t, t)` would run
        # an ODE solve of length zero for a mixture.
        return model.velocity(x, t, cond=cond)
    return call(model, x, t, t, cond=cond)


class AbstractLookahead(eqx.Module):
    """A look-ahead: from `x_t` at time `t`, an estimate `x̂0(x_t, t)` of the data
    point that sampling from `x_t` ends at, used by [`fmcalc.apps.steer`][] and
    [`fmcalc.apps.smc`][] to score a noisy state with a reward defined on data.

    Every look-ahead is the identity at `t = 0`, where `x_t` is data.
    """

    @abc.abstractmethod
    def __call__(
        self, model: Callable[..., Vector], x: Vector, t: Time, *, cond: Cond = None
    ) -> Vector:
        """The estimate `x̂0(x, t)` for one example `x` at the scalar time `t`."""


class FlowMapLookahead(AbstractLookahead):
    """The flow map's end point `F(x_t, t, 0)`, in `steps` uniform jumps
    `t = t_0 > ... > t_steps = 0`: where the probability-flow ODE from `x_t` lands.

    With an exact map this is a sample of the data distribution whenever `x_t` is a
    sample of `p_t` (the flow map trajectory tilting look-ahead of Sabour et al.
    2025, "Test-time scaling of diffusions with flow maps"). It is one point of the
    posterior `p(x0 | x_t)`, not its average: a reward evaluated on it is a
    single-sample estimate of `E[r(x0) | x_t]`, biased for any reward that is not
    constant (see [`fmcalc.apps.expected_reward`][]).

    **Arguments:**

    - `steps`: the number of jumps from `t` to `0` (default 1).
    """

    steps: int = eqx.field(static=True, default=1)

    def __check_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int):
            raise TypeError(f"`steps` must be an int; got {self.steps!r}.")
        if self.steps < 1:
            raise ValueError(f"`steps` must be at least 1; got steps={self.steps}.")

    def __call__(
        self, model: Callable[..., Vector], x: Vector, t: Time, *, cond: Cond = None
    ) -> Vector:
        t = jnp.asarray(t, x.dtype)
        for i in range(self.steps):
            x = jump(
                model, x, t * (1 - i / self.steps), t * (1 - (i + 1) / self.steps), cond
            )
        return x


class TweedieLookahead(AbstractLookahead):
    """Tweedie's denoiser, the posterior mean `E[x0 | x_t] = x_t - t v(x_t, t)`
    from the model's velocity `v(x, t) = V(x, t, t)`
    ([`fmcalc.denoiser_from_velocity`][]).

    One model call, differentiable; the average of every outcome, so on multi-modal
    data it lies between modes (blurry images), and a reward evaluated on it is the
    reward of the average, not the average reward.

    **Arguments:** none.
    """

    def __call__(
        self, model: Callable[..., Vector], x: Vector, t: Time, *, cond: Cond = None
    ) -> Vector:
        return denoiser_from_velocity(x, t, velocity(model, x, t, cond))


class NoLookahead(AbstractLookahead):
    """No look-ahead: the reward is evaluated on the noisy state `x_t` itself.

    **Arguments:** none.
    """

    def __call__(
        self, model: Callable[..., Vector], x: Vector, t: Time, *, cond: Cond = None
    ) -> Vector:
        return x
