"""Resuming a run: the newest usable save at a checkpoint's path, checked against
the run that asks for it."""

import warnings
from typing import Any, Literal

from ._header import CheckpointError, differences
from ._state import TrainState
from ._store import saves


def resume_from(
    path: str,
    fresh: TrainState,
    run: dict[str, Any],
    run_defaults: dict[str, dict[str, str]],
    resume: bool | Literal["weights-only"],
    shardings,
    stream: bool,
) -> tuple[TrainState, dict[str, Any] | None, str | None]:
    """The state to start from, the saved divergence monitor and the stream's
    position: from the newest checkpoint at `path`, or from the one before it if
    the newest is damaged."""
    damaged: list[CheckpointError] = []
    for name, read in saves(path, fresh, shardings, stream):
        try:
            header, load = read()
            # A checkpoint saved by hand has no record of its run; then only its
            # structure can be checked.
            problems = (
                differences(header["run"], run, defaults=run_defaults)
                if "run" in header
                else []
            )
            if problems and resume is True:
                # Another model is the first thing to name, and `load` names it.
                load(False)
                raise CheckpointError(
                    f"The checkpoint {name!r} was written by another run: "
                    + "; ".join(problems)
                    + ". Pass the same method, batch size, data and options to "
                    "continue it; `Checkpoint(path, resume='weights-only')` to start "
                    "a new run from its weights (fine-tuning); or a new path (or "
                    "`Checkpoint(path, resume=False)`) to start afresh.",
                    path=name,
                    problems=problems,
                    damaged=False,
                )
            state, position = load(bool(problems))
        except CheckpointError as error:
            if not error.damaged:
                raise
            damaged.append(error)
            continue
        if damaged:
            warnings.warn(
                f"{damaged[0]} Resuming from the previous checkpoint {name!r} "
                f"(step {header.get('step')}) instead.",
                RuntimeWarning,
                stacklevel=3,
            )
        monitor = None if problems else header.get("monitor")
        return state, monitor, position
    if damaged:
        raise damaged[0]
    return fresh, None, None
