"""A training loop for any [`fmcalc.Method`][]: one compiled step, an EMA of the
parameters, gradient clipping, guards against non-finite steps, exploding updates and
divergence, verified atomic checkpoints that resume bit-for-bit, evaluation hooks and
a progress bar. Its defaults follow the run's length: curricula settle by half the
run, the EMA remembers a tenth of it, and the learning rate warms up and decays.

```python
import jax
import jax.numpy as jnp
import fmcalc
from fmcalc.nn import MLP
from fmcalc.train import Checkpoint, Options

flow = fmcalc.flows.Gaussian(jnp.zeros(2), jnp.eye(2))
data = flow.sample(jax.random.key(0), 10_000)  # or `data = flow.sample`, drawn anew
model = MLP(2, width=128, depth=3, key=jax.random.key(1))
result = fmcalc.train.fit(
    fmcalc.methods.get("shortcut"), model, data,
    key=jax.random.key(2), steps=20_000, batch_size=256,
    options=Options(checkpoint=Checkpoint("run.eqx", every=1000)),
)
noise = jax.random.normal(jax.random.key(3), (1000, 2))
samples = jax.vmap(lambda e: fmcalc.sample(result.ema, e, steps=2))(noise)
```

Running the same call again after an interruption continues from `run.eqx` and gives
the same losses and parameters as an uninterrupted run.
"""

from .._precision import Precision as Precision
from ._build import TrainStep as TrainStep
from ._file import save_checkpoint as save_checkpoint
from ._guards import (
    Divergence as Divergence,
    DivergenceError as DivergenceError,
    NonFiniteError as NonFiniteError,
)
from ._header import CheckpointError as CheckpointError
from ._loop import default_optimizer as default_optimizer, fit as fit
from ._options import (
    EMA as EMA,
    Checkpoint as Checkpoint,
    Devices as Devices,
    Evaluation as Evaluation,
    Options as Options,
)
from ._state import TrainResult as TrainResult, TrainState as TrainState
from ._store import (
    checkpoint_header as checkpoint_header,
    load_checkpoint as load_checkpoint,
    load_model as load_model,
)
