"""The checks of a run's data, labels and batch size, and the record of what a
checkpoint's run trained on."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PyTree

from .._batch import NULL_LABEL
from .._method import Method
from .._warnings import DataScaleWarning, warn as warn_from_user
from ._header import defaults, describe, text
from ._stream import Stream


def num_classes(model: PyTree) -> int | None:
    """The number of classes of the label embeddings in `model` (the fewest, if its
    networks differ), or `None` if none says."""

    def says(node) -> bool:
        value = getattr(node, "num_classes", None)
        return isinstance(value, int) and not isinstance(value, bool)

    found = [n.num_classes for n in jax.tree.leaves(model, is_leaf=says) if says(n)]
    return min(found) if found else None


def check_labels(labels: Array, model: PyTree) -> None:
    values = np.asarray(labels)
    classes = num_classes(model)
    known = classes is not None
    bad = (values < 0) & (values != NULL_LABEL)
    if known:
        bad |= values >= classes
    if not bad.any():
        return
    rows = np.flatnonzero(bad)
    allowed = f"[0, {classes})" if known else "[0, num_classes)"
    hint = (
        " (labels 1 to num_classes? subtract 1)"
        if known and values.min() >= 1 and values.max() == classes
        else ""
    )
    raise ValueError(
        f"`labels` must lie in {allowed}, or be fmcalc.NULL_LABEL = {NULL_LABEL} for a "
        f"row without a label; got {values[rows[:5]].tolist()} at rows "
        f"{rows[:5].tolist()}{hint}."
    )


def check_data(data, labels, batch_size: int, method: Method, model: PyTree):
    if not callable(data):
        data = jnp.asarray(data)
        if data.ndim != 2 or data.shape[0] < 1:
            raise ValueError(
                "`data` must be an array of shape (N, dim) with N >= 1, or a "
                f"function `data(key, n)`; got an array of shape {data.shape}."
            )
        if not jnp.issubdtype(data.dtype, jnp.floating):
            raise TypeError(f"`data` must be a floating array; got {data.dtype}.")
        if jnp.finfo(data.dtype).bits < 32:
            raise TypeError(
                f"`data` is {data.dtype}: `fit` draws the noise and the times in the "
                "data's dtype, and a 16-bit float resolves times only to about "
                f"{float(jnp.finfo(data.dtype).eps):.0e}. Pass float32 (or float64) "
                "data; lower precision belongs inside the model."
            )
        finite = np.asarray(data)[np.isfinite(np.asarray(data))]
        scale = float(np.std(finite)) if finite.size else 1.0  # NaN rows: see fit
        if not 0.1 <= scale <= 10:
            warn_from_user(
                f"`data` has an overall standard deviation of {scale:.3g}, far from "
                "the unit scale of the noise N(0, I) it is paired with. Standardise "
                "it, `(data - mean) / std`, and map samples back with `* std + "
                "mean` (fmcalc.datasets.from_file does this for a file).",
                DataScaleWarning,
            )
    if labels is not None:
        if callable(data):
            raise ValueError(
                "`labels` go with an array `data` (one label per row); got a "
                "function `data`. Pass the rows and their labels as arrays."
            )
        labels = jnp.asarray(labels)
        if labels.shape != data.shape[:1]:
            raise ValueError(
                f"`labels` must have shape ({data.shape[0]},), one per row of "
                f"`data`; got shape {labels.shape}."
            )
        if not jnp.issubdtype(labels.dtype, jnp.integer):
            raise TypeError(f"`labels` must be integers; got {labels.dtype}.")
        check_labels(labels, model)
    return data, labels


def check_batch(method: Method, batch_size: int, accumulate: int) -> None:
    """Every term gets rows, and, with `accumulate`, rows that the micro-batches
    can share equally."""
    rows = batch_size * (len(method.terms) if method.split is None else 1)
    counts = method.row_counts(rows)
    for term, count in zip(method.terms, counts, strict=True):
        if count == 0:
            raise ValueError(
                f"With batch_size={batch_size}, the split {method.split} of method "
                f"{method.name!r} gives the term {term.name!r} no rows; use a larger "
                "`batch_size`."
            )
    uneven = [
        f"{term.name!r} {count}"
        for term, count in zip(method.terms, counts, strict=True)
        if count % accumulate
    ]
    if uneven:
        raise ValueError(
            f"With accumulate={accumulate}, every micro-batch takes an equal share of "
            f"each term's rows, but at batch_size={batch_size} method {method.name!r} "
            f"gives its terms {', '.join(uneven)} rows, not multiples of "
            f"{accumulate}. Use a batch size whose split gives every term a multiple "
            f"of {accumulate} rows (e.g. {batch_size * accumulate})."
        )


def describe_data(data, stream: Stream | None, processes: int) -> str:
    if stream is not None:
        # Each process reads its own stream, so its position means nothing to a
        # job of another size.
        return f"stream {text(type(stream.iterator))} read by {processes} process(es)"
    if callable(data):
        return f"function {text(data)}"
    return f"{data.dtype}{list(data.shape)}"


def _method_key(path: str) -> str:
    return "method" + ("" if path == "." else path)


def run_defaults(method: Method) -> dict[str, dict[str, str]]:
    """The defaults of the method's static fields, keyed as in `run_record`: what a
    record written before a field existed is taken to have used."""
    return {_method_key(path): found for path, found in defaults(method).items()}


def run_record(
    method: Method,
    data,
    labels,
    batch_size,
    ema_decay,
    clip_norm,
    stream: Stream | None,
    processes: int,
) -> dict[str, Any]:
    """What must be the same for a checkpoint to continue this run."""
    record: dict[str, Any] = {
        _method_key(path): text for path, text in describe(method).items()
    }
    return record | {
        "batch_size": batch_size,
        "data": describe_data(data, stream, processes),
        "labels": None if labels is None else describe_data(labels, None, processes),
        "ema_decay": ema_decay,
        "clip_norm": clip_norm,
    }
