"""The orbax store: checkpoint directories written with orbax-checkpoint, for
runs whose state is spread over several processes.

A directory holds the last saves (two by default), numbered in the order they
were made, each finalised atomically by orbax (written under a temporary name,
renamed once every process has written its shards), so the save before the last
is what `.prev` is to a checkpoint file. Each save holds the state's arrays,
written by the processes that hold them, with a JSON header written once: the
same record as a checkpoint file's (what wrote it, the run, the pytree's
structure from `describe`) and a 64-bit fingerprint of every array, computed by
the devices from the array's bits, whatever its layout; a restore recomputes
them. Each process's position in a stream of batches is kept with grain's
per-process handler.
"""

import dataclasses
import functools
import glob
import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PyTree

from .._parallel import fetch
from ._header import (
    FORMAT,
    CheckpointError,
    defaults,
    describe,
    differences,
    versions,
)


_PARTS = ("model", "ema", "opt_state")
_NUMBER = bool | int | float


def is_directory(path: str) -> bool:
    """Whether `path` is a checkpoint directory: one with a committed save whose
    header orbax wrote."""
    if not os.path.isdir(path):
        return False
    return any(
        name.isdigit() and os.path.isdir(os.path.join(path, name, "header"))
        for name in os.listdir(path)
    )


# --------------------------------------------------------------------- fingerprint


def _mix(h: Array) -> Array:
    """murmur3's 32-bit finaliser: every input bit moves every output bit."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x: Array) -> Array:
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    if x.dtype.itemsize >= 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    unsigned = jnp.uint16 if x.dtype.itemsize == 2 else jnp.uint8
    return jax.lax.bitcast_convert_type(x, unsigned).reshape(-1).astype(jnp.uint32)


@jax.jit
def _fingerprints(leaves: list[Array]) -> Array:
    """Two 32-bit lanes per array: a sum over its words of a hash of the word and
    its position. Integer sums wrap, so the order in which devices add them up,
    and so the array's layout, does not change the result."""
    rows = []
    for x in leaves:
        words = _words(x)
        position = jax.lax.iota(jnp.uint32, words.size)
        lanes = [
            # In uint32 whether or not 64-bit types are enabled.
            jnp.sum(
                _mix(words ^ _mix(position * jnp.uint32(0x9E3779B9) + seed)),
                dtype=jnp.uint32,
            )
            for seed in (jnp.uint32(0x243F6A88), jnp.uint32(0x85A308D3))
        ]
        rows.append(jnp.stack(lanes))
    return jnp.stack(rows) if rows else jnp.zeros((0, 2), jnp.uint32)


def fingerprints(leaves: list[Array]) -> list[str]:
    return [f"{int(a):08x}{int(b):08x}" for a, b in fetch(_fingerprints(leaves))]


# ------------------------------------------------------------------------- storage


@functools.cache
def _orbax():
    import grain
    import orbax.checkpoint as ocp

    return ocp, grain


def _manager(path: str, keep: int = 2):
    ocp, grain = _orbax()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=False,
        create=True,
        cleanup_tmp_directories=True,
    )
    handlers = {
        **{part: ocp.StandardCheckpointHandler() for part in (*_PARTS, "key")},
        "header": ocp.JsonCheckpointHandler(),
        "data": grain.checkpoint.CheckpointHandler(),
    }
    return ocp.CheckpointManager(
        os.path.abspath(path), options=options, item_handlers=handlers
    )


class _Position:
    """A stream's position as grain's handler reads and writes it: per process."""

    def __init__(self, text: str = ""):
        self.text = text

    def get_state(self) -> bytes:
        return self.text.encode()

    def set_state(self, state: bytes) -> None:
        self.text = state.decode()

    def start_prefetch(self) -> None:
        pass


def _split(state) -> tuple[dict[str, list[Array]], dict[str, list]]:
    """The arrays of each part of a state, and its Python numbers."""
    arrays: dict[str, list[Array]] = {}
    numbers: dict[str, list] = {}
    for part in _PARTS:
        leaves = jax.tree.leaves(getattr(state, part))
        arrays[part] = [x for x in leaves if eqx.is_array(x)]
        numbers[part] = [x for x in leaves if isinstance(x, _NUMBER)]
    arrays["key"] = [jax.random.key_data(state.key)]
    return arrays, numbers


def save(
    path: str, state, record: dict[str, Any], position: str | None, keep: int = 2
) -> None:
    """Save `state` (a `TrainState` on any mesh) as the newest checkpoint in the
    directory `path`, which keeps the `keep` newest saves. Every process calls
    it."""
    ocp, grain = _orbax()
    arrays, numbers = _split(state)
    header = {
        **record,
        "format": FORMAT,
        "versions": versions(),
        "tree": describe(state),
        "step": state.step,
        "numbers": numbers,
        "fingerprints": {part: fingerprints(leaves) for part, leaves in arrays.items()},
    }
    items = {
        part: ocp.args.StandardSave(leaves) for part, leaves in arrays.items() if leaves
    }
    items["header"] = ocp.args.JsonSave(header)
    if position is not None:
        items["data"] = grain.checkpoint.CheckpointSave(_Position(position))
    with _manager(path, keep) as manager:
        latest = manager.latest_step()
        number = 0 if latest is None else latest + 1
        try:
            manager.save(number, args=ocp.args.Composite(**items))
        except Exception as error:  # noqa: BLE001 - orbax reports a refused write as any error
            _discard(path, number)
            raise _unwritable(path, number, error) from error


def _discard(path: str, number: int, settle: float = 0.2, limit: float = 10.0) -> None:
    """Remove the unfinished save `number` of a refused save, until it has stayed
    gone for `settle` seconds (or `limit` seconds have passed).

    Orbax raises on the first failed write while the others are still in flight
    and may recreate their folders; left to orbax's clean-up when the directory is
    next opened, their removal races with those writes and that save fails too."""
    pattern = os.path.join(
        glob.escape(os.path.abspath(path)), f"{number}.orbax-checkpoint-tmp*"
    )
    start = quiet = time.monotonic()
    while time.monotonic() - start < limit:
        unfinished = glob.glob(pattern)
        for tree in unfinished:
            shutil.rmtree(tree, ignore_errors=True)
        now = time.monotonic()
        if unfinished:
            quiet = now
        elif now - quiet >= settle:
            return
        time.sleep(0.02)


def _unwritable(path: str, number: int, error: Exception) -> CheckpointError:
    """A save that the storage refused (disk full, file-size limit, no
    permission), with the earlier saves kept and the unfinished one removed."""
    text = str(error)
    found = re.search(r": ([^:\[\]]+) \[os_error_code='(\d+)'\]", text)
    cause = (
        f"{found.group(1)} (errno {found.group(2)})"
        if found
        else (text.splitlines() or [type(error).__name__])[0][:300]
    )
    kept = sorted(
        int(name) for name in os.listdir(path) if name.isdigit() and name != str(number)
    )
    where = (
        f"the earlier saves {kept} are kept" if kept else "no earlier save was there"
    )
    return CheckpointError(
        f"Could not save the checkpoint directory {path!r}: {cause}; {where}. "
        "Free space or raise the limit, or pass another path.",
        path=path,
        problems=[cause],
        damaged=False,
    )


def saves(path: str) -> list[int]:
    """The saves in the directory, newest first."""
    with _manager(path) as manager:
        return sorted(manager.all_steps(), reverse=True)


def label(path: str, save: int) -> str:
    return os.path.join(path, str(save))


def _damaged(path: str, save: int, problem: str) -> CheckpointError:
    where = label(path, save)
    return CheckpointError(
        f"The checkpoint {where!r} is damaged: {problem}. It cannot be loaded; the "
        f"directory {path!r} keeps the save before it, if there is one, or start "
        "afresh with a new path (or `Checkpoint(path, resume=False)`).",
        path=where,
        problems=[problem],
        damaged=True,
    )


def header(path: str, save: int) -> dict[str, Any]:
    ocp, _ = _orbax()
    try:
        with _manager(path) as manager:
            restored = manager.restore(
                save, args=ocp.args.Composite(header=ocp.args.JsonRestore())
            )
    except Exception as error:  # noqa: BLE001 - any failure to read is damage
        raise _damaged(path, save, f"its header cannot be read ({error})") from error
    found = restored["header"]
    if not isinstance(found, dict) or found.get("format") != FORMAT:
        raise _damaged(path, save, f"its header is not format {FORMAT}")
    return found


def restore(
    path: str,
    save: int,
    found: dict[str, Any],
    like,
    shardings: Mapping[str, Sequence[Any]],
    *,
    fields: tuple[str, ...] = (*_PARTS, "key"),
    stream: bool = False,
) -> tuple[dict[str, Any], str | None]:
    """The parts `fields` of the state a save holds, laid out as `shardings` (per
    part, one per array of `like`'s part), after checking its structure against
    `like` and its arrays against their fingerprints; and this process's stream
    position if `stream`."""
    expected = describe(like)
    keep = lambda key: any(  # noqa: E731
        key == f".{f}" or key.startswith((f".{f}.", f".{f}[")) for f in fields
    )
    problems = differences(
        {k: v for k, v in found["tree"].items() if keep(k)},
        {k: v for k, v in expected.items() if keep(k)},
        defaults=defaults(like),
    )
    if problems:
        raise CheckpointError(
            f"The checkpoint {label(path, save)!r} was written for another model or "
            "optimiser: "
            + "; ".join(problems)
            + ". Pass the model and optimiser it was written with, or a new path "
            "(or `Checkpoint(path, resume=False)`) to start afresh.",
            path=label(path, save),
            problems=problems,
            damaged=False,
        )
    ocp, grain = _orbax()
    templates, _ = _split(like)
    items: dict[str, Any] = {}
    for part in fields:
        abstract = [
            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
            for x, sharding in zip(templates[part], shardings[part], strict=True)
        ]
        if abstract:
            items[part] = ocp.args.StandardRestore(abstract)
    position = _Position()
    if stream:
        items["data"] = grain.checkpoint.CheckpointRestore(position)
    try:
        with _manager(path) as manager:
            restored = manager.restore(save, args=ocp.args.Composite(**items))
    except Exception as error:  # noqa: BLE001 - any failure to read is damage
        raise _damaged(path, save, f"its arrays cannot be read ({error})") from error
    out: dict[str, Any] = {}
    for part in fields:
        leaves = list(restored[part]) if part in items else []
        if fingerprints(leaves) != found["fingerprints"][part]:
            raise _damaged(
                path, save, f"the arrays of its {part} do not match their fingerprints"
            )
        if part == "key":
            impl = jax.random.key_impl(like.key)
            out[part] = jax.random.wrap_key_data(leaves[0], impl=impl)
            continue
        out[part] = _refill(getattr(like, part), leaves, found["numbers"][part])
    return out, (position.text if stream else None)


def load(path: str, like) -> Any:
    """The newest save of the directory `path`, as [`fmcalc.train.load_checkpoint`][]
    reads it: `like` (a `TrainState`) with the saved values, each array laid out
    as the array of `like` it replaces."""
    if not all(hasattr(like, f) for f in (*_PARTS, "step", "key")):
        raise TypeError(
            f"The checkpoint {path!r} is a directory of training states; pass "
            "`like=` a fmcalc.train.TrainState of the same model and optimiser, "
            f"not {type(like).__name__}."
        )
    newest = saves(path)[0]
    found = header(path, newest)
    layouts, _ = _split(like)
    shardings = {
        part: [_sharding_of(x) for x in leaves] for part, leaves in layouts.items()
    }
    parts, _ = restore(path, newest, found, like, shardings)
    return dataclasses.replace(like, **parts, step=found["step"])


def _sharding_of(x) -> jax.sharding.Sharding:
    if isinstance(x, jax.Array):
        return x.sharding
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _refill(like: PyTree, arrays: list, numbers: list) -> PyTree:
    """`like` with its arrays, then its Python numbers, replaced in order."""
    arrays_, numbers_ = iter(arrays), iter(numbers)

    def refill(x):
        if eqx.is_array(x):
            return next(arrays_)
        return next(numbers_) if isinstance(x, _NUMBER) else x

    return jax.tree.map(refill, like)
