"""Where a run's arrays live: the device mesh, the layout of the batch and of the
training state on it, and moving arrays between hosts and a mesh that may span
several processes."""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import PyTree


def default_mesh() -> Mesh:
    """Every device of every process, on one axis `"data"`."""
    return Mesh(np.asarray(jax.devices()), ("data",))


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def leaf_sharding(x, mesh: Mesh, axis: str | None) -> NamedSharding:
    """Replicated, or with `axis` split along the largest dimension of `x` that it
    divides (the first such one on a tie); arrays with none stay replicated."""
    if axis is None or _is_key(x):
        return NamedSharding(mesh, PartitionSpec())
    size = mesh.shape[axis]
    shape = jnp.shape(x)
    fits = [d for d, n in enumerate(shape) if n % size == 0 and n >= size]
    if not fits:
        return NamedSharding(mesh, PartitionSpec())
    dim = max(fits, key=lambda d: (shape[d], -d))
    spec: list[str | None] = [None] * len(shape)
    spec[dim] = axis
    return NamedSharding(mesh, PartitionSpec(*spec))


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one run lays its arrays out: the batch's rows split over every device
    of `mesh`, and one sharding per array of the state `(model, ema, opt_state)`.
    Hashable, so the compiled step is keyed on it."""

    mesh: Mesh
    shard_params: str | None
    state: tuple[NamedSharding, ...]

    @classmethod
    def of(cls, mesh: Mesh, shard_params: str | None, state: PyTree) -> "Layout":
        shardings = tuple(
            leaf_sharding(x, mesh, shard_params) for x in array_leaves(state)
        )
        return cls(mesh, shard_params, shardings)

    @property
    def rows(self) -> NamedSharding:
        """The batch's leading axis split over all the mesh's axes."""
        return NamedSharding(self.mesh, PartitionSpec(self.mesh.axis_names))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())


def array_leaves(tree: PyTree) -> list:
    return [x for x in jax.tree.leaves(tree) if eqx.is_array(x)]


def map_arrays(fn: Callable, tree: PyTree, shardings: Sequence[Any]) -> PyTree:
    """`tree` with each array leaf `x`, in order, replaced by `fn(x, sharding)`."""
    leaves, treedef = jax.tree.flatten(tree)
    given = iter(shardings)
    out = [fn(x, next(given)) if eqx.is_array(x) else x for x in leaves]
    return jax.tree.unflatten(treedef, out)


def constrain(tree: PyTree, shardings: Sequence[NamedSharding]) -> PyTree:
    """Inside a traced program: pin each array of `tree` to its sharding."""
    return map_arrays(jax.lax.with_sharding_constraint, tree, shardings)


def put(x, sharding: NamedSharding):
    """`x` laid out as `sharding`, which may span several processes. Each process
    passes the same value (a host or local array, or a global array)."""
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.jit(lambda a: a, out_shardings=sharding)(x)
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    if _is_key(x):
        data = put(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda i: host[i])


def place(tree: PyTree, shardings: Sequence[NamedSharding]) -> PyTree:
    return map_arrays(put, tree, shardings)


def fetch(x) -> np.ndarray:
    """The whole value of an array on this host: a collective when its shards
    are spread over several processes, so every process must call it."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def fetch_tree(tree: PyTree) -> PyTree:
    return jax.tree.map(fetch, tree)


def check_mesh(mesh: Any, batch_size: int, accumulate: int, shard_params) -> Mesh:
    """The run's mesh, after checking it can split the batch (and the parameters
    along `shard_params`)."""
    if mesh is None:
        mesh = default_mesh()
    elif not isinstance(mesh, Mesh):
        raise TypeError(
            "`mesh` must be a jax.sharding.Mesh, e.g. "
            "`jax.sharding.Mesh(jax.devices(), ('data',))`, or None for every "
            f"device; got {mesh!r}."
        )
    if shard_params is not None and shard_params not in mesh.axis_names:
        raise ValueError(
            f"`shard_params` must name an axis of the mesh {dict(mesh.shape)} (or be "
            f"None to replicate the parameters); got {shard_params!r}."
        )
    rows, uneven = divmod(batch_size, accumulate)
    step = mesh.size * accumulate
    # Micro-batches that do not divide the batch are refused with the terms' rows.
    if not uneven and rows % mesh.size:
        what = (
            f"batch_size={batch_size}"
            if accumulate == 1
            else f"each of the {accumulate} micro-batches of {rows} rows"
        )
        raise ValueError(
            f"The mesh {dict(mesh.shape)} has {mesh.size} devices, and every device "
            f"takes an equal share of the batch's rows, so {what} must be a multiple "
            f"of {mesh.size}. Use batch_size={_multiple(batch_size, step)}, or "
            "pass `mesh=` with fewer devices."
        )
    return mesh


def _multiple(n: int, k: int) -> int:
    return max(k, (n + k - 1) // k * k)
