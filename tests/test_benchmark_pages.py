"""The benchmark pages quote only what the results files hold: every number in
their prose occurs in a committed results JSON, and every table they include is a
file under `benchmarks/results/`."""

import pathlib
import re

import pytest


ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAGES = sorted((ROOT / "docs" / "benchmarks").glob("*.md"))
INCLUDE = re.compile(r'^--8<--\s+"([^"]+)"\s*$', re.MULTILINE)
NUMBER = re.compile(r"(?<![\w.-])\d+(?:\.\d+)?(?:e-?\d+)?(?!\w)")


def prose(text: str) -> str:
    """The page without code, inline code, links and included files."""
    for pattern, flags in (
        (r"^```.*?^```", re.MULTILINE | re.DOTALL),
        (INCLUDE.pattern, re.MULTILINE),
        (r"`[^`\n]*`", 0),
        (r"\[[^\]]*\]\([^)]*\)", 0),
    ):
        text = re.sub(pattern, "", text, flags=flags)
    return text


def untraced_numbers(text: str, results: str) -> list[str]:
    """The numbers in `text`'s prose that no results file contains."""
    known = set(re.findall(r"\d+(?:\.\d+)?(?:e-?\d+)?", results))
    return [n for n in NUMBER.findall(prose(text)) if n not in known]


@pytest.fixture(scope="module")
def results() -> str:
    files = [*RESULTS.rglob("*.json"), *RESULTS.rglob("*.jsonl")]
    return "\n".join(p.read_text() for p in sorted(files))


def test_there_are_pages_and_results(results):
    assert PAGES and len(results) > 10_000


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_number_in_the_prose_is_in_a_results_file(page, results):
    assert untraced_numbers(page.read_text(), results) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_included_tables_are_results_files(page):
    for include in INCLUDE.findall(page.read_text()):
        path = (ROOT / include).resolve()
        assert path.is_relative_to(RESULTS) and path.exists(), include


def test_a_typed_number_is_caught(results):
    page = "MeanFlow reaches 4.6173 after 60317 steps.\n\n```python\nx = 98765\n```\n"
    assert untraced_numbers(page, results) == ["4.6173", "60317"]
    # Numbers in code, inline code, links and included files are not prose.
    quiet = 'Run `--steps 98765`; see [run 98765](a.md).\n--8<-- "b/98765.md"\n'
    assert untraced_numbers(quiet, results) == []


def test_reference_differences_name_every_preset_setting_and_re_render(tmp_path):
    """Each method with a reference preset has a measured line per setting and a
    noise line; the committed pages re-render from the committed rows alone."""
    import json
    import shutil

    from helpers import load_benchmark

    differences = load_benchmark("reference_differences")

    results = ROOT / "benchmarks" / "results" / "reference-differences"
    found = json.loads((results / "differences.json").read_text())
    assert differences.missing(found["rows"]) == []
    # A failing input: a setting's line removed.
    dropped = [r for r in found["rows"] if not r["setting"].startswith("clip =")]
    assert differences.missing(dropped) == ["shortcut: clip"]
    shutil.copy(results / "differences.json", tmp_path)
    differences.main(["--out", str(tmp_path), "--render"])
    for page in results.glob("*.md"):
        assert (tmp_path / page.name).read_text() == page.read_text(), page.name


def test_the_jump_control_report_re_renders_from_its_rows(tmp_path):
    import json
    import shutil

    from helpers import load_benchmark

    jump_control = load_benchmark("jump_control")
    results = ROOT / "benchmarks" / "results" / "jump-control"
    shutil.copy(results / "rows.jsonl", tmp_path)
    jump_control.main(["--out", str(tmp_path), "--render"])
    committed = (results / "jump-control.md").read_text()
    assert (tmp_path / "jump-control.md").read_text() == committed
    # The spec that never learns jumps is among the rows, at every budget.
    rows = [json.loads(line) for line in (results / "rows.jsonl").open()]
    budgets = {r["steps"] for r in rows}
    assert {r["steps"] for r in rows if r["method"] == jump_control.NO_JUMP} == budgets
