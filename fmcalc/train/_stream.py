"""Training data that arrives as a stream of batches, with a position that a
checkpoint keeps so that a resumed run reads on from where the run stopped."""

import json
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np


def is_stream(data: Any) -> bool:
    """Whether `data` is an iterable of batches rather than an array (or a
    sampling function)."""
    return (
        isinstance(data, Iterable)
        and not callable(data)
        and not hasattr(data, "__array__")
        and not isinstance(data, list | tuple | str | bytes)
    )


class Stream:
    """The batches of `data`, one per step: each is this process's `rows` rows,
    an array `x0` of shape `(rows, dim)` or a pair `(x0, labels)`.

    The position in the stream is the iterator's own state when it has one
    (`get_state`/`set_state`, as grain's iterators do), else the number of
    batches drawn: a resumed run is then given the stream from its start and
    skips what the checkpointed run consumed.
    """

    def __init__(self, data: Iterable, rows: int):
        self.iterator: Iterator = iter(data)
        self.rows = rows
        self.drawn = 0
        self.dim: int | None = None
        self.labelled: bool | None = None
        self.positions: dict[int, str] = {}

    @property
    def stateful(self) -> bool:
        return callable(getattr(self.iterator, "get_state", None)) and callable(
            getattr(self.iterator, "set_state", None)
        )

    def position(self) -> str:
        """Where the stream stands now, as JSON text."""
        state = self.iterator.get_state() if self.stateful else None  # pyright: ignore[reportAttributeAccessIssue]
        if isinstance(state, bytes):
            state = {"bytes": state.decode()}
        return json.dumps({"drawn": self.drawn, "state": state}, sort_keys=True)

    def position_at(self, drawn: int) -> str:
        """The position after `drawn` batches (the state of a run at that step)."""
        return self.position() if drawn == self.drawn else self.positions[drawn]

    def seek(self, position: str) -> None:
        """Move to `position`, written by `position()` of the same stream."""
        saved = json.loads(position)
        state = saved["state"]
        if state is not None and self.stateful:
            if isinstance(state, dict) and set(state) == {"bytes"}:
                state = state["bytes"].encode()
            self.iterator.set_state(state)  # pyright: ignore[reportAttributeAccessIssue]
        elif state is not None:
            raise ValueError(
                "The checkpoint's run read its data from an iterator with a state "
                "(`get_state`/`set_state`), but this `data` has none; pass the same "
                "kind of iterator to resume it."
            )
        else:
            for _ in range(saved["drawn"] - self.drawn):
                self._next()
        self.drawn = saved["drawn"]

    def _next(self) -> Any:
        try:
            return next(self.iterator)
        except StopIteration:
            raise ValueError(
                f"`data` ran out after {self.drawn} batches; an iterable `data` must "
                "yield one batch per step (repeat it for several epochs)."
            ) from None

    def next(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The next batch as `(x0, labels)`, checked."""
        self.positions[self.drawn] = self.position()
        # The run saves at most a few steps behind the last batch drawn.
        self.positions.pop(self.drawn - 8, None)
        item = self._next()
        self.drawn += 1
        labels = None
        if isinstance(item, tuple | list) and len(item) == 2:
            item, labels = item
        x0 = np.asarray(item)
        shape = (self.rows, x0.shape[-1] if self.dim is None else self.dim)
        if x0.shape != shape:
            want = f"({self.rows}, {'dim' if self.dim is None else self.dim})"
            raise ValueError(
                f"Batch {self.drawn - 1} of `data` has shape {x0.shape}; each batch "
                f"must be this process's {self.rows} rows of shape {want}, or a pair "
                "`(x0, labels)`."
            )
        if not np.issubdtype(x0.dtype, np.floating) or x0.dtype.itemsize < 4:
            raise TypeError(
                f"Batch {self.drawn - 1} of `data` is {x0.dtype}; pass float32 (or "
                "float64) rows: `fit` draws the noise and the times in the data's "
                "dtype."
            )
        if self.labelled is not None and self.labelled != (labels is not None):
            raise ValueError(
                f"Batch {self.drawn - 1} of `data` "
                + ("has no labels" if labels is None else "has labels")
                + " but the first batch "
                + ("had" if self.labelled else "had none")
                + "; yield every batch the same way."
            )
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != (self.rows,) or not np.issubdtype(
                labels.dtype, np.integer
            ):
                raise ValueError(
                    f"The labels of batch {self.drawn - 1} of `data` are "
                    f"{labels.dtype}{list(labels.shape)}; they must be integers of "
                    f"shape ({self.rows},), one per row."
                )
        self.dim, self.labelled = x0.shape[1], labels is not None
        return x0, labels
