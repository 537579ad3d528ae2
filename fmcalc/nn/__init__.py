"""Networks called per example as `model(x, s, t, cond=None)` and returning the
average velocity `V(x, s, t)`: an MLP for vectors, a small transformer for images,
and an adapter that lets a Flax (NNX or Linen) network do the same."""

from ._embedding import sinusoidal_embedding as sinusoidal_embedding
from ._flax import FlaxModel as FlaxModel, from_flax as from_flax
from ._mlp import MLP as MLP
from ._transformer import Transformer as Transformer
