import equinox as eqx
import optax
from jaxtyping import ArrayLike, PyTree


def ema_update(ema: PyTree, model: PyTree, decay: float | ArrayLike) -> PyTree:
    """One step of an exponential moving average of parameters, as a pure function.

    `ema <- decay · ema + (1 - decay) · model` on every inexact array leaf; every
    other leaf (activation functions, static fields) is taken from `ema`. The result
    is what a residual's [`fmcalc.Network`][]`("ema")` slot is evaluated with.

    **Arguments:**

    - `ema`: the current average (same structure as `model`).
    - `model`: the online model after its optimiser step.
    - `decay`: the decay rate in `[0, 1]` (e.g. 0.999); may be traced, so a schedule
      works under `jit`.

    **Returns:** the updated average.
    """
    if isinstance(decay, int | float) and not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA `decay` must lie in [0, 1]; got {decay}.")
    old, static = eqx.partition(ema, eqx.is_inexact_array)
    new = eqx.filter(model, eqx.is_inexact_array)
    averaged = optax.incremental_update(new, old, step_size=1 - decay)
    return eqx.combine(averaged, static)
