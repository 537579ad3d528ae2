"""Networks called per example as `model(x, s, t, cond=None)` and returning the
average velocity `V(x, s, t)`: an MLP for vectors, a small transformer for images,
an adapter that lets a Flax (NNX or Linen) network do the same, and a wrapper that
gives a network a learned log-variance weight, trained with it."""

from ._embedding import sinusoidal_embedding as sinusoidal_embedding
from ._flax import FlaxModel as FlaxModel, from_flax as from_flax
from ._log_variance import (
    LogVarianceMLP as LogVarianceMLP,
    WithLogVariance as WithLogVariance,
)
from ._mlp import MLP as MLP
from ._transformer import Transformer as Transformer
