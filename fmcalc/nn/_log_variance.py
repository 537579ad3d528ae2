from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from .._custom_types import Time
from ._embedding import sinusoidal_embedding


class LogVarianceMLP(eqx.Module):
    """A learned log-variance `w(s, t)` for [`fmcalc.LogVariance`][]: sinusoidal
    (Fourier) features of both times and a SiLU MLP to a scalar.

    Its last layer starts at zero, so an untrained `w` is 0 everywhere and the
    loss `e^{-w} ‖R‖² + w` starts as the plain squared error. The self-distillation
    code of Boffi et al. (2025) learns such a weight (a Fourier-feature MLP, as in
    EDM2's uncertainty weighting) beside its image networks.

    Called as `w(s, t)` with scalar times; returns a scalar.
    """

    layers: tuple[eqx.nn.Linear, ...]
    time_features: int = eqx.field(static=True)

    def __init__(
        self,
        *,
        width: int = 64,
        depth: int = 1,
        time_features: int = 16,
        dtype=None,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `width`, `depth`: the size and number of the hidden layers.
        - `time_features`: the size of each time's embedding, even.
        - `dtype`: the parameters' floating dtype (default JAX's).
        - `key`: PRNG key of the initialisation.
        """
        sizes = [2 * time_features] + [width] * depth
        keys = jr.split(key, depth + 1)
        hidden = tuple(
            eqx.nn.Linear(a, b, key=k, dtype=dtype)
            for a, b, k in zip(sizes[:-1], sizes[1:], keys, strict=False)
        )
        last = eqx.nn.Linear(sizes[-1], "scalar", key=keys[-1], dtype=dtype)
        last = jax.tree.map(jnp.zeros_like, last)
        self.layers = (*hidden, last)
        self.time_features = time_features

    def __call__(self, s: Time, t: Time) -> Float[Array, ""]:
        dtype = self.layers[0].weight.dtype
        h = jnp.concatenate(
            [
                sinusoidal_embedding(time, self.time_features, dtype=dtype)
                for time in (s, t)
            ]
        )
        for layer in self.layers[:-1]:
            h = jax.nn.silu(layer(h))
        return self.layers[-1](h)


class WithLogVariance(eqx.Module):
    """A network and its learned log-variance, trained together.

    Calls go to `network` unchanged; `log_variance(s, t)` is read by
    [`fmcalc.LogVariance`][]`(source="model")`, so that `fit` trains the weight
    with the network (and keeps its EMA) and sampling ignores it.

    **Arguments:**

    - `network`: the map's network, called as `network(x, s, t, cond=...)`.
    - `weight`: the log-variance `w(s, t) -> scalar`, e.g.
      [`fmcalc.nn.LogVarianceMLP`][]; or a constant float, not trained (the
      self-distillation code of Boffi et al. uses `w = 1` with its MLPs).

    **Example:**

    ```python
    key_net, key_w = jax.random.split(jax.random.key(0))
    model = fmcalc.nn.WithLogVariance(
        fmcalc.nn.MLP(2, key=key_net), fmcalc.nn.LogVarianceMLP(key=key_w)
    )
    method = fmcalc.methods.get("lsd", preset="reference")
    ```
    """

    network: Callable
    weight: Callable | float

    def __check_init__(self):
        if not callable(self.weight) and not isinstance(self.weight, float | int):
            raise TypeError(
                "`WithLogVariance(weight=...)` must be a function `w(s, t)` or a "
                f"constant float; got {type(self.weight).__name__}."
            )

    def __call__(self, x, s, t, **kwargs) -> Array:
        return self.network(x, s, t, **kwargs)

    def log_variance(self, s: Time, t: Time) -> Float[Array, ""]:
        """`w(s, t)`, a scalar."""
        if callable(self.weight):
            return self.weight(s, t)
        return jnp.asarray(self.weight, jnp.result_type(s, float))

    @property
    def dim(self) -> int:
        """The network's `dim`."""
        return self.network.dim  # pyright: ignore[reportAttributeAccessIssue,reportFunctionMemberAccess]
