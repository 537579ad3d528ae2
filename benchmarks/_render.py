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


def cells(rows: list[dict], metric: str, *, rankable: bool = False) -> dict:
    """`{(method, budget, column): [value per seed]}` over the scored rows; with
    `rankable`, without the `unpaired` cells."""
    out = collections.defaultdict(list)
    for row in rows:
        for column, scores in row.get("metrics", {}).items():
            if rankable and unpaired(row, column, metric):
                continue
            if metric in scores:
                out[row["method"], row["budget"], column].append(scores[metric])
    return out


def separated_ranking(values: dict[str, list[float]]) -> list[list[str]]:
    """Methods in groups, best (lowest) first: a new group starts where the next
    method's whole seed range lies above every range in the groups so far, so two
    methods in different groups are ordered by every seed."""
    ordered = sorted(values, key=lambda name: statistics.median(values[name]))
    groups: list[list[str]] = []
    highest = -np.inf
    for name in ordered:
        if groups and min(values[name]) > highest:
            groups.append([name])
        elif groups:
            groups[-1].append(name)
        else:
            groups.append([name])
        highest = max(highest, max(values[name]))
    return groups


def checks(rows: list[dict], headline: tuple[str, ...], plan: dict) -> list[tuple]:
    """`(name, ok, text)` for every acceptance check of the rows."""
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
        fm = row["settings"]["base_steps"] * _fm_step_flops(rows, row)
        if fm and abs(row["total_flops"] / (row["budget"] * fm) - 1) > 0.01:
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
            "no method outside the headline subset beats every headline method on "
            "every seed, at any data set, budget and number of steps"
            if not beaten
            else "beaten by a method outside the subset: " + ", ".join(beaten),
        )
    )
    return out


def outside_winners(rows: list[dict], headline: tuple[str, ...]) -> list[str]:
    """`method (data set, budget, steps)` for every method outside `headline` whose
    seed range lies wholly below that of every headline method with a cell there
    (learned teachers, ranked cells, at least `RANK_SEEDS` seeds)."""
    found = []
    learned = [r for r in rows if r["teacher_kind"] == "learned" and "error" not in r]
    for name in dict.fromkeys(r["dataset"] for r in learned):
        mine = [r for r in learned if r["dataset"] == name]
        values = cells(mine, primary_metric(mine), rankable=True)
        for (method, budget, column), v in values.items():
            if method in headline or len(v) < RANK_SEEDS:
                continue
            rivals = [
                w
                for (m, b, c), w in values.items()
                if m in headline and b == budget and c == column
                and len(w) >= RANK_SEEDS
            ]  # fmt: skip
            if rivals and all(max(v) < min(w) for w in rivals):
                steps = f"{column[3:]} step{'s' if column != 'nfe1' else ''}"
                found.append(f"{method} ({name}, budget {budget:g}, {steps})")
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
    return [
        f"- `{command}` at `{commit}` on {platform} ({c['cores']} cores, "
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
        values = cells(subset, metric, rankable=True)
        label = "" if teacher == "learned" else " — exact teacher (ablation)"
        for budget in budgets:
            here = [r for r in subset if r["budget"] == budget]
            if not here:
                continue
            methods = list(dict.fromkeys(r["method"] for r in here))
            columns = sorted(
                {c for r in here for c in r.get("metrics", {})},
                key=lambda c: int(c[3:]),
            )
            lines += [
                f"### Budget {budget:g}× flow matching's{label}",
                "",
                f"{LABEL[metric]}, median [min–max] over seeds, by number of "
                "sampling steps (Euler steps of flow matching, jumps of a map). "
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
                + " | ".join(
                    f"{c[3:]} step{'s' if c != 'nfe1' else ''}" for c in columns
                )
                + " |",
                "|---|---|---|---|" + "---|" * len(columns),
            ]
            for method in methods:
                mine = [r for r in here if r["method"] == method and "error" not in r]
                steps = sorted({r["steps"] for r in mine}) or ["–"]
                fpe = f"{mine[0]['fpe']:.2f}" if mine else "–"
                teacher_steps = sorted({r["teacher_steps"] for r in mine}) or ["–"]
                row_cells = [
                    _cell(shown.get((method, budget, c), []), floor)
                    + (
                        "‡"
                        if (method, budget, c) in shown.keys() - values.keys()
                        else ""
                    )
                    for c in columns
                ]
                lines.append(
                    f"| {method} | {fpe} | {', '.join(map(str, steps))} | "
                    f"{', '.join(map(str, teacher_steps))} | "
                    + " | ".join(row_cells)
                    + " |"
                )
            for column in ("nfe1", "nfe2", "nfe4"):
                # A single seed gives no range to separate: such methods are
                # left out of the ranking (flow matching at the same number of
                # Euler steps is ranked with the maps).
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
                        f"{column[3:]} step{'s' if column != 'nfe1' else ''}, ordered "
                        f"only where every seed agrees: {text}"
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
                    f"{method} at budget {budget:g} with {column[3:]} "
                    f"step{'s' if column != 'nfe1' else ''}{label} "
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
        lines.append(("flow-matching", "nfe128"))
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
                style = dict(linestyle=":" if col == "nfe128" else "--", color="k")
                label = f"flow matching, {col[3:]} Euler step(s)"
            shifted = [v * shift for v in x]
            ax.errorbar(shifted, y, yerr=[low, high], label=label, capsize=2, **style)
        floor = rows[0].get("floors", {}).get("fd_real") if rows else None
        if floor is not None and metric == "fd":
            ax.axhline(floor, color="grey", lw=0.8, label="real vs real")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{name}: {column[3:]} step{'s' if column != 'nfe1' else ''}")
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


def unbeaten(values: dict[str, list[float]]) -> list[str]:
    """The methods whose seed range no other method's lies wholly below, best
    median first."""
    out = [
        m
        for m, v in values.items()
        if not any(max(w) < min(v) for n, w in values.items() if n != m)
    ]
    return sorted(out, key=lambda m: statistics.median(values[m]))


def summary(rows: list[dict]) -> list[str]:
    """One table over the data sets: at each budget and number of sampling steps
    (learned teachers first, then any exact-teacher ablation), the methods that
    no other method beats on every seed (`unbeaten`), with the best median; and
    flow matching with its most Euler steps, the quality the maps aim at."""
    lines = [
        "## Summary",
        "",
        "At each budget and number of sampling steps, the best methods: those "
        "whose seed ranges no other method's lies wholly below (ties listed; "
        f"methods with at least {RANK_SEEDS} seeds), with the best median. The last "
        "column is flow matching with its most Euler steps.",
        "",
        "| data set | metric | budget | 1 step | 2 steps | 4 steps | "
        "flow matching, most steps |",
        "|---|---|---|---|---|---|---|",
    ]
    groups = collections.OrderedDict()
    for row in sorted(rows, key=lambda r: r["teacher_kind"] != "learned"):
        if "error" not in row:
            groups.setdefault((row["dataset"], row["teacher_kind"]), []).append(row)
    for (name, teacher), mine in groups.items():
        label = "" if teacher == "learned" else ", exact teacher"
        metric = primary_metric(mine)
        values = cells(mine, metric, rankable=True)
        for budget in sorted({r["budget"] for r in mine}):
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
                median = min(statistics.median(scored[m]) for m in best)
                row_cells.append(f"{', '.join(best)} ({median:.3g})")
            euler = [
                (int(c[3:]), v)
                for (m, b, c), v in values.items()
                if m == "flow-matching" and b == budget
            ]
            fm = "–"
            if euler:
                steps, v = max(euler, key=lambda e: e[0])
                fm = f"{steps} steps: {_cell(v)}"
            lines.append(
                f"| {name} | {metric} | {budget:g}{label} | "
                + " | ".join(row_cells)
                + f" | {fm} |"
            )
    return [*lines, ""]


def write_report(
    rows: list[dict], out: pathlib.Path, *, plan=None, headline=()
) -> None:
    """`frontier.md` and one figure per data set into `out`, from `rows`."""
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
        for check, ok, text in checks(rows, headline, plan):
            lines.append(f"- {'ok' if ok else 'FAIL'}: {check}: {text}")
    (out / "frontier.md").write_text("\n".join(lines) + "\n")
