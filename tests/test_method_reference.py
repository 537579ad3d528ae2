"""Every registry method says what it is: full name, citation, summary, formula,
options, cost and deviations, from `fmcalc.methods.doc` and `fmcalc methods NAME`."""

import inspect
import pathlib
import re

import pytest

import fmcalc
from fmcalc._cli import main


NAMES = fmcalc.methods.names()


@pytest.mark.parametrize("name", NAMES)
def test_every_method_carries_its_facts(name):
    info = fmcalc.methods.info(name)
    assert info.name == name
    assert info.full_name and info.summary
    # Authors, a quoted title, a venue and a year.
    assert '"' in info.citation and any(
        str(y) in info.citation for y in range(2020, 2030)
    )
    assert all(d.strip() for d in info.deviations)


@pytest.mark.parametrize("name", NAMES)
def test_cli_prints_the_reference_entry(name, capsys):
    assert main(["methods", name]) == 0
    out = capsys.readouterr().out
    assert out.strip() == fmcalc.methods.doc(name).strip()
    info = fmcalc.methods.info(name)
    assert out.startswith(f"{name}: {info.full_name}")
    for section in ("formula", "options", "cost", "deviations"):
        assert f"\n{section}" in out, section
    assert info.citation.split(",")[0] in out
    # Every option with its default.
    for option, parameter in fmcalc.methods.options(name).items():
        assert f"{option}" in out and repr(parameter.default) in out
    # Cross-references of the documentation are plain names in a terminal.
    assert "][]" not in out


@pytest.mark.slow
def test_listing_gives_full_names(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in NAMES:
        assert fmcalc.methods.info(name).full_name in out
    # The cost columns are explained under the table.
    assert "FPE split: with the method's split" in out and "FPE all:" in out


def test_unknown_name_is_refused(capsys):
    assert main(["methods", "no-such-method"]) == 2
    assert "lsd" in capsys.readouterr().err


def test_markdown_form():
    text = fmcalc.methods.doc("meanflow", format="markdown")
    assert text.startswith("### `meanflow`: MeanFlow")
    assert "| `loss` |" in text and "Dieleman's table: 4" in text
    # A ValueError, or the run-time type check's TypeError first under pytest.
    with pytest.raises((ValueError, TypeError), match="format"):
        fmcalc.methods.doc("meanflow", format="html")  # pyright: ignore


def test_register_needs_its_facts():
    with pytest.raises(TypeError, match="citation"):
        fmcalc.methods.register("x", full_name="X", citation="", summary="y")
    assert "x" not in fmcalc.methods.names()


def test_options_are_the_builders_keywords_and_the_reduction():
    options = fmcalc.methods.options("lsd")
    assert list(options) == [
        "derivative", "times", "split", "loss", "noise_scale", "reduction"
    ]  # fmt: skip
    assert options["reduction"].default == "sum"
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in options.values())


def test_a_comparison_names_a_test_that_exists_and_builds_the_method():
    """`compared_with` names the test that makes the comparison; that file exists,
    names the method and, for a method with a reference preset, builds it."""
    root = pathlib.Path(__file__).resolve().parent.parent
    compared = 0
    for name in fmcalc.methods.names():
        text = fmcalc.methods.info(name).compared_with
        if text is None:
            continue
        compared += 1
        paths = re.findall(r"tests/\w+\.py", text)
        assert paths, f"{name}: {text!r} names no test"
        source = "".join((root / path).read_text() for path in paths)
        assert f'"{name}"' in source, (name, paths)
        if fmcalc.methods.info(name).presets.get("reference"):
            assert 'preset="reference"' in source, (name, paths)
    assert compared >= 5


def test_code_read_but_not_run_is_said_so_on_the_page():
    """A method whose authors' code (or a named stand-in) was read but whose loss no
    test recomputes says so, naming what was read; a method with neither is one of
    the few not compared at all."""
    neither = set()
    for name in fmcalc.methods.names():
        facts = fmcalc.methods.info(name)
        if facts.compared_with is None and facts.read_code is None:
            neither.add(name)
        elif facts.compared_with is None:
            assert re.search(r"at [0-9a-f]{7}", facts.read_code), (
                name,
                facts.read_code,
            )
            page = " ".join(fmcalc.methods.doc(name).split())
            assert "Read, not run:" in page and "no test recomputes" in page, name
    assert neither == {"flow-matching", "lmd", "emd", "pfmm", "ct", "cd", "freeflow"}


def test_sct_takes_a_loss_and_keeps_its_default():
    assert fmcalc.methods.get("sct") == fmcalc.methods.get(
        "sct", loss=fmcalc.SquaredError()
    )
    weighted = fmcalc.methods.get("sct", loss=fmcalc.LogVariance(source="model"))
    assert isinstance(weighted.terms[0].loss, fmcalc.LogVariance)
