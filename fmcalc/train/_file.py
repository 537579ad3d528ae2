"""The file store: a checkpoint as one file, a verified, self-describing header
and the arrays of a pytree.

A file is `MAGIC | format (u32) | header length (u64) | sha256 of the header |
header (JSON) | payload`. The header records what wrote the file (format, fmcalc,
jax and equinox versions), the payload's length and sha256, and a description of
the saved pytree: every module's class and static fields (an activation function,
a width) and every leaf's path with its dtype and shape (or, for a non-array leaf
such as a function, its name). The payload is the leaves as `.npy` arrays
(`eqx.tree_serialise_leaves`); nothing is pickled.

The header and its checks (`describe`, `differences`) live in `_header.py`, shared
with the orbax store.
"""

import contextlib
import hashlib
import io
import json
import os
import shutil
import struct
import tempfile
import uuid
from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
from jaxtyping import PyTree

from ._header import (
    FORMAT,
    CheckpointError,
    defaults,
    describe,
    differences,
    is_key,
    previous_path,
    versions,
)


_MAGIC = b"FMCALC-CHECKPOINT\n"
_PREAMBLE = struct.Struct("<IQ32s")  # format, header length, header sha256


# ------------------------------------------------------------------- byte format


def _raw_keys(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda x: jax.random.key_data(x) if is_key(x) else x, tree)


def encode(tree: PyTree, record: Mapping[str, Any]) -> bytes:
    """The bytes of a checkpoint of `tree` whose header holds `record` besides the
    format's own fields."""
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, _raw_keys(tree))
    payload = buffer.getvalue()
    header = {
        **record,
        "format": FORMAT,
        "versions": versions(),
        "tree": describe(tree),
        "payload": {
            "bytes": len(payload),
            "sha256": hashlib.sha256(payload).hexdigest(),
        },
    }
    text = json.dumps(header, sort_keys=True).encode()
    preamble = _PREAMBLE.pack(FORMAT, len(text), hashlib.sha256(text).digest())
    return _MAGIC + preamble + text + payload


def _damaged(path: str, problem: str) -> CheckpointError:
    return CheckpointError(
        f"The checkpoint {path!r} is damaged: {problem}. It cannot be loaded; use "
        f"the previous checkpoint {previous_path(path)!r} if there is one, or start "
        "afresh with a new path (or `Checkpoint(path, resume=False)`).",
        path=path,
        problems=[problem],
        damaged=True,
    )


def decode(path: str, contents: bytes) -> tuple[dict[str, Any], bytes]:
    """The header and payload of a checkpoint's bytes, after checking the magic,
    the format, both lengths and both checksums."""
    start = len(_MAGIC) + _PREAMBLE.size
    if not contents.startswith(_MAGIC):
        if contents.startswith(b"\x93NUMPY"):
            problem = (
                "it is a bare array file, as written by fmcalc before checkpoints "
                "had a verified header; it cannot be checked against the model, so "
                "it is not loaded"
            )
        elif len(contents) < len(_MAGIC) and _MAGIC.startswith(contents):
            problem = f"it is truncated to {len(contents)} bytes"
        else:
            problem = (
                f"it does not start with {_MAGIC!r} (it starts with "
                f"{contents[:16]!r}), so it is not a checkpoint written by fmcalc"
            )
        raise _damaged(path, problem)
    if len(contents) < start:
        raise _damaged(path, f"it is truncated to {len(contents)} bytes")
    version, length, checksum = _PREAMBLE.unpack(contents[len(_MAGIC) : start])
    if version != FORMAT:
        raise _damaged(
            path,
            f"its format is {version}, but this fmcalc reads format {FORMAT} (a "
            "newer fmcalc wrote it, or its first bytes are corrupt)",
        )
    text = contents[start : start + length]
    if len(text) != length:
        raise _damaged(
            path,
            f"its header should be {length} bytes but the file ends after "
            f"{len(text)} (truncated, or the header length is corrupt)",
        )
    if hashlib.sha256(text).digest() != checksum:
        raise _damaged(path, "its header does not match its sha256 checksum")
    header = json.loads(text)
    payload = contents[start + length :]
    expected = header["payload"]
    if len(payload) != expected["bytes"]:
        raise _damaged(
            path,
            f"its arrays should take {expected['bytes']} bytes but {len(payload)} "
            "follow the header (truncated or extended)",
        )
    if hashlib.sha256(payload).hexdigest() != expected["sha256"]:
        raise _damaged(path, "its arrays do not match their sha256 checksum")
    return header, payload


def _write_atomically(path: str, contents: bytes, keep: int) -> None:
    """Write `contents` to `path` through a synced temporary file and a rename, after
    keeping the file it replaces as `previous_path(path)` (and the `keep - 2` before
    it), so that a crash at any moment leaves a complete checkpoint under `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, temporary = tempfile.mkstemp(
            prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory
        )
    except OSError as error:
        raise _unwritable(path, error) from error
    try:
        with os.fdopen(fd, "wb") as f:
            # `mkstemp` makes the file private; give it the mode `open` would.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(temporary, 0o666 & ~umask)
            f.write(contents)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(path) and keep > 1:
            _keep_previous(path, directory, keep)
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        if isinstance(error, OSError):
            raise _unwritable(path, error) from error
        raise
    # The renames are durable only once the directory itself is synced.
    with contextlib.suppress(OSError):
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _unwritable(path: str, error: OSError) -> CheckpointError:
    """A save that the file system refused (disk full, file-size limit, no
    permission), with what it refused and what was kept."""
    cause = error.strerror or str(error)
    kept = (
        f"the previous checkpoint {path!r} is kept unchanged"
        if os.path.exists(path)
        else "no earlier checkpoint was there"
    )
    return CheckpointError(
        f"Could not save the checkpoint {path!r}: {cause} (errno {error.errno}); "
        f"{kept}. Free space or raise the limit, or pass another path.",
        path=path,
        problems=[cause],
        damaged=False,
    )


def older_path(path: str, age: int) -> str:
    """Where the file store keeps the save `age` saves before the newest: `path`
    itself (0), `path + ".prev"` (1), `path + ".prev2"` (2), ..."""
    if age == 0:
        return path
    return previous_path(path) + ("" if age == 1 else str(age))


def _keep_previous(path: str, directory: str, keep: int) -> None:
    for age in range(keep - 1, 1, -1):
        if os.path.exists(older_path(path, age - 1)):
            os.replace(older_path(path, age - 1), older_path(path, age))
    # A hard link keeps `path` in place until the new file is renamed over it.
    link = os.path.join(
        directory, f".{os.path.basename(path)}.prev.{uuid.uuid4().hex}.tmp"
    )
    try:
        os.link(path, link)
    except OSError:
        shutil.copyfile(path, link)
    os.replace(link, previous_path(path))


def save_checkpoint(
    path: str | os.PathLike,
    state: PyTree,
    *,
    record: Mapping[str, Any] | None = None,
    keep: int = 2,
) -> None:
    """Save a training state atomically, with a verified header.

    The file holds a header (format version; fmcalc, jax and equinox versions; the
    sha256 and length of the arrays; the pytree's structure with each module's static
    fields and each leaf's dtype and shape; `state.step` when `state` has one; and
    `record`) followed by the arrays. It is written to a temporary file next to
    `path`, synced and renamed onto `path`; the checkpoint it replaces is kept as
    `path + ".prev"` (and, with `keep > 2`, the ones before it as `".prev2"`, ...).
    So an interrupted save leaves both intact, and the last good checkpoint
    survives one bad save.

    **Arguments:**

    - `path`: the checkpoint file; its directory is created if need be.
    - `state`: a [`fmcalc.train.TrainState`][] (or any pytree).
    - `record`: JSON-serialisable facts about the run, stored in the header and
      returned by [`fmcalc.train.checkpoint_header`][] (`fit` stores the method,
      batch size and data there).
    - `keep`: how many saves to keep at `path`, the newest and the `keep - 1`
      before it (default 2: `path` and `path + ".prev"`).

    **Returns:** nothing.
    """
    path = os.fspath(path)
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"`keep` must be an integer >= 1; got keep={keep!r}.")
    if os.path.isdir(path):
        raise IsADirectoryError(
            f"The checkpoint path {path!r} is a directory; pass a file path such as "
            f"{os.path.join(path, 'run.eqx')!r}."
        )
    header = dict(record or {})
    step = getattr(state, "step", None)
    if isinstance(step, int):
        header["step"] = step
    _write_atomically(path, encode(state, header), keep)


def read(path: str) -> tuple[dict[str, Any], bytes]:
    """The verified header and the payload of the checkpoint file `path`."""
    with open(path, "rb") as f:
        return decode(path, f.read())


def restore(
    path: str,
    header: Mapping[str, Any],
    payload: bytes,
    like: PyTree,
    *,
    fields: tuple[str, ...] | None = None,
) -> PyTree:
    """The pytree a decoded checkpoint holds, after checking that it was written for
    one of the same structure as `like`. With `fields`, only those leading fields of
    the module `like` are compared and read (e.g. a state's model and EMA)."""
    expected, found = describe(like), header["tree"]
    target = like
    if fields is not None:

        def keep(key: str) -> bool:
            return any(
                key == f".{f}" or key.startswith((f".{f}.", f".{f}[")) for f in fields
            )

        expected = {k: v for k, v in expected.items() if keep(k)}
        found = {k: v for k, v in found.items() if keep(k)}
        target = tuple(getattr(like, f) for f in fields)
    problems = differences(found, expected, defaults=defaults(like))
    if problems:
        raise CheckpointError(
            f"The checkpoint {path!r} was written for another model or optimiser: "
            + "; ".join(problems)
            + ". Pass the model and optimiser it was written with, or a new path "
            "(or `Checkpoint(path, resume=False)`) to start afresh.",
            path=path,
            problems=problems,
            damaged=False,
        )
    # The leaves are stored in order, so a leading part of them reads on its own.
    loaded = eqx.tree_deserialise_leaves(io.BytesIO(payload), _raw_keys(target))
    return jax.tree.map(
        lambda new, old: (
            jax.random.wrap_key_data(new, impl=jax.random.key_impl(old))
            if is_key(old)
            else new
        ),
        loaded,
        target,
    )
