"""Where a checkpoint lives: one file (`_file.py`) or an orbax directory
(`_orbax.py`). `kind` decides which, for saving and for reading alike; the rest of
this module reads and writes through it."""

import contextlib
import os
import socket
import tempfile
from collections.abc import Iterator
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from jaxtyping import PyTree

from .._parallel import fetch
from . import _file, _orbax
from ._header import CheckpointError
from ._state import TrainState


try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs are not guarded.
    fcntl = None


def kind(path: str, processes: int = 1) -> Literal["file", "directory"]:
    """How the checkpoint at `path` is stored: an existing checkpoint keeps its
    kind; a new one is a file in a run of one process and a directory (each
    process writing its shards) in a run of several."""
    if _orbax.is_directory(path):
        return "directory"
    if processes > 1 and not os.path.isfile(path):
        return "directory"
    return "file"


def checkpoint_header(path: str | os.PathLike) -> dict[str, Any]:
    """The verified header of a checkpoint: what wrote it (`format`, `versions`),
    the saved pytree's structure (`tree`), the step, and the run's record.

    **Arguments:**

    - `path`: a file written by [`fmcalc.train.save_checkpoint`][], or a
      checkpoint directory written by a run of several processes (then the header
      of its newest save).

    **Returns:** the header as a dict.

    **Raises:** [`fmcalc.train.CheckpointError`][] if the file is damaged.
    """
    path = os.fspath(path)
    if kind(path) == "directory":
        return _orbax.header(path, _orbax.saves(path)[0])
    header, _ = _file.read(path)
    return header


def load_checkpoint(path: str | os.PathLike, like: PyTree) -> PyTree:
    """Load a checkpoint written by [`fmcalc.train.save_checkpoint`][] or `fit`.

    The file's checksums are verified, and the structure it records (every module's
    class and static fields, every leaf's dtype and shape) must equal that of `like`.
    Classes that moved between fmcalc's modules since the file was written are
    still the same classes.

    A checkpoint directory, written by a run of several processes, is read too (its
    newest save, whose arrays are checked against their fingerprints): then `like`
    is a [`fmcalc.train.TrainState`][], and each array is laid out as the array of
    `like` it replaces (on one device, or on a mesh; in a job of several
    processes, every process calls it and reads only its shards).

    **Arguments:**

    - `path`: the checkpoint file or directory.
    - `like`: a pytree of the same structure, shapes and dtypes (e.g. a
      [`fmcalc.train.TrainState`][] of the same model and optimiser).

    **Returns:** `like` with the saved values.

    **Raises:** [`fmcalc.train.CheckpointError`][] (a `ValueError`) naming what is
    damaged or what differs.
    """
    path = os.fspath(path)
    if kind(path) == "directory":
        return _orbax.load(path, like)
    header, payload = _file.read(path)
    return _file.restore(path, header, payload, like)


def load_model(path: str | os.PathLike, like: PyTree, *, ema: bool = True) -> PyTree:
    """The model of a checkpoint that `fit` or `fmcalc train` wrote: its EMA
    (default) or its online weights, without the optimiser's state.

    **Arguments:**

    - `path`: the checkpoint file.
    - `like`: a model of the same structure, shapes and dtypes (e.g. the model
      passed to `fit`, freshly initialised).
    - `ema`: `True` for the EMA weights (what `fmcalc train` samples), `False` for
      the online weights.

    **Returns:** `like` with the saved weights.

    **Raises:** [`fmcalc.train.CheckpointError`][] naming what differs or is
    damaged.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(
            f"{path!r} is a checkpoint directory (written by several processes); "
            "`load_model` reads checkpoint files. Load the whole state with "
            "`load_checkpoint(path, like=TrainState(...))` and take its `model` or "
            "`ema`.",
            path=path,
            problems=[],
            damaged=False,
        )
    header, payload = _file.read(path)
    skeleton = TrainState(like, like, (), 0, jax.random.key(0))
    model, average = _file.restore(
        path, header, payload, skeleton, fields=("model", "ema")
    )
    return average if ema else model


def previous(path: str) -> str:
    """Where the save before the newest is kept, for messages."""
    if kind(path) == "directory":
        return f"the save before it in {path!r}"
    return repr(_file.older_path(path, 1))


def check_writable(path: str) -> None:
    """Fail now, not after training, if the checkpoint cannot be written: the path
    is a directory, or a probe file cannot be created next to it."""
    if os.path.isdir(path):
        raise ValueError(
            f"`checkpoint` must be a file path; {path!r} is a directory. Pass a file "
            f"in it, e.g. {os.path.join(path, 'run.eqx')!r}."
        )
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, probe = tempfile.mkstemp(
            prefix=f".{os.path.basename(path)}.", suffix=".probe", dir=directory
        )
        os.close(fd)
        os.remove(probe)
    except OSError as error:
        raise type(error)(
            error.errno,
            f"`fit` cannot write its checkpoint {path!r} ({error.strerror}); pass a "
            "`checkpoint` path in a writable directory. Nothing was trained",
        ) from error


def lock_path(path: str) -> str:
    """The lock file that a run holds beside its checkpoint `path`."""
    return os.path.abspath(path).rstrip(os.sep) + ".lock"


@contextlib.contextmanager
def locked(path: str) -> Iterator[None]:
    """Hold the checkpoint `path` for one run: a second run that asks for it while
    this one holds it is refused with a `CheckpointError` naming the holder.

    The lock is an advisory `flock` on `lock_path(path)`, which the operating
    system releases when the holding process ends, however it ends: a lock left by
    a killed run is free for the next. (Advisory locks on network file systems
    depend on the file system; where `fcntl` is missing, runs are not guarded.)
    """
    if fcntl is None:
        yield
        return
    name = lock_path(path)
    os.makedirs(os.path.dirname(name), exist_ok=True)
    descriptor = os.open(name, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(descriptor, 256).decode(errors="replace").strip()
            raise CheckpointError(
                f"The checkpoint {path!r} is in use by another run "
                f"({holder or 'holder unknown'}, lock {name!r}): two runs saving to "
                "one path would overwrite each other's saves. Wait for it to finish, "
                "or pass another path.",
                path=path,
                problems=[f"locked by {holder}"],
                damaged=False,
            ) from None
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        yield
    finally:
        os.close(descriptor)


def gathered(state: TrainState) -> TrainState:
    """`state` with its arrays whole on this host (a collective: every process
    calls it)."""

    def whole(x):
        if not eqx.is_array(x):
            return x
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = jnp.asarray(fetch(jax.random.key_data(x)))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        return fetch(x)

    return jax.tree.map(whole, state)


def saves(path: str, fresh: TrainState, shardings, stream: bool) -> Iterator:
    """The checkpoints to resume from, newest first: `(name, read)`, where `read()`
    gives the verified header and a function `load(weights_only)` of the state
    (checked against `fresh`; only its model and EMA, on a fresh optimiser at step
    0, if `weights_only`) and the stream's position."""
    if kind(path) == "directory":
        for number in _orbax.saves(path):

            def read(number=number):
                header = _orbax.header(path, number)

                def load(weights_only: bool):
                    fields = ("model", "ema") if weights_only else None
                    parts, position = _orbax.restore(
                        path,
                        number,
                        header,
                        fresh,
                        shardings,
                        fields=fields or ("model", "ema", "opt_state", "key"),
                        stream=stream and not weights_only,
                    )
                    if weights_only:
                        state = TrainState(
                            parts["model"], parts["ema"], fresh.opt_state, 0, fresh.key
                        )
                        return state, None
                    state = TrainState(
                        parts["model"],
                        parts["ema"],
                        parts["opt_state"],
                        header["step"],
                        parts["key"],
                    )
                    return state, position

                return header, load

            yield _orbax.label(path, number), read
        return
    age = 0
    # The newest, the one before it, and any older that `keep` kept.
    while age < 2 or os.path.exists(_file.older_path(path, age)):
        candidate = _file.older_path(path, age)
        age += 1
        if not os.path.exists(candidate):
            continue

        def read_file(candidate=candidate):
            header, payload = _file.read(candidate)

            def load(weights_only: bool):
                if weights_only:
                    model, ema = _file.restore(
                        candidate, header, payload, fresh, fields=("model", "ema")
                    )
                    return TrainState(model, ema, fresh.opt_state, 0, fresh.key), None
                state = _file.restore(candidate, header, payload, fresh)
                return state, header.get("stream")

            return header, load

        yield candidate, read_file


def save(
    path: str,
    state: TrainState,
    record: dict[str, Any],
    position: str | None,
    *,
    keep: int,
    processes: int,
) -> None:
    """Save `state` as the newest checkpoint at `path`, of the kind `kind` says.
    Every process calls it."""
    if kind(path, processes) == "directory":
        _orbax.save(path, state, record, position, keep)
    elif processes == 1:
        if position is not None:
            record = record | {"stream": position}
        _file.save_checkpoint(path, state, record=record, keep=keep)
    else:
        # A file is written by one process, after every process has helped
        # gather the arrays it holds a part of.
        local = gathered(state)
        if jax.process_index() == 0:
            _file.save_checkpoint(path, local, record=record, keep=keep)
        multihost_utils.sync_global_devices(f"fmcalc saved step {state.step}")
