"""The header every checkpoint carries, whatever its store: what wrote it, the
structure of the saved pytree (`describe`), the run that wrote it, and how two
such records differ (`differences`). The file store (`_file.py`) and the orbax
store (`_orbax.py`) both write it and check it the same way."""

import dataclasses
import functools
import importlib.metadata
import json
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PyTree


FORMAT = 1
# Reprs of functions and objects carry their memory address, which differs between
# processes; descriptions must not.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
# `fmcalc._train.TrainState`, `fmcalc.train._state.TrainState`: module paths
# inside fmcalc, which a refactor may change.
_MODULE_PATH = re.compile(r"\bfmcalc(?:\.\w+)*\.(\w+)\b")


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


def is_key(x) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _leaftext(leaf: Any) -> str:
    if is_key(leaf):
        return f"key<{jax.random.key_impl(leaf)}>{list(leaf.shape)}"
    if eqx.is_array(leaf):
        return f"{leaf.dtype}{list(leaf.shape)}"
    # Python numbers are data (a step count), saved with the arrays: their type is
    # part of the structure, their value is not.
    if isinstance(leaf, bool | int | float | complex):
        return type(leaf).__name__
    return text(leaf)


def _modules(tree: PyTree, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every module in `tree` and every leaf outside a module's own fields, with
    its path: the entries of a description."""

    def visit(prefix: str, node: Any) -> Iterator[tuple[str, Any]]:
        if isinstance(node, eqx.Module):
            yield prefix or ".", node
        leaves, _ = jax.tree_util.tree_flatten_with_path(
            node, is_leaf=lambda x: x is not node and isinstance(x, eqx.Module)
        )
        for path, leaf in leaves:
            where = prefix + jax.tree_util.keystr(path)
            if isinstance(leaf, eqx.Module) and leaf is not node:
                yield from visit(where, leaf)
            else:
                yield where or ".", leaf

    return visit(prefix, tree)


def _static(module: eqx.Module) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(module) if f.metadata.get("static", False)]


def describe(tree: PyTree) -> dict[str, str]:
    """The structure of `tree`, path by path: each module's class and static fields,
    and each leaf's dtype and shape (or, for a non-array leaf, its name).

    Two trees with equal descriptions can exchange their leaves; a different
    activation function or width shows up even when every array has the same shape.
    """
    found: dict[str, str] = {}
    for where, node in _modules(tree):
        if isinstance(node, eqx.Module):
            static = ", ".join(
                f"{field.name}={text(getattr(node, field.name))}"
                for field in _static(node)
            )
            kind = type(node)
            found[where] = f"{kind.__module__}.{kind.__qualname__}({static})"
        else:
            found[where] = _leaftext(node)
    return found


def defaults(tree: PyTree) -> dict[str, dict[str, str]]:
    """For each module in `tree` (keyed as in [`describe`][]), the default of each
    static field that has one, as `describe` writes it.

    A field added to a class after a checkpoint was written is missing from the
    checkpoint's description; [`differences`][] counts it as the same run only
    while the field holds its default.
    """
    found: dict[str, dict[str, str]] = {}
    for where, node in _modules(tree):
        if isinstance(node, eqx.Module):
            found[where] = {}
            for field in _static(node):
                if field.default is not dataclasses.MISSING:
                    found[where][field.name] = text(field.default)
                elif field.default_factory is not dataclasses.MISSING:
                    found[where][field.name] = text(field.default_factory())
    return found


def differences(
    found: Mapping[str, Any],
    expected: Mapping[str, Any],
    *,
    defaults: Mapping[str, Mapping[str, str]] | None = None,
    limit: int = 5,
) -> list[str]:
    """How the record `found` (read from a file) differs from `expected`, one line
    per entry, at most `limit` lines (and a count of the rest).

    With `defaults` (from [`defaults`][] of the tree `expected` describes), a module
    that `found` records without some of its static fields is the same module when
    each missing field holds its default here: the field was added after `found` was
    written, and its default is what the code of that time did.
    """
    defaults = defaults or {}

    def quote(value: Any) -> str:
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        return text if len(text) <= 160 else text[:150] + " ..."

    lines = []
    # In the order of `expected` (a tree's own order), then what only `found` has.
    for key in [*expected, *(k for k in found if k not in expected)]:
        there, here = found.get(key), expected.get(key)
        if _same(there, here, defaults.get(key, {})):
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


def _same(there: Any, here: Any, defaults: Mapping[str, str]) -> bool:
    there, here = _moved(there), _moved(here)
    if there == here:
        return True
    if not (defaults and isinstance(there, str) and isinstance(here, str)):
        return False
    old, new = _call(there), _call(here)
    if old is None or new is None or old[0] != new[0]:
        return False
    (_, before), (_, now) = old, new
    return all(k in now and now[k] == v for k, v in before.items()) and all(
        k in defaults and defaults[k] == v for k, v in now.items() if k not in before
    )


def _call(text: str) -> tuple[str, dict[str, str]] | None:
    """`"a.B(x=1, y=(2, 3))"` as `("a.B", {"x": "1", "y": "(2, 3)"})`; None for any
    other text."""
    match = re.fullmatch(r"([\w.]+)\((.*)\)", text, flags=re.DOTALL)
    if match is None:
        return None
    name, inside = match.groups()
    parts, depth, quote, start, i = [], 0, None, 0, 0
    while i < len(inside):
        c = inside[i]
        if quote is not None:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(inside[start:i])
            start = i + 1
        i += 1
    if inside.strip():
        parts.append(inside[start:])
    fields = {}
    for part in parts:
        key, equals, value = part.strip().partition("=")
        if not equals or not key.isidentifier():
            return None
        fields[key] = value
    return name, fields


def _moved(value: Any) -> Any:
    """`value` with fmcalc's module paths reduced to the package: a class or
    function moved between fmcalc's private modules (`fmcalc._train.TrainState`,
    now `fmcalc.train._state.TrainState`) is still the same thing."""
    if isinstance(value, str):
        return _MODULE_PATH.sub(r"fmcalc.\1", value)
    return value


def versions() -> dict[str, str]:
    return {
        name: importlib.metadata.version(name) for name in ("fmcalc", "jax", "equinox")
    }
