"""A training loop for any [`fmcalc.Method`][]: one compiled step, an EMA of the
parameters, gradient clipping, guards against non-finite steps, exploding updates and
divergence, verified atomic checkpoints that resume bit-for-bit, evaluation hooks and
a progress bar.

```python
import jax
import jax.numpy as jnp
import fmcalc
from fmcalc.nn import MLP

flow = fmcalc.flows.Gaussian(jnp.zeros(2), jnp.eye(2))
data = flow.sample(jax.random.key(0), 10_000)  # or `data = flow.sample`, drawn anew
model = MLP(2, width=128, depth=3, key=jax.random.key(1))
result = fmcalc.train.fit(
    fmcalc.methods.get("shortcut"), model, data,
    key=jax.random.key(2), steps=20_000, batch_size=256, checkpoint="run.eqx",
)
noise = jax.random.normal(jax.random.key(3), (1000, 2))
samples = jax.vmap(lambda e: fmcalc.sample(result.ema, e, steps=2))(noise)
```

Running the same call again after an interruption continues from `run.eqx` and gives
the same losses and parameters as an uninterrupted run.
"""

from ._checkpoint import (
    CheckpointError as CheckpointError,
    checkpoint_header as checkpoint_header,
    load_checkpoint as load_checkpoint,
    save_checkpoint as save_checkpoint,
)
from ._precision import Precision as Precision
from ._train import (
    Divergence as Divergence,
    DivergenceError as DivergenceError,
    NonFiniteError as NonFiniteError,
    TrainResult as TrainResult,
    TrainState as TrainState,
    fit as fit,
)
