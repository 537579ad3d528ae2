"""What `fit` says when it stops a run for non-finite steps: the compiled step is
evaluated again, row by row, to name the terms, rows or arrays at fault."""

import numpy as np

from .._parallel import fetch_tree
from ._guards import NonFiniteError, unsound
from ._state import TrainState
from ._step import Problem, finite_rows, step_number, update_soundness


def _steps_text(first: int, last: int) -> tuple[str, str]:
    if first < last:
        return f"steps {first} to {last} all had", "their updates were"
    return f"step {last} had", "its update was"


def diagnose_update(problem: Problem, state: TrainState, first: int, rows):
    """Name the arrays a finite loss and gradient's update made unsound."""
    flags = update_soundness(
        problem,
        state.model,
        state.ema,
        state.opt_state,
        state.key,
        step_number(state.step, problem.layout),
        rows,
    )
    leaves = unsound(flags, ("model", "ema", "opt_state"))
    steps, skipped = _steps_text(first, state.step)
    shown = ", ".join(f"`{leaf}`" for leaf in leaves[:5])
    more = f" and {len(leaves) - 5} more" if len(leaves) > 5 else ""
    message = (
        f"Training stopped: {steps} a finite loss and gradient but an update that "
        f"made the state non-finite or exploded (parameters past about "
        f"sqrt(max float)), so {skipped} skipped. At step {state.step} the update "
        f"broke {shown}{more}. The data and the model are not at fault: check the "
        "optimiser's learning rate and its schedule (NaN, infinite or far too "
        "large) and its other hyperparameters."
    )
    return NonFiniteError(message, step=state.step, terms=[], rows={}, leaves=leaves)


def diagnose(
    problem: Problem,
    state: TrainState,
    metrics,
    first: int,
    initial: TrainState,
    rows,
):
    """Re-evaluate the last step's batch row by row to say where it went wrong, and
    with the parameters the run started from to say whether they ran away."""
    step = step_number(state.step, problem.layout)
    checks, indices = fetch_tree(
        finite_rows(problem, state.model, state.ema, state.key, step, rows)
    )
    before, _ = fetch_tree(
        finite_rows(problem, initial.model, initial.ema, state.key, step, rows)
    )
    ran_away = all(bool(np.all(c[0]) and np.all(c[1])) for c in before)
    terms = problem.method.terms
    bad_terms = [t.name for t in terms if not np.isfinite(metrics[f"{t.name}/loss"])]
    # `fit` gives every term some rows, so the terms line up with the checks.
    counts = [len(check[0]) for check in checks]
    lines, bad_rows = [], {}
    for term, start, check in zip(terms, np.cumsum([0, *counts]), checks, strict=False):
        finite_loss, finite_grad, s, t = map(np.asarray, check)
        bad = np.flatnonzero(~(finite_loss & finite_grad))
        if bad.size == 0:
            continue
        bad_rows[term.name] = (start + bad).tolist()
        shown = bad[:5]
        where = f"batch rows {(start + shown).tolist()}"
        if indices is not None:
            drawn = np.asarray(indices)[(start + shown) % problem.batch_size]
            where += f" (rows {drawn.tolist()} of `data`)"
        s, t = (np.asarray(a, np.float64)[shown].round(3).tolist() for a in (s, t))
        what = "gradient" if finite_loss.all() else "loss"
        lines.append(
            f"  - term {term.name!r}: non-finite {what} on {bad.size} of "
            f"{len(finite_loss)} row{'' if len(finite_loss) == 1 else 's'}, e.g. "
            f"{where} at s = {s}, t = {t}."
        )
    if not lines:
        lines.append("  - every row is finite on its own: the sum over rows overflows.")
    steps, skipped = _steps_text(first, state.step)
    advice = (
        f"\nWith the parameters of step {initial.step}, where this call started, "
        "every row of this batch is finite: the parameters have run away since, so "
        "the optimiser is at fault, not the data. Lower the learning rate (check "
        "its schedule), or clip the gradient harder."
        if ran_away
        else "\nCheck the data for NaN or inf rows, the model at these times, the "
        "teacher, or lower the learning rate (or raise `max_nonfinite`)."
    )
    message = (
        f"Training stopped: {steps} a non-finite loss or gradient, so {skipped} "
        f"skipped. At step {state.step} the non-finite term(s) were "
        f"{bad_terms or 'none (only the gradient)'}:\n" + "\n".join(lines) + advice
    )
    return NonFiniteError(message, step=state.step, terms=bad_terms, rows=bad_rows)
