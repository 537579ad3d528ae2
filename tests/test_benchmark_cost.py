"""`benchmarks/cost.py` on tiny networks: flow matching costs ≈ 3 FPE per data row,
MeanFlow at most the acceptance bound, a split method is measured in both layouts,
and the report files are written."""

import importlib.util
import json
import pathlib
import sys

import pytest


PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "cost.py"
sys.path.insert(0, str(PATH.parent))
_spec = importlib.util.spec_from_file_location("fmcalc_benchmark_cost", PATH)
assert _spec is not None and _spec.loader is not None
cost = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cost)

TINY = cost.Settings(
    rows=8,
    # Width 256: the input layer, whose input gradient is not needed, is a small
    # share of the FLOPs, so flow matching is close to the textbook 3.
    mlp=dict(width=256, depth=3, time_features=16),
    transformer=dict(patch_size=4, width=64, depth=1, heads=2, time_features=16),
    repeats=1,
)
# The transformer's compilation is the slow part: two methods, no building blocks.
METHODS = {"mlp": ("flow-matching", "meanflow", "lsd"),
           "transformer": ("flow-matching", "meanflow")}  # fmt: skip


@pytest.fixture(scope="module")
def report():
    networks = {
        kind: cost.run_network(
            kind, TINY, names, repeats=0, jobs=2, units=kind == "mlp", log=print
        )
        for kind, names in METHODS.items()
    }
    return {
        kind: (result, cost.checks(kind, result)) for kind, result in networks.items()
    }


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(cost.NETWORKS))
def test_flow_matching_and_meanflow(report, kind):
    result, check = report[kind]
    methods = result["methods"]
    assert list(methods) == list(METHODS[kind])
    assert 2.7 <= methods["flow-matching"]["full"]["fpe"] <= 3.2
    assert methods["meanflow"]["full"]["fpe"] <= cost.MEANFLOW_LIMIT[kind]
    assert check["meanflow"]["ok"]
    assert methods["flow-matching"]["why"] is None


@pytest.mark.slow
def test_building_blocks(report):
    units = report["mlp"][0]["units"]
    # A forward pass with its JVP is two forward passes of work.
    assert units["jvp"] == pytest.approx(2.0, abs=0.1)
    assert 5.5 <= units["jvp_backward"] <= 6.2
    assert report["transformer"][0]["units"] is None


@pytest.mark.slow
def test_split_is_cheaper_per_data_row(report):
    lsd = report["mlp"][0]["methods"]["lsd"]
    assert lsd["default_split"] == [0.75, 0.25]
    # Anchor and Lagrangian term on every row vs on 3/4 and 1/4 of them.
    assert lsd["full"]["static"] == 10.0
    assert lsd["split"]["static"] == pytest.approx(4.0)
    assert lsd["split"]["fpe"] < 0.5 * lsd["full"]["fpe"]
    assert abs(lsd["split"]["fpe"] - lsd["split"]["static"]) <= cost.STATIC_SLACK


def test_wall_ratio_is_the_ratio_of_median_times(monkeypatch):
    """On a fake clock (no timing noise): the candidate takes 3 s a call, the
    baseline 1 s but 100 s once, and the medians ignore the outlier."""
    clock = [0.0]
    monkeypatch.setattr(cost.time, "perf_counter", lambda: clock[0])
    baseline_calls = [0]

    def baseline():
        baseline_calls[0] += 1
        clock[0] += 100.0 if baseline_calls[0] == 3 else 1.0

    def candidate():
        clock[0] += 3.0

    wall = cost.wall_ratio(baseline, candidate, repeats=5)
    assert wall == {"ratio": 3.0, "baseline_ms": 1e3, "method_ms": 3e3}


def test_wall_ratio_times_a_compiled_step():
    model, others = cost.networks("mlp", TINY.mlp)
    (case,) = cost.cases(["flow-matching"], model, others, TINY.rows)
    step = cost.compile_step(case)
    wall = cost.wall_ratio(step, step, repeats=2)
    assert wall["baseline_ms"] > 0 and wall["method_ms"] > 0


def test_a_written_reason_covers_only_what_the_static_count_explains():
    units = {"flow_matching": 3.0, "jvp": 2.0, "jvp_backward": 6.0}
    explained = {"seed": 7.0, "full": {"fpe": 8.1, "static": 8.0}}
    assert cost.why("ctm", explained, units) == cost.SEED_WHY["ctm"]
    # The same written reason, but the measurement exceeds the structure it names.
    excess = {"seed": 7.0, "full": {"fpe": 10.0, "static": 8.0}}
    assert cost.why("ctm", excess, units) == "unexplained"
    rows = {"ctm": {**excess, "why": "unexplained", "split": excess["full"],
                    "default_split": False}}  # fmt: skip
    assert not cost.checks("mlp", {"methods": rows})["seed"]["ok"]


def _full_report(report, **changes) -> dict:
    """The report `cost.main` would write for the fixture's measurements."""
    return {
        "quick": True,
        "command": "python benchmarks/cost.py --quick",
        "date": "today",
        "machine": cost.machine(),
        "repeats": 0,
        "seed_slack": cost.SEED_SLACK,
        "static_slack": cost.STATIC_SLACK,
        "networks": {kind: result for kind, (result, _) in report.items()},
        "checks": {kind: check for kind, (_, check) in report.items()},
        "runtime_s": 1.0,
    } | changes


@pytest.mark.slow
def test_report_files(report, tmp_path):
    cost.write_report(_full_report(report), tmp_path)
    assert json.loads((tmp_path / "cost.json").read_text())["networks"].keys() == {
        "mlp",
        "transformer",
    }
    text = (tmp_path / "cost.md").read_text()
    assert "## MLP" in text and "## Transformer" in text and "| meanflow |" in text
    assert (tmp_path / "cost.png").stat().st_size > 0
    assert "noisy on a shared CPU" in text and "Note:" not in text


@pytest.mark.slow
def test_report_names_the_accelerator(report, tmp_path):
    """A run on a GPU names the device in the run line, prints the run's note and
    says why its wall ratios sit below the FPE ratios."""
    machine = cost.machine() | {
        "jax_backend": "gpu",
        "devices": ["cuda:0"],
        "device_kind": "NVIDIA H200",
    }
    full = _full_report(report, machine=machine, note="a lent accelerator")
    cost.write_markdown(full, tmp_path / "cost.md")
    text = (tmp_path / "cost.md").read_text()
    assert "devices cuda:0, gpu (NVIDIA H200);" in text
    assert "Note: a lent accelerator" in text
    assert "kernel launches" in text and "shared CPU" not in text
