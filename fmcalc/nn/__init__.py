from ._embedding import sinusoidal_embedding as sinusoidal_embedding
from ._mlp import MLP as MLP
from ._transformer import Transformer as Transformer
