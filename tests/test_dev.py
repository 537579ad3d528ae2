"""`dev.py`, the README's two commands: `test --fast` runs the fast tier, and a run
that installs says what it is installing before it starts."""

import importlib.util
import pathlib

import pytest


ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def dev():
    spec = importlib.util.spec_from_file_location("dev", ROOT / "dev.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fast_runs_the_fast_tier(dev):
    fast = dev.COMMANDS["test"](["--fast", "-x"])
    assert fast[-3:] == ["-m", "not slow", "-x"] and "--fast" not in fast
    full = dev.COMMANDS["test"]([])
    assert "not slow" not in full
    assert full[-4:] == ["-n", "2", "--dist", "loadgroup"]


def test_an_install_says_what_it_installs(dev, tmp_path, monkeypatch, capsys):
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "python").write_text("")
    monkeypatch.setattr(dev, "BIN", bin_)
    monkeypatch.setattr(dev, "STAMP", tmp_path / "stamp")
    commands = []
    monkeypatch.setattr(dev.subprocess, "run", lambda c, **k: commands.append(c))
    dev.ensure_environment()
    err = capsys.readouterr().err
    assert "installing fmcalc" in err and "installed" in err
    assert any("-e" in c for c in commands)
    # Installed and unchanged: silent, nothing run.
    commands.clear()
    dev.ensure_environment()
    assert not commands and not capsys.readouterr().err
