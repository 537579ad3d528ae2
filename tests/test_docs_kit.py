"""`docs/kit.md` runs as written: its Python blocks execute in order in one
namespace, and its printed explanation is what `fmcalc.explain` prints."""

import pathlib
import re

import pytest


PAGE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "kit.md"
# The page's `check_training` trains flow matching's baseline with the defaults of
# tests/test_training_check.py: one worker runs both, and trains it once.
pytestmark = pytest.mark.xdist_group("check_training")


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", PAGE.read_text(), flags=re.S)


@pytest.mark.slow
def test_the_page_runs_and_its_printout_is_current(capsys):
    namespace: dict = {}
    for block in _blocks("python"):
        exec(compile(block, str(PAGE), "exec"), namespace)
    printed = capsys.readouterr().out
    (shown,) = _blocks("text")
    for line in shown.strip().splitlines():
        assert line in printed, line
