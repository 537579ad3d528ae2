"""Join the reports of several runs of `benchmarks/quality.py` into one.

```
python benchmarks/merge_quality.py --out DIR RUN/quality.json [RUN/quality.json ...]
```

The full run (every method, every data set, two seeds) takes longer than a day on
a small CPU, so it is run in chunks: a few data sets, methods or seeds at a time
(`--datasets`, `--methods`, `--first-seed`). This script joins their per-seed
records row by row, recomputes the means, spreads, ratios to flow matching (per
seed) and the acceptance checks, and writes `quality.json`, `quality.md` and the
sample figures into `--out` (drawn from the chunks' saved samples of one seed
where those are on disk, else the most complete figure a chunk drew).

Runs of one data set must share its settings (network, steps, batch, learning
rate, evaluation rows); a run at other settings is refused. Where a (row, seed)
pair ran in more than one run, the copy of the first run is kept (CPU runs before
accelerator runs, otherwise in the order given), and the largest relative
difference between the copies is reported per pair of devices (training is
deterministic on one CPU, so there it measures reproducibility across commits and
loads; on a GPU training need not repeat bit for bit).
"""

import argparse
import copy
import json
import pathlib
import shutil

import _quality_report as reporting
import numpy as np
from _machine import device_label


# Settings fields added after some runs were saved, with the value those runs used.
SETTING_DEFAULTS = {"skip": False}

# Where the chunks of the full run go, relative to the repository root.
ROOT = pathlib.Path(__file__).resolve().parents[1]
SUBSET = pathlib.Path("benchmarks/results/full-subset")


def _fresh_folder(name: str) -> pathlib.Path:
    """A chunk folder that no earlier chunk uses: `name`, else `name-2`, `name-3`..."""
    folder, n = SUBSET / name, 1
    while (ROOT / folder).exists():
        n += 1
        folder = SUBSET / f"{name}-{n}"
    return folder


def _settings(ds: dict) -> dict:
    return SETTING_DEFAULTS | ds["settings"]


def _record_seed(record: dict, position: int) -> int:
    return record.get("seed", position)


def _relative_difference(a: dict, b: dict) -> float:
    """The largest relative difference between the metrics two records share."""
    worst = 0.0
    for key, value in a.items():
        other = b.get(key)
        if key.endswith("_s") or not isinstance(value, float):
            continue
        if isinstance(other, float) and np.isfinite(value) and np.isfinite(other):
            scale = max(abs(value), abs(other), 1e-12)
            worst = max(worst, abs(value - other) / scale)
    return worst


def merge(
    reports: list[dict],
    commands: list[str] | None = None,
    expected: dict[str, list[str]] | None = None,
) -> dict:
    """One report holding every (data set, row, seed) record of `reports`;
    `expected` (data set -> rows of the full run) adds the runs still missing."""
    if not reports:
        raise ValueError("merge needs at least one report.")
    # CPU runs first: they repeat bit for bit, so theirs is the copy kept of a
    # (row, seed) that also ran on an accelerator, and their times are the ones
    # the estimates of the missing runs use.
    reports = sorted(reports, key=lambda r: r["machine"]["jax_backend"] != "cpu")
    quick = {r["quick"] for r in reports}
    if len(quick) > 1:
        raise ValueError("cannot merge quick runs with full runs.")
    merged = {
        "quick": reports[0]["quick"],
        "command": "python benchmarks/merge_quality.py " + " ".join(commands or []),
        "machine": reports[0]["machine"],
        "protocol": reports[0]["protocol"],
        "datasets": {},
        "chunks": [],
        "duplicates": {"count": 0, "max_rel_diff": 0.0, "by_device": {}},
        "runtime_s": sum(r["runtime_s"] for r in reports),
        "finished": max(r["finished"] for r in reports),
    }
    for report in reports:
        device = device_label(report["machine"])
        merged["chunks"].append(
            {k: report[k] for k in ("quick", "command", "seeds", "machine")}
            | {
                "first_seed": report.get("first_seed", 0),
                "runtime_s": report["runtime_s"],
                "finished": report["finished"],
                "datasets": sorted(report["datasets"]),
            }
            | ({"note": report["note"]} if "note" in report else {})
        )
        for name, ds in report["datasets"].items():
            target = merged["datasets"].setdefault(
                name, copy.deepcopy({k: v for k, v in ds.items() if k != "rows"})
            )
            target.setdefault("rows", {})
            if _settings(ds) != _settings(target):
                raise ValueError(
                    f"{name}: run `{report['command']}` used settings "
                    f"{_settings(ds)}, others {_settings(target)}; only runs at "
                    "the same settings can be merged."
                )
            if not target.get("figure") and ds.get("figure"):
                target["figure"] = ds["figure"]
            for row, entry in ds["rows"].items():
                have = target["rows"].setdefault(
                    row,
                    {
                        k: v
                        for k, v in entry.items()
                        if k not in ("seeds", "mean", "spread")
                    }
                    | {"seeds": []},
                )
                known = {_record_seed(r, i): r for i, r in enumerate(have["seeds"])}
                for i, record in enumerate(entry["seeds"]):
                    seed = _record_seed(record, i)
                    if seed in known:
                        first = known[seed]["device"]
                        pair = first if first == device else f"{first} / {device}"
                        difference = _relative_difference(known[seed], record)
                        duplicates = merged["duplicates"]
                        on = duplicates["by_device"].setdefault(
                            pair, {"count": 0, "max_rel_diff": 0.0}
                        )
                        for tally in (duplicates, on):
                            tally["count"] += 1
                            tally["max_rel_diff"] = max(
                                tally["max_rel_diff"], difference
                            )
                        continue
                    have["seeds"].append({"seed": seed, "device": device} | record)
    for ds in merged["datasets"].values():
        for entry in ds["rows"].values():
            entry["seeds"].sort(key=lambda r: r["seed"])
        reporting.aggregate(ds["rows"])
    if expected is not None:
        order = list(expected) + [n for n in merged["datasets"] if n not in expected]
        present = [n for n in order if n in merged["datasets"]]
        merged["datasets"] = {n: merged["datasets"][n] for n in present}
        for name, ds in merged["datasets"].items():
            rank = {row: i for i, row in enumerate(expected.get(name, []))}
            order = sorted(ds["rows"], key=lambda row: rank.get(row, len(rank)))
            ds["rows"] = {row: ds["rows"][row] for row in order}
        merged["expected"] = expected
        merged["remaining"] = remaining(merged, expected)
    merged["acceptance"] = reporting.acceptance(merged)
    return merged


def remaining(merged: dict, expected: dict[str, list[str]]) -> list[dict]:
    """The runs that would complete the full run: per data set and seed, the rows
    without a record, as one `quality.py` command each, with an estimate of its
    training time from the rows' (or else the data set's mean) times measured on
    the device of the merged report's first run."""
    seeds = merged["protocol"]["full_seeds"]
    home = device_label(merged["machine"])
    runs = []
    for name, rows in expected.items():
        ds = merged["datasets"].get(name, {"rows": {}})
        measured = {
            row: [
                r["train_s"]
                for r in e["seeds"]
                if "train_s" in r and r.get("device", home) == home
            ]
            for row, e in ds["rows"].items()
        }
        times = {row: float(np.mean(t)) for row, t in measured.items() if t}
        typical = float(np.mean(list(times.values()))) if times else None
        for seed in range(seeds):
            missing = [
                row
                for row in rows
                if seed not in reporting.seeds_run(ds["rows"].get(row, {"seeds": []}))
            ]
            if not missing:
                continue
            # flow matching always runs: it is the baseline of the seed.
            trained = list(dict.fromkeys([reporting.BASELINE, *missing]))
            estimate = None
            if typical is not None:
                estimate = sum(times.get(row, typical) for row in trained) / 60
            methods = [row for row in missing if row != reporting.BASELINE]
            command = f"python benchmarks/quality.py --datasets {name}"
            if methods and len(missing) < len(rows):
                command += " --methods " + " ".join(methods)
            out = _fresh_folder(f"{name}-seed{seed}")
            command += f" --seeds 1 --first-seed {seed} --out {out}"
            runs.append(
                {
                    "dataset": name,
                    "seed": seed,
                    "rows": missing,
                    "command": command,
                    "train_min": estimate,
                }
            )
    return runs


def _figure(
    name: str, ds: dict, runs: list, out: pathlib.Path, previous: dict | None = None
) -> bool:
    """Write the merged sample figure of data set `name` into `out`.

    The sample files are git-ignored, so they exist only where a chunk ran. Where
    they do, the figure is drawn from the chunks of one seed together (the seed
    whose chunks saved samples of the most rows, the lowest on ties; rows without
    samples are left out); where they cover fewer rows than some run's own figure
    shows, that figure (the one with the most rows) is copied instead. A figure
    already in `out` that shows at least as many rows (as `previous`, the report
    there, records in `figure_rows`) is kept, so merging on a machine without the
    samples never replaces a fuller figure. Records the rows shown in
    `ds["figure_rows"]`; returns whether a figure was written or kept.
    """
    figure = f"quality-{name}.png"
    if not (ds["dim"] == 2 or ds["kind"] == "images"):
        return False
    runs = [(path, report) for path, report in runs if name in report["datasets"]]
    by_seed: dict[int, list[pathlib.Path]] = {}
    for path, report in runs:
        folder = path.parent / "samples" / name
        if (folder / "noise.npy").is_file():
            by_seed.setdefault(report.get("first_seed", 0), []).append(folder)

    def covered_row(folders, row):
        return any((f / f"{row}-nfe1.npy").is_file() for f in folders)

    def covered(folders):
        return sum(covered_row(folders, row) for row in ds["rows"])

    drawn = max(sorted(by_seed.items()), key=lambda kv: covered(kv[1]), default=None)
    shown = [
        (list(report["datasets"][name]["rows"]), path.parent / figure)
        for path, report in runs
        if report["datasets"][name].get("figure") and (path.parent / figure).is_file()
    ]
    best = max(shown, key=lambda item: len(item[0]), default=([], None))
    kept = ((previous or {}).get("datasets", {}).get(name) or {}).get("figure_rows")
    if not (kept and (out / figure).is_file()):
        kept = []
    out.mkdir(parents=True, exist_ok=True)
    if drawn is not None and covered(drawn[1]) > max(len(best[0]), len(kept)):
        # Rows whose samples are not on this machine are left out, not shown empty.
        rows = {
            row: entry
            for row, entry in ds["rows"].items()
            if covered_row(drawn[1], row)
        }
        reporting.write_figure(ds | {"rows": rows}, drawn[1], out / figure)
        ds["figure_rows"] = list(rows)
    elif best[1] is not None and len(best[0]) > len(kept):
        if best[1].resolve() != (out / figure).resolve():
            shutil.copyfile(best[1], out / figure)
        ds["figure_rows"] = best[0]
    elif kept:
        ds["figure_rows"] = kept
    else:
        return False
    ds["figure"] = figure
    return True


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("reports", nargs="+", type=pathlib.Path)
    parser.add_argument("--out", type=pathlib.Path, required=True)
    args = parser.parse_args(argv)
    reports = []
    for path in args.reports:
        if not path.is_file():
            raise SystemExit(f"{path}: no such file; give the quality.json of a run.")
        reports.append(json.loads(path.read_text()))
    shown = [str(path) for path in args.reports]
    import quality  # the full run's data sets and rows

    rows = [name for name, _ in quality.method_rows(None)]
    expected = {name: rows for name in quality.FULL}
    merged = merge(reports, ["--out", str(args.out), *shown], expected)
    merged["protocol"] = merged["protocol"] | {
        "full_run_estimate": quality.FULL_RUN_ESTIMATE
    }
    previous_path = args.out / "quality.json"
    previous = (
        json.loads(previous_path.read_text()) if previous_path.is_file() else None
    )
    args.out.mkdir(parents=True, exist_ok=True)
    runs = list(zip(args.reports, reports, strict=True))
    for name, ds in merged["datasets"].items():
        if not _figure(name, ds, runs, args.out, previous):
            ds.pop("figure", None)
            ds.pop("figure_rows", None)
    (args.out / "quality.json").write_text(json.dumps(merged, indent=1))
    reporting.write_markdown(merged, args.out / "quality.md")
    print(
        f"{args.out / 'quality.md'}: {len(reports)} runs, datasets "
        f"{', '.join(merged['datasets'])}"
    )
    return merged


if __name__ == "__main__":
    main()
