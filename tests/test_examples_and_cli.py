"""The main job and the examples run and say what they should."""

import runpy
import sys
from pathlib import Path

import pytest

from fmcalc._cli import main


EXAMPLES_DIR = Path(__file__).parent.parent / "examples"

# Each example: its arguments for a quick run, and lines its output must contain.
# Every example trains with `fmcalc.train.fit`, prints flow matching's paired error
# beside its own and saves a figure.
BASELINE = ("paired error", "flow matching", "figure:")
EXAMPLES = {
    "quickstart": (("--steps", "20"), ("measured cost", "step 20", *BASELINE)),
    "meanflow": (("--steps", "20"), ("meanflow (eulerian", "step 20", *BASELINE)),
    "lsd": (("--steps", "20"), ("rows per term: [192, 64]", *BASELINE)),
    "shortcut": (("--steps", "20"), ("V_ema(F_ema(", "2-step paired error", *BASELINE)),
    "ayf_emd": (("--steps", "20"), ("step 10: r = 1.00", *BASELINE)),
    "flax_model": (("--steps", "20"), ("back in Flax: AverageVelocity", *BASELINE)),
    "new_method": (
        ("--steps", "20"),
        (
            "rejected: Term 'eulerian': `D~fd[central",
            "-> pass",
            "measured (FPE)",
            *BASELINE,
        ),
    ),
}


@pytest.mark.slow
def test_check_passes(capsys, monkeypatch):
    """Every group of `fmcalc check --quick` except the per-method fixed points,
    which tests/test_methods.py runs for the whole registry, and which are kept
    here for the methods biased by construction and one unbiased method."""
    import fmcalc._verify as verify

    every = verify.groups
    kept = {f"fixed point of {name}" for name in ("ct", "cd", "ect", "meanflow")}

    def groups(quick):
        out = every(quick=quick)
        return [g for g in out if not g[0].startswith("fixed point") or g[0] in kept]

    monkeypatch.setattr(verify, "groups", groups)
    assert main(["check", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "0 failed" in out
    for needle in ("semigroup", "lagrangian FD order", "rule: meanflow", "flagged"):
        assert needle in out
    rows = [line.split(" | ") for line in out.splitlines() if line.count(" | ") == 6]
    labels = [tuple(cell.strip() for cell in row[:3]) for row in rows[1:]]
    assert len(labels) == len(set(labels)), "row labels (flow, check, dtype) repeat"
    for name in ("ct", "cd", "ect"):
        assert f"method {name}: biased by construction" in out


@pytest.mark.slow
def test_check_streams_rows_and_lists_what_it_leaves_out(capsys, monkeypatch):
    import fmcalc._verify as verify

    first_two = verify.groups(quick=True)[:2]
    monkeypatch.setattr(verify, "groups", lambda quick: first_two)
    assert main(["check", "--quick"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].split(" | ")[:2] == ["flow    ", "check".ljust(48)]
    assert "semigroup" in captured.out and "rule: meanflow" in captured.out
    assert "not run:" in captured.out and "0 failed" in captured.out
    # The value column and the identities' names are explained under the table.
    assert "How to read the value column" in captured.out
    assert "semigroup F(F(x, s, u), u, t) = F(x, s, t)" in captured.out
    # Stderr is not a terminal here: no progress bar is drawn into it, where its
    # redrawn lines would interleave with the rows in a shared file.
    assert "rules on the exact Gaussian map" not in captured.err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["check", "--quick"]) == 0
    assert "rules on the exact Gaussian map" in capsys.readouterr().err  # the bar


def test_check_documents_quick(capsys):
    with pytest.raises(SystemExit):
        main(["check", "--help"])
    assert "--quick" in capsys.readouterr().out


def test_every_example_is_run():
    assert sorted(p.stem for p in EXAMPLES_DIR.glob("*.py")) == sorted(EXAMPLES)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_runs(name, monkeypatch, capsys, tmp_path):
    args, needles = EXAMPLES[name]
    path = EXAMPLES_DIR / f"{name}.py"
    figure = tmp_path / f"{name}.png"
    monkeypatch.setattr(sys, "argv", [str(path), *args, "--figure", str(figure)])
    runpy.run_path(str(path), run_name="__main__")
    out = capsys.readouterr().out
    for needle in needles:
        assert needle in out
    assert figure.stat().st_size > 1000
