"""The quality benchmark's metrics, and a tiny end-to-end run of its pipeline."""

import json
import math
import pathlib
import shutil
import sys

import numpy as np
import pytest


BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import _quality_metrics as metrics  # noqa: E402
import _quality_report as reporting  # noqa: E402


def test_paired_rmse_and_median():
    exact = np.zeros((4, 2))
    samples = np.array([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    # Row distances 5, 0, 1, 2.
    assert metrics.paired_rmse(samples, exact) == pytest.approx(np.sqrt(30 / 4))
    assert metrics.median_paired_error(samples, exact) == pytest.approx(1.5)
    # Pairing matters: the same rows in another order are far from the exact ones.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 3))
    assert metrics.paired_rmse(x, x) == 0.0
    assert metrics.paired_rmse(x[::-1], x) > 1.0
    with pytest.raises(ValueError):
        metrics.paired_rmse(x, x[:10])


def test_energy_distance_is_unbiased_and_detects_shifts():
    rng = np.random.default_rng(1)
    same = [
        metrics.energy_distance(
            rng.standard_normal((300, 2)), rng.standard_normal((300, 2))
        )
        for _ in range(40)
    ]
    shifted = metrics.energy_distance(
        rng.standard_normal((300, 2)), rng.standard_normal((300, 2)) + [0.5, 0.0]
    )
    # Unbiased: the mean over replicates is 0 within its standard error, and single
    # estimates take both signs.
    mean, error = np.mean(same), np.std(same) / np.sqrt(len(same))
    assert abs(mean) < 4 * error
    assert min(same) < 0 < max(same)
    assert shifted > 10 * np.std(same)
    # Population value for 1-d standard normals shifted by 1: X - Y ~ N(1, 2), so
    # 2 E|N(1, 2)| - 2 E|N(0, 2)| with E|N(m, v)| = sqrt(2v/pi) e^{-m²/2v}
    # + m erf(m / sqrt(2v)); the estimate's standard error here is about 0.02.
    x = rng.standard_normal((4000, 1))
    y = rng.standard_normal((4000, 1)) + 1.0
    folded = 2 * np.sqrt(4 / np.pi) * np.exp(-1 / 4) + 2 * math.erf(0.5)
    expected = folded - 2 * np.sqrt(4 / np.pi)
    assert metrics.energy_distance(x, y) == pytest.approx(expected, abs=0.08)


def test_frechet_distance():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((400, 5)) @ rng.standard_normal((5, 5))
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    delta = np.array([1.0, -2.0, 0.5, 0.0, 3.0])
    assert metrics.frechet_distance(a, a + delta) == pytest.approx(
        np.sum(delta**2), rel=1e-8
    )
    # Scaling by 2: tr(S + 4S - 2 * 2S) = tr S.
    centred = a - a.mean(axis=0)
    assert metrics.frechet_distance(centred, 2 * centred) == pytest.approx(
        np.trace(np.cov(a, rowvar=False)), rel=1e-8
    )


def test_right_component_share():
    mixture = {
        "weights": [0.5, 0.5],
        "means": [[-3.0, 0.0], [3.0, 0.0]],
        "covs": [np.eye(2).tolist(), np.diag([0.1, 1.0]).tolist()],
    }
    exact = np.array([[-3.0, 0.0], [3.0, 0.0], [-2.5, 1.0], [2.5, -1.0]])
    assert list(metrics.assign_components(exact, mixture)) == [0, 1, 0, 1]
    assert metrics.right_component_share(exact, exact, mixture) == 1.0
    wrong = exact.copy()
    wrong[:2] = wrong[1::-1]
    assert metrics.right_component_share(wrong, exact, mixture) == 0.5
    # By posterior, not by distance: the narrow component loses a point near it.
    near_narrow = np.array([[1.2, 0.0]])
    assert metrics.assign_components(near_narrow, mixture)[0] == 0


def _entry(kind, **mean):
    return {"kind": kind, "mean": mean, "seeds": [{}]}


def test_verdict_against_the_bars():
    baseline = _entry("velocity", **{"rmse@nfe1": 3.0})
    passing = {"rmse@nfe1": 0.1, "rmse_ratio@nfe1": 3.5, "rmse_ratio@nfe2": 1.7}
    assert reporting.verdict(_entry("two-time", **passing), baseline, "analytic") == (
        "yes / yes"
    )
    two_step_miss = {**passing, "rmse_ratio@nfe2": 1.71}
    assert reporting.verdict(
        _entry("two-time", **two_step_miss), baseline, "analytic"
    ) == ("yes / no")
    # A to-data map's 2-step sampler re-noises: its 2-step ratio has no bar.
    assert reporting.verdict(
        _entry("to-data", **two_step_miss), baseline, "analytic"
    ) == ("yes / n/a")
    blown = {**passing, "rmse@nfe1": 30.1}
    assert reporting.verdict(_entry("two-time", **blown), baseline, "analytic") == (
        "diverged"
    )
    nonfinite = {"nonfinite@nfe1": 1.0}
    assert reporting.verdict(_entry("two-time", **nonfinite), baseline, "analytic") == (
        "diverged"
    )
    images = _entry("two-time", **{"fd@nfe1": 2.0, "fd_ratio@nfe1": 2.5})
    assert reporting.verdict(images, None, "images") == "no"
    assert reporting.verdict(baseline, baseline, "analytic") == "–"
    # Only rows that miss get a line, with the known cause where there is one.
    report = {
        "kind": "analytic",
        "rows": {
            "flow-matching": baseline,
            "splitmeanflow": _entry("two-time", **passing),
            "esd": _entry("two-time", **blown),
        },
    }
    notes = "\n".join(reporting._failure_notes(report))
    assert "`esd` (diverged): diverges" in notes
    assert "splitmeanflow" not in notes


@pytest.mark.slow
def test_tiny_end_to_end_run(tmp_path, monkeypatch):
    import quality

    partials = []
    write = quality._write_atomically

    def spy(path, text):
        partials.append(list(json.loads(text)["datasets"]["ring"]["rows"]))
        write(path, text)

    monkeypatch.setattr(quality, "_write_atomically", spy)
    report = quality.main(
        [
            "--datasets",
            "ring",
            "--methods",
            "meanflow",
            "--steps",
            "50",
            "--seeds",
            "1",
            "--first-seed",
            "3",
            "--eval-rows",
            "256",
            "--out",
            str(tmp_path),
        ]
    )
    rows = report["datasets"]["ring"]["rows"]
    assert list(rows) == ["flow-matching", "meanflow"]
    # A partial report after each row, removed once the full one is written.
    assert partials == [["flow-matching"], ["flow-matching", "meanflow"]]
    assert not (tmp_path / "quality.partial.json").exists()
    for entry in rows.values():
        assert "error" not in entry["seeds"][0], entry["seeds"][0]
        assert reporting.seeds_run(entry) == [3]
    assert rows["meanflow"]["kind"] == "two-time"
    # Every metric can be recomputed from the saved samples, rows paired by noise.
    folder = tmp_path / "samples" / "ring"
    noise = np.load(folder / "noise.npy")
    exact = np.load(folder / "exact.npy")
    mixture = json.loads((folder / "mixture.json").read_text())
    for name, column in [("meanflow", "nfe2"), ("flow-matching", "nfe128")]:
        samples = np.load(folder / f"{name}-{column}.npy")
        assert samples.shape == noise.shape == exact.shape
        record = rows[name]["seeds"][0]
        assert record[f"rmse@{column}"] == pytest.approx(
            metrics.paired_rmse(samples, exact), rel=1e-6
        )
        assert record[f"component@{column}"] == pytest.approx(
            metrics.right_component_share(samples, exact, mixture)
        )
    assert (folder / "meanflow-diag128.npy").exists()
    assert "rmse_ratio@nfe1" in rows["meanflow"]["mean"]
    text = (tmp_path / "quality.md").read_text()
    assert "| meanflow | two-time | " in text
    assert (tmp_path / "quality-ring.png").exists()
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert saved["machine"]["versions"]["jax"]
    assert saved["runtime_s"] > 0


def test_meanflow_ablation_rows():
    import meanflow_ablation as ablation

    import fmcalc

    rows = dict(ablation.rows())
    assert list(rows)[0] == "flow-matching"
    assert len(rows) == 1 + len(ablation.VARIANTS)
    plain = rows["meanflow-cond-sg-mf"]
    assert plain.learning == "marginal-from-conditional"
    # The first variant is MeanFlow itself, with plain squared error.
    meanflow = fmcalc.methods.get("meanflow", loss=fmcalc.SquaredError())
    assert str(plain.terms[0].residual) == str(meanflow.terms[0].residual)
    assert plain.terms[0].times == meanflow.terms[0].times
    assert rows["meanflow-exact-full-tri"].learning == "distillation"
    # The true gradient with the conditional velocity is biased, so not in the grid:
    # the validator refuses it.
    with pytest.raises(ValueError, match="onditional"):
        fmcalc.eulerian(
            form="V", stop_gradient="none", velocity=fmcalc.ConditionalVelocity()
        )


SETTINGS = {
    "width": 8,
    "depth": 2,
    "steps": 10,
    "batch_size": 4,
    "n_eval": 4,
    "lr": 1e-3,
    "ema_decay": 0.9,
}


def _run(rows, *, settings=None, first_seed=0):
    """A saved report of one chunk: `rows` maps a row to its 1-step and 128-step
    paired RMSE per seed (two-time maps; flow matching is the velocity row)."""
    machine = {
        "cpu_count": 2,
        "jax_backend": "cpu",
        "versions": {"fmcalc": "0", "jax": "0"},
        "git": {"commit": "abc", "dirty": False},
    }
    table = {}
    for row, values in rows.items():
        records = [
            {"seed": seed, "train_s": 1.0} | {k: float(v) for k, v in value.items()}
            for seed, value in enumerate(values, start=first_seed)
        ]
        kind = "velocity" if row == reporting.BASELINE else "two-time"
        table[row] = {"kind": kind, "uses": ["online"], "seeds": records}
    reporting.aggregate(table)
    return {
        "quick": False,
        "command": f"python benchmarks/quality.py --first-seed {first_seed}",
        "seeds": max(len(values) for values in rows.values()),
        "first_seed": first_seed,
        "machine": machine,
        "protocol": {
            "full_seeds": 2,
            "full": {},
            "quick": {},
            "quick_methods": {},
            "aux_substeps": {"ctm": 2, "pfmm": 4},
            "full_run_estimate": "long",
        },
        "datasets": {
            "ring": {
                "description": "ring",
                "kind": "analytic",
                "dim": 2,
                "settings": settings or SETTINGS,
                "floors": {},
                "rows": table,
            }
        },
        "runtime_s": 60.0,
        "finished": "2026-01-01T00:00:00",
    }


def test_merge_prefers_cpu_copies_and_reports_repeats_per_device():
    """A (row, seed) that also ran on a GPU keeps its CPU copy, copies are
    compared per pair of devices (a GPU's nondeterminism does not hide how exactly
    the CPU runs repeat), and the missing runs are estimated from CPU times."""
    import merge_quality

    cpu = _run({"flow-matching": [{"rmse@nfe1": 2.0, "rmse@nfe128": 0.1}]})
    gpu = _run(
        {
            "flow-matching": [{"rmse@nfe1": 2.2, "rmse@nfe128": 0.1}],
            "emd": [{"rmse@nfe1": 0.3, "rmse@nfe2": 0.2}],
        }
    )
    gpu["machine"] |= {"jax_backend": "gpu", "device_kind": "NVIDIA H200"}
    for entry in gpu["datasets"]["ring"]["rows"].values():
        entry["seeds"][0]["train_s"] = 0.1
    expected = {"ring": ["flow-matching", "emd", "pfmm"]}
    merged = merge_quality.merge([gpu, cpu, cpu, gpu], expected=expected)
    rows = merged["datasets"]["ring"]["rows"]
    assert rows["flow-matching"]["seeds"][0]["rmse@nfe1"] == 2.0
    assert rows["flow-matching"]["seeds"][0]["device"] == "cpu"
    assert rows["emd"]["seeds"][0]["device"] == "gpu (NVIDIA H200)"
    assert merged["duplicates"]["by_device"] == {
        "cpu": {"count": 1, "max_rel_diff": 0.0},
        "cpu / gpu (NVIDIA H200)": {
            "count": 2,
            "max_rel_diff": pytest.approx(0.2 / 2.2),
        },
        "gpu (NVIDIA H200)": {"count": 1, "max_rel_diff": 0.0},
    }
    line = reporting._duplicates_line(merged)
    assert line.startswith("4 (row, seed) pairs ran twice;")
    assert "0 over the 1 on cpu; 0.091 over the 2 on cpu / gpu (NVIDIA H200); " in line
    # Seed 0 lacks pfmm: flow matching and pfmm at the CPU's 1 s each; emd's GPU
    # time does not count.
    (run,) = [r for r in merged["remaining"] if r["seed"] == 0]
    assert run["rows"] == ["pfmm"]
    assert run["train_min"] == pytest.approx(2 / 60)


def test_merge_joins_seeds_and_recomputes_ratios_per_seed(tmp_path, monkeypatch):
    import merge_quality

    fm = [
        {"rmse@nfe1": 2.0, "rmse@nfe128": 0.1},
        {"rmse@nfe1": 2.0, "rmse@nfe128": 0.2},
    ]
    good = [{"rmse@nfe1": 0.3, "rmse@nfe2": 0.1}, {"rmse@nfe1": 0.5, "rmse@nfe2": 0.3}]
    first = _run({"flow-matching": fm[:1], "emd": good[:1], "pfmm": good[:1]})
    second = _run({"flow-matching": fm[1:], "emd": good[1:]}, first_seed=1)
    # One chunk alone: each row has one seed, so the full run's check fails.
    assert not reporting.acceptance(first)["ring"]["ok"]
    assert reporting.acceptance(first)["ring"]["fewer_seeds"] == ["emd", "pfmm"]
    merged = merge_quality.merge([first, second, first])
    rows = merged["datasets"]["ring"]["rows"]
    assert [r["seed"] for r in rows["emd"]["seeds"]] == [0, 1]
    assert [r["seed"] for r in rows["pfmm"]["seeds"]] == [0]
    # Ratios pair each seed with the baseline of the same seed: 0.3/0.1 and 0.5/0.2.
    assert rows["emd"]["mean"]["rmse_ratio@nfe1"] == pytest.approx(2.75)
    assert rows["emd"]["spread"]["rmse_ratio@nfe1"] == pytest.approx(0.25)
    assert rows["emd"]["mean"]["rmse@nfe1"] == pytest.approx(0.4)
    # The repeated chunk is counted as duplicates, identical to the first copy.
    assert merged["duplicates"] == {
        "count": 3,
        "max_rel_diff": 0.0,
        "by_device": {"cpu": {"count": 3, "max_rel_diff": 0.0}},
    }
    check = merged["acceptance"]["ring"]
    assert check["passing"] == ["emd"] and check["fewer_seeds"] == ["pfmm"]
    assert not check["ok"]
    # Written out, the report names every chunk and what is still missing.
    paths = []
    for i, report in enumerate([first, second]):
        folder = tmp_path / f"chunk{i}"
        folder.mkdir()
        (folder / "quality.json").write_text(json.dumps(report))
        paths.append(str(folder / "quality.json"))
    # Commands name chunk folders under a repository root with no chunks yet.
    monkeypatch.setattr(merge_quality, "ROOT", tmp_path / "repo")
    written = merge_quality.main(["--out", str(tmp_path / "merged"), *paths])
    text = (tmp_path / "merged" / "quality.md").read_text()
    assert "--first-seed 1" in text and "## Coverage" in text
    n = len(written["expected"]["ring"])
    assert f"| ring | 2 of {n} | pfmm (1) | {n - 3} of {n} |" in text
    # What is left of the full run, as commands: pfmm lacks seed 1 on the ring.
    ring = [run for run in written["remaining"] if run["dataset"] == "ring"]
    assert [run["seed"] for run in ring] == [0, 1]
    assert "pfmm" not in ring[0]["rows"] and "pfmm" in ring[1]["rows"]
    assert "--first-seed 1" in ring[1]["command"]
    # Each command writes to a folder of its own, never over an earlier chunk.
    assert ring[1]["command"].endswith(
        "--out benchmarks/results/full-subset/ring-seed1"
    )
    for taken in ["ring-seed1", "ring-seed1-2"]:
        (tmp_path / "repo" / merge_quality.SUBSET / taken).mkdir(parents=True)
    again = merge_quality.remaining(written, written["expected"])
    assert again[1]["command"].endswith("full-subset/ring-seed1-3")
    # Every record took 1 s; the baseline trains again with the missing rows.
    assert ring[1]["train_min"] == pytest.approx((len(ring[1]["rows"]) + 1) / 60)


@pytest.mark.slow
def test_merge_draws_the_figure_from_the_saved_samples_of_one_seed(
    tmp_path, monkeypatch
):
    import merge_quality

    fm = [{"rmse@nfe1": 2.0, "rmse@nfe128": 0.1}]
    good = [{"rmse@nfe1": 0.3, "rmse@nfe2": 0.1}]
    chunks = {
        "a": _run({"flow-matching": fm, "emd": good}),
        "b": _run({"flow-matching": fm, "pfmm": good, "lsd": good}),
        # Seed 1 ran elsewhere: its figure is committed, its samples are not.
        "c": _run({"flow-matching": fm, "emd": good, "ctm": good}, first_seed=1),
    }
    chunks["c"]["datasets"]["ring"]["figure"] = "quality-ring.png"
    paths = []
    for name, report in chunks.items():
        folder = tmp_path / name
        (folder / "samples" / "ring").mkdir(parents=True)
        (folder / "quality.json").write_text(json.dumps(report))
        paths.append(str(folder / "quality.json"))
    (tmp_path / "c" / "quality-ring.png").write_bytes(b"drawn by c")
    rng = np.random.default_rng(0)
    saved = {"a": ["flow-matching", "emd"], "b": ["flow-matching", "pfmm"]}
    for name, rows in saved.items():
        folder = tmp_path / name / "samples" / "ring"
        for file in [
            "noise",
            "data",
            *(f"{row}-nfe{k}" for row in rows for k in (1, 2)),
        ]:
            np.save(folder / f"{file}.npy", rng.normal(size=(50, 2)))
    drawn = []
    real = reporting.write_figure

    def spy(ds, folders, path):
        drawn.append((list(ds["rows"]), folders))
        real(ds, folders, path)

    monkeypatch.setattr(reporting, "write_figure", spy)
    monkeypatch.setattr(merge_quality, "ROOT", tmp_path / "repo")
    out = tmp_path / "merged"
    # Seed 0's samples cover 3 rows, no more than c's figure shows: copy that.
    merged = merge_quality.main(["--out", str(out), *paths])
    assert merged["datasets"]["ring"]["figure"] == "quality-ring.png"
    assert (out / "quality-ring.png").read_bytes() == b"drawn by c" and not drawn
    # With lsd's samples seed 0 covers 4 rows: drawn from both of its chunks,
    # ctm (seed 1 only) left out rather than shown empty.
    np.save(tmp_path / "b" / "samples" / "ring" / "lsd-nfe1.npy", np.zeros((50, 2)))
    merge_quality.main(["--out", str(out), *paths])
    ring = [tmp_path / name / "samples" / "ring" for name in ("a", "b")]
    assert drawn == [(["flow-matching", "lsd", "emd", "pfmm"], ring)]  # merged order
    figure = (out / "quality-ring.png").read_bytes()
    assert figure.startswith(b"\x89PNG")
    assert merged_rows(out) == ["flow-matching", "lsd", "emd", "pfmm"]
    # Merged again where the samples are gone (a fresh machine), the 4-row figure
    # in `out` stays rather than c's 3-row one replacing it.
    for name in ("a", "b"):
        shutil.rmtree(tmp_path / name / "samples")
    merge_quality.main(["--out", str(out), *paths])
    assert (out / "quality-ring.png").read_bytes() == figure and len(drawn) == 1
    assert merged_rows(out) == ["flow-matching", "lsd", "emd", "pfmm"]
    # Without that record of what it shows, the fullest chunk figure wins.
    (out / "quality.json").unlink()
    merge_quality.main(["--out", str(out), *paths])
    assert (out / "quality-ring.png").read_bytes() == b"drawn by c"
    assert merged_rows(out) == ["flow-matching", "emd", "ctm"]


def merged_rows(out):
    report = json.loads((out / "quality.json").read_text())
    return report["datasets"]["ring"]["figure_rows"]


def test_merge_refuses_other_settings():
    import merge_quality

    rows = {"flow-matching": [{"rmse@nfe128": 0.1}]}
    other = _run(rows, settings=SETTINGS | {"width": 16}, first_seed=1)
    with pytest.raises(ValueError, match="width': 16"):
        merge_quality.merge([_run(rows), other])
