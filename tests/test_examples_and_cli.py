"""The main job and the examples run and say what they should."""

import runpy
import sys
from pathlib import Path

import pytest

from fmcalc._cli import main


EXAMPLES_DIR = Path(__file__).parent.parent / "examples"

# Each example: its arguments for a quick run, and lines its output must contain.
EXAMPLES = {
    "quickstart": ((), ("measured cost",)),
    "meanflow": (("--steps", "20"), ("meanflow (eulerian", "2-step paired error")),
    "lsd": (("--steps", "20"), ("rows per term: [192, 64]", "2-step paired error")),
    "shortcut": (("--steps", "20"), ("V_ema(F_ema(", "2-step paired error")),
    "ayf_emd": (("--steps", "20"), ("step 10: r = 1.00", "2-step paired error")),
    "new_method": (
        ("--steps", "20"),
        (
            "rejected: Term 'eulerian': `D~fd[central",
            "-> pass",
            "measured (FPE)",
            "paired error",
        ),
    ),
}


def test_check_passes(capsys):
    assert main(["check", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "0 failed" in out
    for needle in ("semigroup", "lagrangian FD order", "rule: meanflow", "flagged"):
        assert needle in out


def test_every_example_is_run():
    assert sorted(p.stem for p in EXAMPLES_DIR.glob("*.py")) == sorted(EXAMPLES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_runs(name, monkeypatch, capsys):
    args, needles = EXAMPLES[name]
    path = EXAMPLES_DIR / f"{name}.py"
    monkeypatch.setattr(sys, "argv", [str(path), *args])
    runpy.run_path(str(path), run_name="__main__")
    out = capsys.readouterr().out
    for needle in needles:
        assert needle in out
