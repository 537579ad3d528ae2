"""The main job and the examples run and say what they should."""

import runpy
from pathlib import Path

import pytest

from fmcalc._cli import main


EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))


def test_check_passes(capsys):
    assert main(["check", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "0 failed" in out
    for needle in ("semigroup", "lagrangian FD order", "rule: meanflow", "flagged"):
        assert needle in out


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(path):
    runpy.run_path(str(path), run_name="__main__")
