"""`benchmarks/lookahead.py`: the paired verdict and the report rendered from rows."""

import pathlib

import pytest
from helpers import load_benchmark, run_record


lookahead = load_benchmark("lookahead")


def test_the_verdict_is_paired_over_seeds():
    assert lookahead.verdict([0.1, 0.2], [0.3, 0.25]) == "better"
    assert lookahead.verdict([0.3, 0.3], [0.1, 0.2]) == "worse"
    # Lower on average but not on every seed: a tie, not a win.
    assert lookahead.verdict([0.01, 0.31], [0.3, 0.3]) == "tied"
    with pytest.raises(ValueError, match="same seeds"):
        lookahead.verdict([0.1], [0.1, 0.2])


def _row(lookahead_name, seed, energy, moves=8):
    return {
        "mixture": "m", "strength": 1.0, "moves": moves, "lookahead": lookahead_name,
        "seed": seed, "energy": energy, "floor": 0.001, "reward": -0.5,
        "exact_reward": -0.4, "outliers": 0.01, "exact_outliers": 0.005,
        "seconds_per_sample": 0.01 if lookahead_name == "flow map" else 0.001,
    }  # fmt: skip


def test_the_report_counts_the_cells(tmp_path: pathlib.Path):
    rows = [
        _row("flow map", 0, 0.01), _row("Tweedie", 0, 0.02),
        _row("flow map", 1, 0.01), _row("Tweedie", 1, 0.03),
        _row("flow map", 0, 0.05, 32), _row("Tweedie", 0, 0.02, 32),
        _row("flow map", 1, 0.01, 32), _row("Tweedie", 1, 0.03, 32),
    ]  # fmt: skip
    record = run_record("python benchmarks/lookahead.py")
    text = lookahead.render({"rows": rows, "record": record}, tmp_path)
    assert "better in 1, worse in 0 and tied in 1" in text
    assert "| m | 1 | 8 |" in text and "| better |" in text
    assert "| 10.0x |" in text
    assert (tmp_path / "lookahead.md").read_text() == text
