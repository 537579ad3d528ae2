"""Checkpoint files: a verified, self-describing header and the arrays of a pytree.

A file is `MAGIC | format (u32) | header length (u64) | sha256 of the header |
header (JSON) | payload`. The header records what wrote the file (format, fmcalc,
jax and equinox versions), the payload's length and sha256, and a description of
the saved pytree: every module's class and static fields (an activation function,
a width) and every leaf's path with its dtype and shape (or, for a non-array leaf
such as a function, its name). The payload is the leaves as `.npy` arrays
(`eqx.tree_serialise_leaves`); nothing is pickled.

The byte format (`encode`, `decode`) is kept apart from the verification
(`describe`, `differences`), so the same checks apply to another storage backend.
"""

import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import io
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PyTree

from . import _checkpoint_orbax


FORMAT = 1
_MAGIC = b"FMCALC-CHECKPOINT\n"
_PREAMBLE = struct.Struct("<IQ32s")  # format, header length, header sha256
# Reprs of functions and objects carry their memory address, which differs between
# processes; descriptions must not.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: damaged, or written for another model,
    method or run.

    **Attributes:** `path` (the file), `problems` (one line per thing found wrong)
    and `damaged` (whether the file itself is corrupt or truncated, as opposed to
    intact but written for something else).
    """

    def __init__(self, message: str, *, path: str, problems: list[str], damaged: bool):
        super().__init__(message)
        self.path, self.problems, self.damaged = path, problems, damaged


def previous_path(path: str | os.PathLike) -> str:
    """Where [`fmcalc.train.save_checkpoint`][] keeps the checkpoint it replaced."""
    return os.fspath(path) + ".prev"


# ------------------------------------------------------------------- description


def text(value: Any) -> str:
    """A description of a non-array value that is the same in every process."""
    if isinstance(value, functools.partial):
        args = [text(a) for a in value.args]
        args += [f"{k}={text(v)}" for k, v in value.keywords.items()]
        return f"partial({', '.join([text(value.func), *args])})"
    name = getattr(value, "__qualname__", None)
    module = getattr(value, "__module__", None)
    if callable(value) and isinstance(name, str) and isinstance(module, str):
        return f"{module}.{name}"
    return _ADDRESS.sub("", repr(value))


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _leaftext(leaf: Any) -> str:
    if _is_key(leaf):
        return f"key<{jax.random.key_impl(leaf)}>{list(leaf.shape)}"
    if eqx.is_array(leaf):
        return f"{leaf.dtype}{list(leaf.shape)}"
    # Python numbers are data (a step count), saved with the arrays: their type is
    # part of the structure, their value is not.
    if isinstance(leaf, bool | int | float | complex):
        return type(leaf).__name__
    return text(leaf)


def describe(tree: PyTree) -> dict[str, str]:
    """The structure of `tree`, path by path: each module's class and static fields,
    and each leaf's dtype and shape (or, for a non-array leaf, its name).

    Two trees with equal descriptions can exchange their leaves; a different
    activation function or width shows up even when every array has the same shape.
    """
    found: dict[str, str] = {}

    def visit(prefix: str, node: Any) -> None:
        if isinstance(node, eqx.Module):
            static = ", ".join(
                f"{field.name}={text(getattr(node, field.name))}"
                for field in dataclasses.fields(node)
                if field.metadata.get("static", False)
            )
            kind = type(node)
            found[prefix or "."] = f"{kind.__module__}.{kind.__qualname__}({static})"
        leaves, _ = jax.tree_util.tree_flatten_with_path(
            node, is_leaf=lambda x: x is not node and isinstance(x, eqx.Module)
        )
        for path, leaf in leaves:
            where = prefix + jax.tree_util.keystr(path)
            if isinstance(leaf, eqx.Module) and leaf is not node:
                visit(where, leaf)
            else:
                found[where or "."] = _leaftext(leaf)

    visit("", tree)
    return found


def differences(
    found: Mapping[str, Any], expected: Mapping[str, Any], *, limit: int = 5
) -> list[str]:
    """How the record `found` (read from a file) differs from `expected`, one line
    per entry, at most `limit` lines (and a count of the rest)."""

    def quote(value: Any) -> str:
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        return text if len(text) <= 160 else text[:150] + " ..."

    lines = []
    # In the order of `expected` (a tree's own order), then what only `found` has.
    for key in [*expected, *(k for k in found if k not in expected)]:
        there, here = found.get(key), expected.get(key)
        if there == here:
            continue
        if key not in found:
            lines.append(f"`{key}` ({quote(here)}) is missing there")
        elif key not in expected:
            lines.append(f"`{key}` ({quote(there)}) is there but not here")
        else:
            lines.append(f"`{key}` is {quote(there)} there but {quote(here)} here")
    if len(lines) > limit:
        lines = [*lines[:limit], f"and {len(lines) - limit} more differences"]
    return lines


def _versions() -> dict[str, str]:
    return {
        name: importlib.metadata.version(name) for name in ("fmcalc", "jax", "equinox")
    }


# ------------------------------------------------------------------- byte format


def _raw_keys(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def encode(tree: PyTree, record: Mapping[str, Any]) -> bytes:
    """The bytes of a checkpoint of `tree` whose header holds `record` besides the
    format's own fields."""
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, _raw_keys(tree))
    payload = buffer.getvalue()
    header = {
        **record,
        "format": FORMAT,
        "versions": _versions(),
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
        "afresh with a new path (or `resume=False`).",
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


def _write_atomically(path: str, contents: bytes) -> None:
    """Write `contents` to `path` through a synced temporary file and a rename, after
    keeping the file it replaces as `previous_path(path)`, so that a crash at any
    moment leaves a complete checkpoint under `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, temporary = tempfile.mkstemp(
        prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory
    )
    try:
        with os.fdopen(fd, "wb") as f:
            # `mkstemp` makes the file private; give it the mode `open` would.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(temporary, 0o666 & ~umask)
            f.write(contents)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(path):
            _keep_previous(path, directory)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise
    # The renames are durable only once the directory itself is synced.
    with contextlib.suppress(OSError):
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _keep_previous(path: str, directory: str) -> None:
    # A hard link keeps `path` in place until the new file is renamed over it.
    link = os.path.join(directory, f".{os.path.basename(path)}.prev.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.remove(link)
    try:
        os.link(path, link)
    except OSError:
        shutil.copyfile(path, link)
    os.replace(link, previous_path(path))


# ---------------------------------------------------------------------- public


def save_checkpoint(
    path: str | os.PathLike, state: PyTree, *, record: Mapping[str, Any] | None = None
) -> None:
    """Save a training state atomically, with a verified header.

    The file holds a header (format version; fmcalc, jax and equinox versions; the
    sha256 and length of the arrays; the pytree's structure with each module's static
    fields and each leaf's dtype and shape; `state.step` when `state` has one; and
    `record`) followed by the arrays. It is written to a temporary file next to
    `path`, synced and renamed onto `path`; the checkpoint it replaces is kept as
    `path + ".prev"`. So an interrupted save leaves both intact, and the last good
    checkpoint survives one bad save.

    **Arguments:**

    - `path`: the checkpoint file; its directory is created if need be.
    - `state`: a [`fmcalc.train.TrainState`][] (or any pytree).
    - `record`: JSON-serialisable facts about the run, stored in the header and
      returned by [`fmcalc.train.checkpoint_header`][] (`fit` stores the method,
      batch size and data there).

    **Returns:** nothing.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(
            f"The checkpoint path {path!r} is a directory; pass a file path such as "
            f"{os.path.join(path, 'run.eqx')!r}."
        )
    header = dict(record or {})
    step = getattr(state, "step", None)
    if isinstance(step, int):
        header["step"] = step
    _write_atomically(path, encode(state, header))


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
    if _checkpoint_orbax.is_directory(path):
        return _checkpoint_orbax.header(path, _checkpoint_orbax.saves(path)[0])
    with open(path, "rb") as f:
        header, _ = decode(path, f.read())
    return header


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
    problems = differences(found, expected)
    if problems:
        raise CheckpointError(
            f"The checkpoint {path!r} was written for another model or optimiser: "
            + "; ".join(problems)
            + ". Pass the model and optimiser it was written with, or a new path "
            "(or `resume=False`) to start afresh.",
            path=path,
            problems=problems,
            damaged=False,
        )
    # The leaves are stored in order, so a leading part of them reads on its own.
    loaded = eqx.tree_deserialise_leaves(io.BytesIO(payload), _raw_keys(target))
    return jax.tree.map(
        lambda new, old: (
            jax.random.wrap_key_data(new, impl=jax.random.key_impl(old))
            if _is_key(old)
            else new
        ),
        loaded,
        target,
    )


def load_checkpoint(path: str | os.PathLike, like: PyTree) -> PyTree:
    """Load a checkpoint written by [`fmcalc.train.save_checkpoint`][].

    The file's checksums are verified, and the structure it records (every module's
    class and static fields, every leaf's dtype and shape) must equal that of `like`.

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
    if _checkpoint_orbax.is_directory(path):
        return _checkpoint_orbax.load(path, like)
    with open(path, "rb") as f:
        header, payload = decode(path, f.read())
    return restore(path, header, payload, like)
