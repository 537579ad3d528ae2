"""Set up a virtual environment and run fmcalc's main job or its tests.

    python3 dev.py check          # verify the library: identities on analytic flows
    python3 dev.py test           # the test suite
    python3 dev.py test --fast    # its fast tier (leaves out tests marked slow)

Needs only Python 3.11+; the first run creates `.venv` and installs fmcalc with its
test extras (re-installed whenever pyproject.toml changes).
"""

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path


ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".fmcalc-installed"


def ensure_environment() -> None:
    # Run by whatever python3 the user has, so the version floor is checked here.
    if sys.version_info < (3, 11):  # noqa: UP036
        found = sys.version.split()[0]
        sys.exit(f"fmcalc needs Python 3.11 or newer; this is {found}.")
    if not (BIN / "python").exists():
        _say(f"dev.py: creating the virtual environment {VENV}")
        venv.EnvBuilder(with_pip=True).create(VENV)
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == digest:
        return
    _say(
        "dev.py: installing fmcalc with its test extras into .venv "
        '(pip install -e ".[test,dev]": jax, equinox, optax, diffrax, orbax, grain, '
        "flax, scikit-learn, mkdocs, pytest, ...); this takes a few minutes once, "
        "and again only when pyproject.toml changes"
    )
    pip = [str(BIN / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "-e", f"{ROOT}[test,dev]"], check=True)
    STAMP.write_text(digest)
    _say("dev.py: installed")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _test(extra: list[str]) -> list[str]:
    """pytest on two workers; `--fast` leaves out the tests marked slow. Tests
    marked `xdist_group` run on one worker, sharing what a process caches."""
    fast = ["-m", "not slow"] if "--fast" in extra else []
    rest = [arg for arg in extra if arg != "--fast"]
    workers = ["-n", "2", "--dist", "loadgroup"]
    return [str(BIN / "python"), "-m", "pytest", *workers, *fast, *rest]


COMMANDS = {
    "check": lambda extra: [str(BIN / "python"), "-m", "fmcalc", "check", *extra],
    "test": _test,
}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(__doc__)
        return 2
    ensure_environment()
    command = COMMANDS[sys.argv[1]](sys.argv[2:])
    return subprocess.run(command, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
