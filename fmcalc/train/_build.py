"""The compiled problem and the placed state that a run starts from, as `fit`
builds them; and `TrainStep`, the same step without the loop, for measuring."""

from typing import Any

import equinox as eqx
import jax
import optax
from jax.sharding import Mesh
from jaxtyping import PRNGKeyArray, PyTree

from .._method import Method
from .._parallel import Layout, array_leaves, check_mesh, place, put
from .._precision import Precision
from ._options import EMA, Devices
from ._state import TrainState
from ._step import Problem, step_number, train_step


class Setup(eqx.Module):
    """A run's compiled problem, its fresh state laid out on the mesh, and the
    shardings of each part of the state (to lay out a resumed one the same way)."""

    problem: Problem
    state: TrainState
    shardings: dict[str, Any] = eqx.field(static=True)

    def placed(self, state: TrainState) -> TrainState:
        """`state` laid out as the run lays out its state."""
        layout = self.problem.layout
        return TrainState(
            *(
                place(getattr(state, name), self.shardings[name])
                for name in ("model", "ema", "opt_state")
            ),
            step=state.step,
            key=put(state.key, layout.replicated),
        )


def setup(
    method: Method,
    model: PyTree,
    data: Any,
    labels: Any,
    *,
    key: PRNGKeyArray,
    batch_size: int,
    optimizer: optax.GradientTransformation,
    teacher: Any,
    aux: Any,
    ema_decay: float | None,
    mesh: Mesh,
    devices: Devices,
    precision: Precision | None,
) -> Setup:
    """Lay out the data, networks and state on `mesh` and build the problem.
    `data` is `None` for a stream, whose rows reach each step as arguments."""
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    parts = {"model": model, "ema": model, "opt_state": opt_state}
    shard_params = devices.shard_params
    shardings = {
        name: Layout.of(mesh, shard_params, part).state for name, part in parts.items()
    }
    layout = Layout(
        mesh,
        shard_params,
        shardings["model"] + shardings["ema"] + shardings["opt_state"],
    )
    shardings["key"] = (layout.replicated,)
    if data is not None and not callable(data):
        data = put(data, layout.replicated)
        labels = None if labels is None else put(labels, layout.replicated)
    # The teacher's and aux network's arrays are read by every device.
    teacher, aux = jax.tree.map(
        lambda x: put(x, layout.replicated) if eqx.is_array(x) else x, (teacher, aux)
    )
    problem = Problem(
        method,
        optimizer,
        data,
        labels,
        teacher,
        aux,
        batch_size,
        ema_decay,
        layout,
        devices.accumulate,
        precision,
    )
    fresh = Setup(problem, TrainState(model, model, opt_state, 0, key), shardings)
    return eqx.tree_at(lambda s: s.state, fresh, fresh.placed(fresh.state))


class TrainStep:
    """The training step that [`fmcalc.train.fit`][] compiles, with the state it
    starts from, without the loop around it: to read its cost from the compiled
    program (FLOPs, memory) or to time it.

    ```python
    step = fmcalc.train.TrainStep(method, model, flow.sample, batch_size=256,
                                  key=jax.random.key(0))
    flops = step.compile().cost_analysis()["flops"]
    state, (loss, metrics, checks) = step(step.state)
    ```

    **Arguments:** as for `fit`: `method`, `model`, `data` (an array of rows or a
    function `data(key, n)`), `key`, `batch_size`, and optionally `optimizer`
    (default: Adam at 1e-3, chained after clipping the gradient to norm 1, as
    `fit` clips), `labels`, `teacher`, `aux`, `ema` (default `EMA(decay=0.999)`),
    `devices` (a [`fmcalc.train.Devices`][]) and `steps`, the length of the run the
    step belongs to, which an `EMA(horizon=...)` is a fraction of.

    **Attributes:** `state`, the [`fmcalc.train.TrainState`][] at step 0, laid out
    on the devices; `mesh`, the devices.
    """

    def __init__(
        self,
        method: Method,
        model: PyTree,
        data: Any,
        *,
        key: PRNGKeyArray,
        batch_size: int,
        optimizer: optax.GradientTransformation | None = None,
        labels: Any = None,
        teacher: Any = None,
        aux: Any = None,
        ema: EMA | None = EMA(decay=0.999),
        devices: Devices = Devices(),
        steps: int | None = None,
    ):
        if ema is not None and ema.horizon is not None and steps is None:
            raise ValueError(
                f"`ema={ema!r}` is a fraction of the run: pass the run's length, "
                "`steps=...`, or a fixed `EMA(decay=...)`."
            )
        if optimizer is None:
            optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
        mesh = check_mesh(
            devices.mesh, batch_size, devices.accumulate, devices.shard_params
        )
        built = setup(
            method,
            model,
            data,
            labels,
            key=key,
            batch_size=batch_size,
            optimizer=optimizer,
            teacher=teacher,
            aux=aux,
            ema_decay=None if ema is None else ema.decay_for(steps or 1),
            mesh=mesh,
            devices=devices,
            precision=None,
        )
        self.problem, self.state, self.mesh = built.problem, built.state, mesh

    def compile(self) -> jax.stages.Compiled:
        """The compiled program of one step (`.cost_analysis()`,
        `.memory_analysis()`)."""
        state, layout = self.state, self.problem.layout
        lowered = train_step.lower(  # pyright: ignore[reportFunctionMemberAccess]
            state.model,
            state.ema,
            state.opt_state,
            step_number(0, layout),
            state.key,
            self.problem,
            None,
        )
        return lowered.compile().compiled

    def __call__(self, state: TrainState) -> tuple[TrainState, Any]:
        """One step from `state`: the next state and `(loss, metrics, checks)`,
        still on the devices."""
        updated, outputs = train_step(
            state.model,
            state.ema,
            state.opt_state,
            step_number(state.step, self.problem.layout),
            state.key,
            self.problem,
            None,
        )
        return TrainState(*updated, step=state.step + 1, key=state.key), outputs

    def state_bytes(self, state: TrainState | None = None) -> int:
        """The bytes of the state's arrays that one device holds."""
        state = self.state if state is None else state
        parts = (state.model, state.ema, state.opt_state)
        return sum(x.addressable_shards[0].data.nbytes for x in array_leaves(parts))
