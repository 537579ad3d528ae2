"""Results rows (one JSON object per run) to Markdown tables and figures.

A row names its data set, method, seed, budget and teacher, and holds
`metrics[column][metric]` (columns `nfe1`, `nfe2`, ...), its compute and its record
(command, commit, machine, seconds). Everything in the report is computed here from
the rows: medians and seed ranges, rankings where seed ranges separate, floors,
coverage and the acceptance checks.
"""

import collections
import pathlib
import statistics

import numpy as np


PRIMARY = {"analytic": "rmse", "toy": "energy", "images": "fd"}
LABEL = {
    "rmse": "paired RMSE to the exact end point",
    "energy": "energy distance to fresh data",
    "fd": "Fréchet distance to the held-out split",
}
HEADLINE_SEEDS = 3
RANK_SEEDS = 2
BASELINE = "flow-matching"
# Flow matching at the data set's own settings, untouched by the tuning: a control
# that keeps a tuning which transfers badly from handicapping the reference.
CONTROL = "flow-matching-untuned"


def is_baseline(name: str) -> bool:
    """Whether a line (`flow-matching (heun)`, say) is flow matching's."""
    return name.partition(" (")[0] in (BASELINE, CONTROL)


# The paired ordering: B ranks behind A when, over the seeds they share (at least
# RANK_SEEDS), the 95 % percentile bootstrap interval of the mean of B - A lies
# wholly above 0. Resamples are drawn from a fixed generator, so a report
# re-renders byte for byte.
BOOTSTRAP = 10_000
LEVEL = 0.95


def nfe(column: str) -> int:
    """The network evaluations (or jumps) of a column: `nfe8`, `heun-nfe8` -> 8."""
    return int(column.rpartition("nfe")[2])


def solver(column: str) -> str:
    """The solver of a column: `heun-nfe8` -> `heun`; plain `nfe<k>` is Euler (flow
    matching) or `k` jumps (a map)."""
    head = column.rpartition("nfe")[0]
    return head[:-1] if head else "euler"


def label(method: str, column: str) -> str:
    """The name a column's values are shown under: flow matching sampled with
    another solver is its own line, `flow-matching (heun)`."""
    found = solver(column)
    return method if found == "euler" else f"{method} ({found})"


def _steps(column: str) -> str:
    k = nfe(column)
    return f"{k} step{'s' if k != 1 else ''}"


def primary_metric(rows: list[dict]) -> str:
    """The data set's headline metric: the one every scored row carries first."""
    for name in ("fd", "rmse", "energy"):
        if any(name in m for r in rows for m in r.get("metrics", {}).values()):
            return name
    return "energy"


def headline_value(row: dict) -> str:
    """A one-line summary of a row, for the log."""
    if "error" in row:
        return f"ERROR {row['error']}"
    metric = primary_metric([row])
    values = [
        f"{column}={m[metric]:.4g}"
        for column, m in row["metrics"].items()
        if metric in m and column in ("nfe1", "nfe2", "nfe4", "nfe128")
    ]
    return (
        f"{metric} {' '.join(values)} ({row['steps']} steps, {row['fpe']:.2f} FPE, "
        f"{row['train_s']:.0f} s)"
    )


def _cell(values: list[float], floor: float | None = None) -> str:
    if not values:
        return "–"
    median = statistics.median(values)
    mark = "†" if floor is not None and median < floor else ""
    if len(values) == 1:
        return f"{median:.3g}{mark} (1 seed)"
    return f"{median:.3g}{mark} [{min(values):.3g}–{max(values):.3g}]"


def unpaired(row: dict, column: str, metric: str) -> bool:
    """Whether a paired error means nothing here: a map trained only to data
    re-noises between its jumps, so its sample after more than one jump no longer
    belongs to the exact end point of its first noise."""
    return metric == "rmse" and row.get("kind") == "to-data" and column != "nfe1"


def seeded(rows: list[dict], metric: str, *, rankable: bool = False) -> dict:
    """`{(method, budget, column): {seed: value}}` over the scored rows; flow
    matching's other solvers under their own `label` and plain `nfe<k>` columns;
    with `rankable`, without the `unpaired` cells."""
    out = collections.defaultdict(dict)
    for row in rows:
        for column, scores in row.get("metrics", {}).items():
            if rankable and unpaired(row, column, metric):
                continue
            if metric in scores:
                key = (label(row["method"], column), row["budget"], f"nfe{nfe(column)}")
                out[key][row["seed"]] = scores[metric]
    return out


def cells(rows: list[dict], metric: str, *, rankable: bool = False) -> dict:
    """`{(method, budget, column): [value per seed]}`, as `seeded` without seeds."""
    return {
        key: list(values.values())
        for key, values in seeded(rows, metric, rankable=rankable).items()
    }


def behind(a: dict, b: dict) -> bool:
    """Whether `b` ranks behind `a` (lower is better): over their common seeds, at
    least `RANK_SEEDS` of them, the `LEVEL` percentile bootstrap interval of the
    mean of `b - a` lies wholly above 0."""
    common = sorted(a.keys() & b.keys())
    if len(common) < RANK_SEEDS:
        return False
    differences = np.array([b[seed] - a[seed] for seed in common], np.float64)
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(common), size=(BOOTSTRAP, len(common)))
    means = differences[picks].mean(axis=1)
    low = np.quantile(means, (1 - LEVEL) / 2)
    return bool(low > 0)


def separated_ranking(values: dict[str, dict]) -> list[list[str]]:
    """Methods in groups, best (lowest median) first: a new group starts where the
    next method ranks `behind` every method of the group before it, so any two
    methods in different groups are ordered by a paired comparison."""
    ordered = sorted(values, key=lambda name: statistics.median(values[name].values()))
    groups: list[list[str]] = []
    for name in ordered:
        if groups and all(behind(values[m], values[name]) for m in groups[-1]):
            groups.append([name])
        elif groups:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


def checks(
    rows: list[dict], headline: tuple[str, ...], plan: dict, tuned: dict | None = None
) -> list[tuple]:
    """`(name, ok, text)` for every acceptance check of the rows; with `tuned` (the
    chosen trials, `tuned.json`), also that every tuned run used its method's."""
    out = []
    errors = [r for r in rows if "error" in r]
    out.append(
        (
            "runs",
            not errors,
            f"{len(rows) - len(errors)} of {len(rows)} runs finished"
            + "".join(
                f"; {r['dataset']} {r['method']} seed {r['seed']}: {r['error']}"
                for r in errors
            ),
        )
    )
    mismatched = []
    for row in rows:
        if "error" in row:
            continue
        step = _fm_step_flops(rows, row)
        fm = row["settings"]["base_steps"] * step
        # The exact-teacher ablation trains the student for the learned row's
        # steps: the teacher's share is counted though no teacher was trained.
        spent = row["total_flops"] + row.get("ablated_teacher_steps", 0) * step
        if fm and abs(spent / (row["budget"] * fm) - 1) > 0.01:
            mismatched.append(f"{row['dataset']} {row['method']} b{row['budget']:g}")
    out.append(
        (
            "compute matched",
            not mismatched,
            "every run's training FLOPs (teacher included) within 1 % of its budget"
            if not mismatched
            else "off budget: " + ", ".join(mismatched),
        )
    )
    missing = []
    for dataset, budgets in plan.items():
        for name in headline:
            for budget in budgets:
                seeds = {
                    r["seed"]
                    for r in rows
                    if r["dataset"] == dataset
                    and r["method"] == name
                    and r["budget"] == budget
                    and "error" not in r
                }
                if len(seeds) < HEADLINE_SEEDS:
                    missing.append(f"{dataset} {name} b{budget:g} ({len(seeds)})")
    out.append(
        (
            "coverage",
            not missing,
            f"every planned cell has {HEADLINE_SEEDS} seeds"
            if not missing
            else f"{len(missing)} planned cells have fewer than {HEADLINE_SEEDS} "
            f"seeds: "
            + ", ".join(missing[:12])
            + (" ..." if len(missing) > 12 else ""),
        )
    )
    beaten = outside_winners(rows, headline)
    out.append(
        (
            "headline subset",
            not beaten,
            "no method outside the headline subset ranks ahead of every headline "
            "method (paired), at any data set, budget and number of steps"
            if not beaten
            else "beaten by a method outside the subset: " + ", ".join(beaten),
        )
    )
    if tuned is not None:
        stale = superseded(rows, tuned)
        out.append(
            (
                "tuned settings",
                not stale,
                "every tuned run trained with its method's chosen trial (`tuned.json`)"
                if not stale
                else f"{len(stale)} cells ran with a trial that is no longer the "
                "chosen one, or untuned: "
                + ", ".join(stale[:12])
                + (" ..." if len(stale) > 12 else ""),
            )
        )
    return out


def _tuned_run(row: dict) -> bool:
    return (
        row.get("protocol", 1) >= 2 and row["method"] != CONTROL and "error" not in row
    )


def current(rows: list[dict], tuned: dict | None) -> list[dict]:
    """The rows the tables read: all but the tuned runs whose method `tuned` now
    chooses another trial for (`rows.jsonl` keeps those). Runs of a method that
    `tuned` does not hold stay, and the tuned check names them."""
    if tuned is None:
        return rows
    return [
        row
        for row in rows
        if not (_tuned_run(row) and row["method"] in tuned)
        or tuned[row["method"]] == row.get("trial")
    ]


def superseded(rows: list[dict], tuned: dict) -> list[str]:
    """`method on data set (budget; trial run, chosen)` for each cell of tuned
    runs (protocol 2, not the untuned control) whose trial is not the one `tuned`
    now chooses for its method."""
    found = {}
    for row in rows:
        if not _tuned_run(row):
            continue
        chosen = tuned.get(row["method"])
        if chosen != row.get("trial"):
            ran = _trial_text(row.get("trial"))
            now = _trial_text(chosen) if chosen else "not tuned"
            cell = f"{row['method']} on {row['dataset']} b{row['budget']:g}"
            found[cell] = f"{cell} ({ran}; chosen {now})"
    return list(found.values())


def _trial_text(trial: dict | None) -> str:
    if not trial:
        return "defaults"
    return f"lr×{trial['lr']:g} horizon×{trial['horizon']:g} share {trial['share']:g}"


def outside_winners(rows: list[dict], headline: tuple[str, ...]) -> list[str]:
    """`method (data set, budget, steps)` for every method outside `headline` that
    every headline method with a cell there ranks `behind` (learned teachers,
    ranked cells, at least `RANK_SEEDS` seeds)."""
    found = []
    learned = [r for r in rows if r["teacher_kind"] == "learned" and "error" not in r]
    for name in dict.fromkeys(r["dataset"] for r in learned):
        mine = [r for r in learned if r["dataset"] == name]
        values = seeded(mine, primary_metric(mine), rankable=True)
        for (method, budget, column), v in values.items():
            if method in headline or len(v) < RANK_SEEDS or is_baseline(method):
                continue
            rivals = [
                w
                for (m, b, c), w in values.items()
                if m in headline and b == budget and c == column
                and len(w) >= RANK_SEEDS
            ]  # fmt: skip
            if rivals and all(behind(v, w) for w in rivals):
                found.append(f"{method} ({name}, budget {budget:g}, {_steps(column)})")
    return found


def _fm_step_flops(rows: list[dict], row: dict) -> float:
    for other in rows:
        if (
            other["dataset"] == row["dataset"]
            and other["method"] == "flow-matching"
            and "step_flops" in other
        ):
            return other["step_flops"]
    return 0.0


PROTOCOLS = {
    1: "the papers' curricula in absolute steps, an EMA of `min(0.999, 1 - 10 / "
    "steps)`, one learning rate for every method, a teacher share of a half, the "
    "exact-teacher ablation at twice the student steps, flow matching sampled with "
    "Euler only",
    2: "curricula sized for the run, an EMA horizon, tuned settings (the same "
    "trials for every method, `tuning.md`), the exact-teacher ablation at the "
    "learned row's student steps, "
    "flow matching sampled with Euler, Heun and DPM-Solver++(2M)",
}


def protocols(rows: list[dict]) -> list[str]:
    """One line per protocol the rows were run under, with its row count."""
    counts = collections.Counter(row.get("protocol", 1) for row in rows)
    return [
        f"- Protocol {number} ({PROTOCOLS.get(number, '?')}): {count} rows."
        for number, count in sorted(counts.items())
    ]


def _runs(rows: list[dict]) -> list[str]:
    """One line per chunk: command, commit, machine, rows and hours."""
    chunks = collections.OrderedDict()
    for row in rows:
        machine = row.get("machine", {})
        commit = (machine.get("git", {}).get("commit") or "?")[:7]
        key = (row.get("command", "?"), commit, machine.get("platform", "?"))
        chunk = chunks.setdefault(key, {"rows": 0, "seconds": 0.0, "cores": None})
        chunk["rows"] += 1
        chunk["seconds"] += row.get("seconds", 0.0)
        chunk["cores"] = machine.get("cpu_count")
        chunk["backend"] = machine.get("jax_backend")
        chunk["dirty"] = chunk.get("dirty", False) or bool(
            machine.get("git", {}).get("dirty")
        )
    return [
        f"- `{command}` at `{commit}`{' (uncommitted changes)' if c['dirty'] else ''}"
        f" on {platform} ({c['cores']} cores, "
        f"{c['backend']}): {c['rows']} runs, {c['seconds'] / 3600:.1f} h"
        for (command, commit, platform), c in chunks.items()
    ]


def dataset_section(name: str, rows: list[dict], figure: str | None) -> list[str]:
    metric = primary_metric(rows)
    floors = rows[0].get("floors", {})
    floor = floors.get("fd_real") if metric == "fd" else None
    lines = [f"## {name}", ""]
    settings = rows[0].get("settings")
    if settings and "width" in settings:
        lines += [
            f"Every method trains an MLP of width {settings['width']} and depth "
            f"{settings['depth']} on batches of {settings['batch_size']} rows; budget "
            f"1 is {settings['base_steps']} flow-matching steps; {settings['n_eval']} "
            "samples per cell.",
            "",
        ]
    if metric == "fd":
        lines.append(
            f"Fréchet distance on a classifier trained on the held-out split "
            f"(split {floors['split'][0]} training / {floors['split'][1]} held out; "
            f"classifier accuracy {floors['classifier_accuracy']:.3f}). Real-versus-"
            f"real floor, {floors['fd_real_rows']} real training images against the "
            f"held-out statistics: **{floors['fd_real']:.3g}**; † marks a median below "
            "it."
        )
    elif "energy_fresh" in floors:
        lines.append(
            f"Floor: energy distance between two fresh data sets of the evaluation "
            f"size, {floors['energy_fresh']:.3g}."
        )
    lines.append("")
    budgets = sorted({r["budget"] for r in rows})
    # Learned teachers first: the exact teacher is the ablation.
    teachers = sorted({r["teacher_kind"] for r in rows}, key=lambda t: t != "learned")
    for teacher in teachers:
        subset = [r for r in rows if r["teacher_kind"] == teacher]
        shown = cells(subset, metric)
        values = seeded(subset, metric, rankable=True)
        ablation = "" if teacher == "learned" else " — exact teacher (ablation)"
        for budget in budgets:
            here = [r for r in subset if r["budget"] == budget]
            if not here:
                continue
            methods = list(
                dict.fromkeys(
                    label(r["method"], c) for r in here for c in r.get("metrics", {})
                )
            )
            columns = sorted(
                {f"nfe{nfe(c)}" for r in here for c in r.get("metrics", {})}, key=nfe
            )
            lines += [
                f"### Budget {budget:g}× flow matching's{ablation}",
                "",
                f"{LABEL[metric]}, median [min–max] over seeds, by number of "
                "sampling steps (network evaluations of flow matching with each "
                "solver, jumps of a map). "
                "FPE: the method's measured cost of a training step, in forward "
                "passes per data row; steps: its training steps within the "
                "budget; teacher steps: those of the flow-matching teacher "
                "charged to it."
                + (
                    " ‡: a map trained only to data re-noises between its jumps, "
                    "so its sample no longer pairs with the exact end point of its "
                    "first noise; shown, not ranked."
                    if metric == "rmse"
                    else ""
                ),
                "",
                "| method | FPE | steps | teacher steps | "
                + " | ".join(_steps(c) for c in columns)
                + " |",
                "|---|---|---|---|" + "---|" * len(columns),
            ]
            for method in methods:
                base = method.partition(" (")[0]
                mine = [r for r in here if r["method"] == base and "error" not in r]
                steps = sorted({r["steps"] for r in mine}) or ["–"]
                fpe = f"{mine[0]['fpe']:.2f}" if mine else "–"
                teacher_steps = sorted({r["teacher_steps"] for r in mine}) or ["–"]
                row_cells = [
                    _cell(shown.get((method, budget, c), []), floor)
                    + ("‡" if (method, budget, c) in shown.keys() - set(values) else "")
                    for c in columns
                ]
                lines.append(
                    f"| {method} | {fpe} | {', '.join(map(str, steps))} | "
                    f"{', '.join(map(str, teacher_steps))} | "
                    + " | ".join(row_cells)
                    + " |"
                )
            for column in ("nfe1", "nfe2", "nfe4"):
                # A single seed cannot be paired: such methods are left out of
                # the ranking (flow matching with each solver at the same number
                # of network evaluations is ranked with the maps).
                scored = {
                    m: values[m, budget, column]
                    for m in methods
                    if len(values.get((m, budget, column), [])) >= RANK_SEEDS
                }
                if len(scored) > 1:
                    groups = separated_ranking(scored)
                    text = " < ".join(
                        "{" + ", ".join(g) + "}" if len(g) > 1 else g[0] for g in groups
                    )
                    lines.append("")
                    lines.append(
                        f"{_steps(column)}, ordered where a paired comparison over "
                        f"seeds separates them: {text}"
                    )
            lines.append("")
    if floor is not None:
        lines += [below_floor(rows, floor), ""]
    if figure:
        lines += [f"![{name}: quality against training compute]({figure})", ""]
    return lines


def below_floor(rows: list[dict], floor: float) -> str:
    """The sentence that names every (method, budget, steps, teacher) whose median
    Fréchet distance is below the real-versus-real floor, or says there is none."""
    below = []
    for teacher in sorted({r["teacher_kind"] for r in rows}):
        subset = [r for r in rows if r["teacher_kind"] == teacher]
        for (method, budget, column), values in cells(subset, "fd").items():
            if statistics.median(values) < floor:
                label = "" if teacher == "learned" else ", exact teacher"
                below.append(
                    f"{method} at budget {budget:g} with {_steps(column)}{label} "
                    f"({statistics.median(values):.3g})"
                )
    if not below:
        return (
            "No median is below the real-versus-real floor: no generator here "
            "scores better than real training images do."
        )
    return (
        "Below the real-versus-real floor, so closer to the held-out statistics than "
        "real training images are (on these features, at this sample size, a "
        "distance this low is no evidence of better samples): " + "; ".join(below) + "."
    )


def write_figure(name: str, rows: list[dict], path: pathlib.Path) -> None:
    """Quality against total training FLOPs, one line per method and step count
    (seed median, bars from min to max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = primary_metric(rows)
    rows = [r for r in rows if r["teacher_kind"] == "learned" and "error" not in r]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=True)
    for ax, column in zip(axes, ("nfe1", "nfe2", "nfe4"), strict=True):
        lines = [(m, column) for m in dict.fromkeys(r["method"] for r in rows)]
        lines += [
            (BASELINE, c)
            for c in dict.fromkeys(
                c for r in rows if r["method"] == BASELINE for c in r["metrics"]
            )
            if nfe(c) == 128
        ]
        for index, (method, col) in enumerate(lines):
            points = collections.defaultdict(list)
            for r in rows:
                if (
                    r["method"] == method
                    and metric in r["metrics"].get(col, {})
                    and not unpaired(r, col, metric)
                ):
                    points[r["budget"]].append(r["metrics"][col][metric])
            if not points:
                continue
            x = sorted(points)
            y = [statistics.median(points[v]) for v in x]
            # Every method at a budget spends the same compute: spread them a
            # little sideways so that their seed ranges stay readable.
            half = max(1.0, (len(lines) - 1) / 2)
            shift = 1.08 ** ((index - half) / half)  # within ±8 %
            low = [y_ - min(points[v]) for v, y_ in zip(x, y, strict=True)]
            high = [max(points[v]) - y_ for v, y_ in zip(x, y, strict=True)]
            # Up to twenty methods share a panel: twenty colours, and markers
            # that tell apart the few a colour-blind reader might confuse.
            style = dict(
                linestyle="-",
                marker="osD^v<>"[index % 7],
                color=plt.get_cmap("tab20")(index % 20),
            )
            label = method
            if method == "flow-matching":
                dashes = {"euler": ":", "heun": "-.", "dpm2m": "--"}
                style = dict(linestyle=dashes.get(solver(col), "-"), color="k")
                label = f"flow matching, {solver(col)}, {nfe(col)} NFE"
            shifted = [v * shift for v in x]
            ax.errorbar(shifted, y, yerr=[low, high], label=label, capsize=2, **style)
        floor = rows[0].get("floors", {}).get("fd_real") if rows else None
        if floor is not None and metric == "fd":
            ax.axhline(floor, color="grey", lw=0.8, label="real vs real")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{name}: {_steps(column)}")
        ax.set_xlabel("training compute, × flow matching's budget (teacher included)")
    axes[0].set_ylabel(LABEL[metric])
    # One legend for the three panels, beside them: every method has a 1-step
    # cell, so the first panel has every line but the 2- and 4-step Euler ones.
    handles: dict = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="center left",
                   bbox_to_anchor=(1.0, 0.5), fontsize=7)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def unbeaten(values: dict[str, dict]) -> list[str]:
    """The methods that no other method ranks ahead of (`behind`), best median
    first."""
    out = [
        m
        for m, v in values.items()
        if not any(behind(w, v) for n, w in values.items() if n != m)
    ]
    return sorted(out, key=lambda m: statistics.median(values[m].values()))


def best_solver(values: dict, budget: float) -> tuple[str, int, dict] | None:
    """Flow matching at its most network evaluations with the solver (and, where
    the untuned control ran, the settings) of the lowest median there:
    `(solver, nfe, {seed: value})`, or None without such cells."""
    found = [
        (m, c, v)
        for (m, b, c), v in values.items()
        if b == budget and is_baseline(m) and len(v) >= 1
    ]
    if not found:
        return None
    most = max(nfe(c) for _, c, _ in found)
    m, c, v = min(
        ((m, c, v) for m, c, v in found if nfe(c) == most),
        key=lambda f: statistics.median(f[2].values()),
    )
    base, _, rest = m.partition(" (")
    found_solver = rest.rstrip(")") or "euler"
    return found_solver + (", untuned" if base == CONTROL else ""), most, v


def broken_baselines(rows: list[dict], budget: float, metric: str) -> str:
    """The flow-matching lines whose samples were not finite at the most network
    evaluations any of them was sampled with, at `budget`: `""`, or a note such as
    `"not finite at 128 NFE: flow-matching (heun) on seeds 0, 1"`. Such a cell has
    no value and so cannot be the reference; the note says it was left out."""
    mine = [r for r in rows if r["budget"] == budget and is_baseline(r["method"])]
    columns = [c for r in mine for c in r.get("metrics", {})]
    if not columns:
        return ""
    most = max(nfe(c) for c in columns)
    broken = collections.defaultdict(set)
    for row in mine:
        for column, scores in row.get("metrics", {}).items():
            if nfe(column) == most and metric not in scores:
                broken[label(row["method"], column)].add(row["seed"])
    if not broken:
        return ""
    lines = "; ".join(
        f"{name} on seed{'s' if len(seeds) > 1 else ''} "
        + ", ".join(map(str, sorted(seeds)))
        for name, seeds in broken.items()
    )
    return f"not finite at {most} NFE: {lines}"


# What the frontier aims at: the best map's ratio to flow matching's best solver
# at its most evaluations, at budget 1 (data set, jumps, target).
TARGETS = (("ring", 1, 2.5), ("mnist", 1, 1.2), ("mnist", 2, 1.05))


def best_map(values: dict, budget: float, column: str) -> tuple[list[str], float]:
    """The `unbeaten` maps of one cell (flow matching's lines left out) and the
    best median among them."""
    scored = {
        m: v
        for (m, b, c), v in values.items()
        if b == budget and c == column and len(v) >= RANK_SEEDS
        and not is_baseline(m)
    }  # fmt: skip
    if not scored:
        return [], float("nan")
    best = unbeaten(scored)
    return best, min(statistics.median(scored[m].values()) for m in best)


def answer(rows: list[dict]) -> list[str]:
    """The report's opening: for each data set at budget 1 and each number of
    jumps, the map to train and what it gives up against flow matching's best
    solver at its most evaluations; then the headline figures against their
    targets."""
    lines = [
        "## Which method to train",
        "",
        "At budget 1 (flow matching's training compute), the maps no other map "
        "ranks ahead of, their median and its ratio to flow matching's best solver "
        "at its most network evaluations, tuned or untuned (below 1: the map is "
        "better).",
        "",
        "| data set | metric | seeds of the maps | 1 jump | 2 jumps | 4 jumps | "
        "flow matching, best solver |",
        "|---|---|---|---|---|---|---|",
    ]
    learned = [r for r in rows if r["teacher_kind"] == "learned" and "error" not in r]
    figures = {}
    for name in dict.fromkeys(r["dataset"] for r in learned):
        mine = [r for r in learned if r["dataset"] == name and r["budget"] == 1.0]
        if not mine:
            continue
        metric = primary_metric(mine)
        values = seeded(mine, metric, rankable=True)
        reference = best_solver(values, 1.0)
        if reference is None:
            continue
        found, most, v = reference
        target = statistics.median(v.values())
        seeds = len({r["seed"] for r in mine if not is_baseline(r["method"])})
        row_cells = []
        for jumps in (1, 2, 4):
            best, median = best_map(values, 1.0, f"nfe{jumps}")
            figures[name, jumps] = (median / target, best, seeds)
            row_cells.append(
                f"{', '.join(best)} ({median:.3g}; {median / target:.2f}×)"
                if best
                else "–"
            )
        broken = broken_baselines(mine, 1.0, metric)
        lines.append(
            f"| {name} | {metric} | {seeds} | " + " | ".join(row_cells)
            + f" | {found}, {most} NFE: {target:.3g}"
            + (f" ({broken})" if broken else "") + " |"
        )  # fmt: skip
    lines += [
        "",
        "Headline figures: the best map's ratio at budget 1.",
        "",
        "| figure | ratio | target | met | seeds |",
        "|---|---|---|---|---|",
    ]
    for name, jumps, goal in TARGETS:
        ratio, best, seeds = figures.get((name, jumps), (float("nan"), [], 0))
        met = "yes" if ratio <= goal else "no"
        who = f" ({', '.join(best)})" if best else ""
        lines.append(
            f"| best {jumps}-jump ratio, {name}{who} | {ratio:.2f}× | ≤ {goal:g}× | "
            f"{met} | {seeds} |"
        )
    return [*lines, ""]


# The headline subset is chosen on these sets and reported on the others.
SELECTION = ("aniso2d", "checkerboard", "digits")


def select_headline(rows: list[dict], datasets=SELECTION) -> list[str]:
    """The maps that no other map ranks ahead of in at least one cell (budget 1,
    1, 2 or 4 jumps, learned teachers) of the selection data sets, in order of
    first appearance: the subset the other data sets train."""
    chosen: list[str] = []
    learned = [r for r in rows if r["teacher_kind"] == "learned" and "error" not in r]
    for name in datasets:
        mine = [r for r in learned if r["dataset"] == name and r["budget"] == 1.0]
        if not mine:
            continue
        values = seeded(mine, primary_metric(mine), rankable=True)
        for jumps in (1, 2, 4):
            best, _ = best_map(values, 1.0, f"nfe{jumps}")
            chosen += [m for m in best if m not in chosen]
    return chosen


def selection_gaps(every: list[dict], rows: list[dict]) -> list[str]:
    """`method on data set` for each map that ran at budget 1 on a selection set
    (in `every`, the rows kept) but has fewer than `RANK_SEEDS` seeds there among
    `rows`, the rows the report reads: the selection is to be rerun for it."""
    gaps = []
    for name in SELECTION:
        ran = {
            r["method"]
            for r in every
            if r["dataset"] == name
            and r["budget"] == 1.0
            and not is_baseline(r["method"])
        }
        for method in sorted(ran):
            seeds = {
                r["seed"]
                for r in rows
                if r["dataset"] == name
                and r["method"] == method
                and r["budget"] == 1.0
                and "error" not in r
            }
            if len(seeds) < RANK_SEEDS:
                gaps.append(f"{method} on {name}")
    return gaps


def summary(rows: list[dict]) -> list[str]:
    """One table over the data sets: at each budget and number of sampling steps
    (learned teachers first, then any exact-teacher ablation), the methods that
    no other method ranks ahead of (`unbeaten`), with the best median and its
    ratio to flow matching's best solver at its most network evaluations, the
    quality the maps aim at."""
    lines = [
        "## Summary",
        "",
        "At each budget and number of sampling steps, the best methods: those that "
        "no other method ranks ahead of by a paired comparison over the seeds they "
        f"share (the {LEVEL:.0%} percentile bootstrap interval of the mean "
        f"difference, {BOOTSTRAP} resamples of seeds, lies wholly above zero; at "
        f"least {RANK_SEEDS} seeds), with the best median and, in brackets, its "
        "ratio to the last column: flow matching with the best of its solvers "
        "(Euler, Heun, DPM-Solver++(2M)) at its most network evaluations (NFE), "
        f"and of its tuned and untuned settings where both ran (`{CONTROL}`).",
        "",
        "| data set | metric | budget | 1 step | 2 steps | 4 steps | "
        "flow matching, best solver |",
        "|---|---|---|---|---|---|---|",
    ]
    groups = collections.OrderedDict()
    for row in sorted(rows, key=lambda r: r["teacher_kind"] != "learned"):
        if "error" not in row:
            groups.setdefault((row["dataset"], row["teacher_kind"]), []).append(row)
    for (name, teacher), mine in groups.items():
        suffix = "" if teacher == "learned" else ", exact teacher"
        metric = primary_metric(mine)
        values = seeded(mine, metric, rankable=True)
        for budget in sorted({r["budget"] for r in mine}):
            reference = best_solver(values, budget)
            target = (
                statistics.median(reference[2].values()) if reference else float("nan")
            )
            row_cells = []
            for column in ("nfe1", "nfe2", "nfe4"):
                scored = {
                    m: v
                    for (m, b, c), v in values.items()
                    if b == budget and c == column and len(v) >= RANK_SEEDS
                }
                if not scored:
                    row_cells.append("–")
                    continue
                best = unbeaten(scored)
                median = min(statistics.median(scored[m].values()) for m in best)
                ratio = f"; {median / target:.2f}×" if reference else ""
                row_cells.append(f"{', '.join(best)} ({median:.3g}{ratio})")
            fm = "–"
            if reference:
                found, most, v = reference
                fm = f"{found}, {most} NFE: {_cell(list(v.values()))}"
            broken = broken_baselines(mine, budget, metric)
            if broken:
                fm += f" ({broken})"
            lines.append(
                f"| {name} | {metric} | {budget:g}{suffix} | "
                + " | ".join(row_cells)
                + f" | {fm} |"
            )
    return [*lines, ""]


def write_report(
    rows: list[dict], out: pathlib.Path, *, plan=None, headline=(), tuned=None
) -> None:
    """`frontier.md` and one figure per data set into `out`, from `rows`: with the
    chosen trials `tuned`, from the rows of those trials (see `current`), and the
    checks compare the runs with them."""
    every = rows
    rows = current(rows, tuned)
    gaps = selection_gaps(every, rows)
    kept = len(every)
    left_out = (
        [
            f"{kept - len(rows)} runs trained with a trial that tuning no longer "
            "chooses for their method are kept in `rows.jsonl` and left out of "
            "everything below.",
            "",
        ]
        if kept > len(rows)
        else []
    )
    by_dataset = collections.OrderedDict()
    for row in rows:
        by_dataset.setdefault(row["dataset"], []).append(row)
    lines = [
        "# Sample quality against training compute",
        "",
        "Generated by `benchmarks/frontier.py` from `rows.jsonl`, one row per run "
        "(data set, method, seed, budget, teacher). Runs:",
        "",
        *_runs(rows),
        "",
        "Protocols:",
        "",
        *protocols(rows),
        "",
        *left_out,
        *answer(rows),
        "The maps that no other map ranks ahead of in some budget-1 cell of "
        f"{', '.join(SELECTION)}, the sets the headline subset is chosen on: "
        + (", ".join(select_headline(rows)) or "none yet")
        + "."
        + (
            f" The selection is incomplete: {len(gaps)} map and data set pairs lack "
            f"{RANK_SEEDS} seeds of the map's current trial (" + ", ".join(gaps) + ")."
            if gaps
            else ""
        ),
        "",
        *summary(rows),
    ]
    for name, mine in by_dataset.items():
        figure = None
        if any("error" not in r for r in mine):
            figure = f"frontier-{name}.png"
            write_figure(name, mine, out / figure)
        lines += dataset_section(name, mine, figure)
    if plan is not None:
        lines += ["## Checks", ""]
        for check, ok, text in checks(rows, headline, plan, tuned):
            lines.append(f"- {'ok' if ok else 'FAIL'}: {check}: {text}")
    (out / "frontier.md").write_text("\n".join(lines) + "\n")


def write_tuning(rows: list[dict], chosen: dict, out: pathlib.Path) -> None:
    """`tuning.md` into `out`: every trial's score per method, the chosen trial,
    and what the tuning cost."""
    metric = primary_metric(rows)
    names = list(dict.fromkeys(r["method"] for r in rows))
    hours = sum(r.get("seconds", 0.0) for r in rows) / 3600
    flops = sum(r.get("total_flops", 0.0) for r in rows if "error" not in r)
    datasets = sorted({r["dataset"] for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    lines = [
        "# Tuning",
        "",
        f"Generated by `benchmarks/frontier.py --tune` from `tuning.jsonl`: every "
        f"method's trials at budget 1 on {', '.join(datasets)}, seed "
        f"{', '.join(map(str, seeds))}, scored by {LABEL[metric]} (the mean of the "
        "1- and 2-jump cells; flow matching: its best solver at its most network "
        "evaluations). The chosen trial of each method, marked **bold**, is what "
        "every other run uses (`tuned.json`). Runs:",
        "",
        *_runs(rows),
        "",
        f"Tuning cost: {len(rows)} runs, {hours:.1f} h, {flops:.3g} training FLOPs.",
        "",
        "| method | trials | chosen: lr × | horizon × | teacher share | score | "
        "worst trial |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        mine = [r for r in rows if r["method"] == name]
        scores = [_trial_score(r, metric) for r in mine]
        finite = [v for v in scores if np.isfinite(v)]
        pick = chosen.get(name)
        if pick is None:
            lines.append(f"| {name} | {len(mine)} | – | – | – | – | – |")
            continue
        best = min(finite) if finite else float("nan")
        worst = max(finite) if finite else float("nan")
        failed = len(scores) - len(finite)
        note = f" ({failed} failed)" if failed else ""
        lines.append(
            f"| {name} | {len(mine)}{note} | **{pick['lr']:g}** | "
            f"**{pick['horizon']:g}** | **{pick['share']:g}** | {best:.3g} | "
            f"{worst:.3g} |"
        )
    edge = at_edge(rows, chosen)
    lines += [
        "",
        "Chosen at the edge of the grid (its largest or smallest value of a setting "
        "tried), where a wider grid might choose beyond: "
        + (", ".join(edge) if edge else "none")
        + ".",
    ]
    (out / "tuning.md").write_text("\n".join(lines) + "\n")


def at_edge(rows: list[dict], chosen: dict) -> list[str]:
    """`method (setting ×value)` for each chosen learning rate or horizon that is
    the largest or smallest of that setting's values in the tuning rows."""
    found = []
    for name, pick in chosen.items():
        for field in ("lr", "horizon"):
            tried = {r["trial"][field] for r in rows if "trial" in r}
            if len(tried) > 1 and pick[field] in (min(tried), max(tried)):
                found.append(f"{name} ({field} ×{pick[field]:g})")
    return found


def _trial_score(row: dict, metric: str) -> float:
    """A tuning row's score, as `frontier.choose` computes it."""
    if "error" in row:
        return float("nan")
    columns = row["metrics"]
    if is_baseline(row["method"]):
        most = max(nfe(c) for c in columns)
        values = [min(columns[c].get(metric, np.inf) for c in columns
                      if nfe(c) == most)]  # fmt: skip
    else:  # a re-noised jump's paired error means nothing (`unpaired`)
        values = [columns[c].get(metric, np.inf) for c in ("nfe1", "nfe2")
                  if c in columns and not unpaired(row, c, metric)]  # fmt: skip
    value = float(np.mean(values)) if values else float("nan")
    return value if np.isfinite(value) else float("nan")
