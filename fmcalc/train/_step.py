"""The compiled training step, and the compiled checks that explain a step that
went wrong."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array

from .._batch import Batch
from .._ema import ema_update
from .._method import Method, term_loss
from .._parallel import Layout, constrain, put
from .._precision import Precision
from ._guards import finite, soundness
from ._stream import Stream


class Problem(eqx.Module):
    """The inputs of every step that do not change during training."""

    method: Method
    optimizer: optax.GradientTransformation
    data: Any
    labels: Any
    teacher: Any
    aux: Any
    batch_size: int = eqx.field(static=True)
    ema_decay: float | None = eqx.field(static=True)
    layout: Layout = eqx.field(static=True)
    accumulate: int = eqx.field(static=True)
    precision: Precision | None = eqx.field(static=True)

    def batch(self, key, step, rows=None) -> tuple[Batch, Array | None]:
        """Step `step`'s batch, its rows split over the mesh, and, for an array
        `data`, the indices of its rows. `rows` are the `(x0, labels)` a stream
        gave for this step."""
        k_data, k_batch = jax.random.split(jax.random.fold_in(key, step))
        indices = cond = None
        if rows is not None:
            x0, cond = rows
        elif isinstance(self.data, jax.Array):
            n = self.data.shape[0]
            indices = jax.random.randint(k_data, (self.batch_size,), 0, n)
            x0 = self.data[indices]
            cond = None if self.labels is None else self.labels[indices]
        else:
            x0 = jnp.asarray(self.data(k_data, self.batch_size))
            if x0.ndim != 2 or x0.shape[0] != self.batch_size:
                raise ValueError(
                    f"`data(key, n)` must return an array of shape (n, dim); with "
                    f"n={self.batch_size} it returned shape {x0.shape}."
                )
        rows_sharding = self.layout.rows
        x0 = jax.lax.with_sharding_constraint(x0, rows_sharding)
        batch = self.method.batch(k_batch, x0, cond=cond)
        batch = jax.tree.map(
            lambda a: jax.lax.with_sharding_constraint(a, rows_sharding), batch
        )
        return batch, indices

    def networks(self, model, ema) -> dict[str, Any]:
        if self.ema_decay is None:
            params, static = eqx.partition(model, eqx.is_array)
            ema = eqx.combine(jax.lax.stop_gradient(params), static)
        if self.precision is not None:
            model, ema = self.precision(model), self.precision(ema)
        return {"online": model, "ema": ema, "aux": self.aux}


def micro_batches(a: Array, k: int) -> Array:
    """Rows `a` as `k` micro-batches along a new leading axis, row `r` in
    micro-batch `r % k`: each device's rows then feed every micro-batch, so no
    rows move between devices."""
    return a.reshape(a.shape[0] // k, k, *a.shape[1:]).swapaxes(0, 1)


def accumulated(problem: Problem, model, ema, batch: Batch, step):
    """The loss, metrics and gradient of `batch`, summed over `accumulate`
    micro-batches that each hold an equal share of every term's rows: the same
    sums as one pass over the batch ([`fmcalc.Method.summed_loss`][]), in another
    order."""
    method, k = problem.method, problem.accumulate
    pairs = method.term_rows(batch)
    n_data = method.data_rows(batch.x0.shape[0])
    params = method.params(step)
    terms = [term for term, _ in pairs]
    chunks = [jax.tree.map(lambda a: micro_batches(a, k), rows) for _, rows in pairs]

    def micro_loss(model, chunk):
        return method.summed_loss(
            list(zip(terms, chunk, strict=True)),
            problem.networks(model, ema),
            teacher=problem.teacher,
            params=params,
            n_data=n_data,
        )

    gradient = eqx.filter_value_and_grad(micro_loss, has_aux=True)
    first = gradient(model, jax.tree.map(lambda a: a[0], chunks))

    def body(carry, chunk):
        return jax.tree.map(jnp.add, carry, gradient(model, chunk)), None

    rest = jax.tree.map(lambda a: a[1:], chunks)
    ((loss, sums), grads), _ = jax.lax.scan(body, first, rest)
    counts = {term.name: rows.x0.shape[0] for term, rows in pairs}
    metrics = {
        name: value / counts[name.rpartition("/")[0]] for name, value in sums.items()
    }
    return (loss, metrics), grads


def candidate(model, ema, opt_state, step, key, problem: Problem, rows=None):
    """One step's loss, metrics, gradient and update, before anything is kept."""
    batch, _ = problem.batch(key, step, rows)

    def loss_fn(model):
        networks = problem.networks(model, ema)
        return problem.method.loss(
            networks["online"],
            batch,
            teacher=problem.teacher,
            ema=networks["ema"],
            aux=problem.aux,
            step=step,
        )

    if problem.accumulate == 1:
        gradient = eqx.filter_value_and_grad(loss_fn, has_aux=True)
        (loss, metrics), grads = gradient(model)
    else:
        (loss, metrics), grads = accumulated(problem, model, ema, batch, step)
    params = eqx.filter(model, eqx.is_inexact_array)
    updates, new_opt_state = problem.optimizer.update(grads, opt_state, params)
    new_model = eqx.apply_updates(model, updates)
    if problem.ema_decay is None:
        new_ema = new_model
    else:
        new_ema = ema_update(ema, new_model, problem.ema_decay)
    return loss, metrics, grads, updates, (new_model, new_ema, new_opt_state)


@eqx.filter_jit
def train_step(model, ema, opt_state, step, key, problem: Problem, rows):
    loss, metrics, grads, updates, new = candidate(
        model, ema, opt_state, step, key, problem, rows
    )
    squares = sum((jnp.sum(g**2) for g in jax.tree.leaves(grads)), jnp.zeros(()))
    metrics = {**metrics, "grad_norm": jnp.sqrt(squares)}
    finite_ = jnp.isfinite(loss) & finite(grads)
    sound = jnp.all(jnp.stack([x for x in jax.tree.leaves(soundness(*new))]))
    keep = finite_ & sound
    # A skipped step keeps every array as it was; selecting inside the compiled step
    # avoids a second program for the skip.
    updated = jax.tree.map(
        lambda new, old: jnp.where(keep, new, old) if eqx.is_array(new) else new,
        new,
        (model, ema, opt_state),
    )
    # The state leaves the step laid out as it came in: replicated, or split along
    # `shard_params`, whatever layout the partitioner would prefer.
    updated = constrain(updated, problem.layout.state)
    alignment = sum(
        (
            jnp.vdot(u, g)
            for u, g in zip(
                jax.tree.leaves(updates), jax.tree.leaves(grads), strict=True
            )
        ),
        jnp.zeros(()),
    )
    checks = {"finite": finite_, "sound": sound, "alignment": alignment}
    return updated, (loss, metrics, checks)


@eqx.filter_jit
def update_soundness(problem: Problem, model, ema, opt_state, key, step, rows):
    """Per array, whether step `step`'s update would leave it sound."""
    new = candidate(model, ema, opt_state, step, key, problem, rows)[-1]
    return soundness(*new)


@eqx.filter_jit
def finite_rows(problem: Problem, model, ema, key, step, rows):
    """For each term, whether each of its rows of step `step`'s batch has a finite
    loss and gradient, and the rows' times; and the data rows drawn."""
    batch, indices = problem.batch(key, step, rows)
    params = problem.method.params(step)
    checks = []
    for term, rows in problem.method.term_rows(batch):

        def row(example, term=term):
            def loss(model):
                networks = problem.networks(model, ema)
                return term_loss(term, example, networks, problem.teacher, params)[0]

            value, grads = eqx.filter_value_and_grad(loss)(model)
            return jnp.isfinite(value), finite(grads)

        checks.append((*jax.vmap(row)(rows), rows.s, rows.t))
    return checks, indices


def step_number(step: int, layout: Layout) -> Array:
    """A step number as the compiled step takes it: an array on the run's mesh (a
    Python int would be static, and compile a program per step)."""
    return put(jnp.asarray(step), layout.replicated)


def global_rows(stream: Stream, layout: Layout) -> tuple[Array, Array | None]:
    """The stream's next batch, this process's rows of the global batch."""
    local = stream.next()
    return tuple(  # pyright: ignore[reportReturnType]
        None
        if a is None
        else jax.make_array_from_process_local_data(
            layout.rows, a, (a.shape[0] * jax.process_count(), *a.shape[1:])
        )
        for a in local
    )
