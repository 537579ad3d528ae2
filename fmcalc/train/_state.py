"""What a run carries from step to step, and what `fit` returns."""

import equinox as eqx
import numpy as np
from jax.sharding import Mesh
from jaxtyping import PRNGKeyArray, PyTree


class TrainState(eqx.Module):
    """Everything a run needs to continue: what a checkpoint holds.

    **Arguments:**

    - `model`: the online model.
    - `ema`: the exponential moving average of its parameters (the model itself when
      training without an EMA).
    - `opt_state`: the optimiser's state.
    - `step`: the number of steps taken.
    - `key`: the run's PRNG key; step `i` uses `jax.random.fold_in(key, i)`.
    """

    model: PyTree
    ema: PyTree
    opt_state: PyTree
    step: int
    key: PRNGKeyArray


class TrainResult(eqx.Module):
    """What [`fmcalc.train.fit`][] returns: the final state and the run's history.

    **Arguments:**

    - `model`, `ema`, `opt_state`, `step`, `key`: the final
      [`fmcalc.train.TrainState`][] (also available as `result.state`).
    - `losses`: the loss of every step run in this call, NaN for skipped steps.
    - `metrics`: each metric (`"<term>/loss"`, `"<term>/residual"`, `"grad_norm"`)
      at every step run in this call.
    - `skipped`: how many steps of this call were skipped as non-finite.
    - `evaluations`: `(step, results)` of every call of the `evaluate` hook.
    - `mesh`: the devices the run used (`result.mesh.devices`), as a
      `jax.sharding.Mesh`. The arrays of the state are laid out on it as training
      left them (replicated, or split along `shard_params`), so training or
      sampling can go on there without a copy to one device.
    """

    model: PyTree
    ema: PyTree
    opt_state: PyTree
    step: int
    key: PRNGKeyArray
    losses: np.ndarray
    metrics: dict[str, np.ndarray]
    skipped: int
    evaluations: list[tuple[int, dict[str, float]]]
    mesh: Mesh

    @property
    def state(self) -> TrainState:
        """The final state, e.g. for [`fmcalc.train.save_checkpoint`][]."""
        return TrainState(self.model, self.ema, self.opt_state, self.step, self.key)
