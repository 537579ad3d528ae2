"""The documentation: the site builds with `mkdocs build --strict`, every Python
block of the README and of the pages runs as pasted, the API reference covers every
public name, and the README keeps its promises (length, commands, methods table)."""

import importlib
import inspect
import json
import os
import pathlib
import pkgutil
import re
import select
import subprocess
import sys
from typing import Any

import pytest

import fmcalc


ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
# docs/kit.md runs in tests/test_docs_kit.py, which also checks its printout.
OWN_TEST = {DOCS / "kit.md"}
# Pages whose blocks take more than a few seconds (training, ODE solves).
SLOW_PAGES = {
    "README.md",
    "docs/index.md",
    "docs/getting-started.md",
    "docs/tutorials/own-data.md",
    "docs/tutorials/own-loop.md",
    "docs/tutorials/property-test.md",
    "docs/concepts/cost.md",
    "docs/scaling.md",
    "docs/apps/likelihood.md",
    "docs/apps/steering.md",
    "docs/failure-behaviour.md",
    "docs/concepts/rules.md",
    "docs/concepts/conventions.md",
    "docs/methods/index.md",
    "docs/api/train.md",
}
FENCE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
# A block that only includes a file (`--8<-- "examples/lsd.py"`) shows an example,
# which tests/test_examples_and_cli.py runs.
SNIPPET = re.compile(r'^\s*--8<-- "[^"]+"\s*$')


def _pages() -> list[pathlib.Path]:
    pages = [README, *sorted(DOCS.rglob("*.md"))]
    return [p for p in pages if p not in OWN_TEST]


def _blocks(page: pathlib.Path) -> list[tuple[int, str]]:
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        code = match.group(1)
        if all(SNIPPET.match(line) or not line.strip() for line in code.splitlines()):
            continue
        found.append((text.count("\n", 0, match.start(1)) + 1, code))
    return found


# Pages run in one interpreter per test process, each in a fresh namespace and an
# empty folder: JAX is imported once and a training step compiled for one page is
# reused by the next (most pages train the same small network). A page's output goes
# to /dev/null; the protocol is one JSON line each way.
_WORKER = """
import json, os, sys, traceback
import jax
reply, sys.stdout = sys.stdout, sys.stderr
for request in sys.stdin:
    page, folder, blocks, probe = json.loads(request)
    os.chdir(folder)
    jax.config.update("jax_enable_x64", False)  # as a fresh interpreter has it
    namespace = {"__name__": "__main__"}
    found = None
    try:
        for index, (line, code) in enumerate(blocks):
            exec(compile("\\n" * (line - 1) + code, page, "exec"), namespace)
            if probe and probe[0] == index:
                exec(probe[1], namespace)
                found = namespace["probed"]
        error = None
    except BaseException:
        error = traceback.format_exc()
    reply.write(json.dumps([error, found]) + "\\n")
    reply.flush()
"""
# What a page's blocks left behind, read after they ran: the samples of the README
# quickstart and of getting started must look like the data. On the checkerboard,
# the share of samples on the dark squares: about 0.45 for the Gaussian noise they
# start from, 1 for the data.
_CHECKERBOARD = """
import numpy as np

def _on_dark_squares(x):
    x = np.asarray(x)
    inside = np.all((x >= -2) & (x < 2), axis=1)
    return float(np.mean(inside & (np.floor(x).sum(axis=1) % 2 == 0)))

probed = {"noise": _on_dark_squares(noise)}
for steps in (1, 2):
    samples = jax.vmap(lambda e: fmcalc.sample(result.ema, e, steps=steps))(noise)
    probed[f"{steps} jump(s)"] = _on_dark_squares(samples)
"""
# Each probe runs right after the page's first block that holds its marker.
_PROBES = {
    README: ("data.distance(samples)", _CHECKERBOARD),
    DOCS / "getting-started.md": ("data.distance(samples)", _CHECKERBOARD),
}


def _probe(page: pathlib.Path) -> tuple[int, str] | None:
    if page not in _PROBES:
        return None
    marker, code = _PROBES[page]
    blocks = [code for _, code in _blocks(page)]
    return next(i for i, block in enumerate(blocks) if marker in block), code


_TIMEOUT = 900


class _Interpreter:
    def __init__(self):
        self.process: subprocess.Popen | None = None

    def _process(self) -> subprocess.Popen:
        """The running interpreter, started anew if it is not running."""
        if self.process is None or self.process.poll() is not None:
            env = dict(os.environ, MPLBACKEND="Agg")
            env.pop("XLA_FLAGS", None)  # one device, as a reader's machine has
            self.process = subprocess.Popen(
                [sys.executable, "-c", _WORKER],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                env=env,
            )
        return self.process

    def run(self, page: pathlib.Path, folder: pathlib.Path) -> tuple[str | None, Any]:
        """Runs `page`'s blocks in `folder`; **returns** the traceback (or `None`)
        and what the page's probe found."""
        process = self._process()
        stdin, stdout = process.stdin, process.stdout
        assert stdin is not None and stdout is not None
        request = [str(page), str(folder), _blocks(page), _probe(page)]
        stdin.write(json.dumps(request) + "\n")
        stdin.flush()
        ready, _, _ = select.select([stdout], [], [], _TIMEOUT)
        answer = stdout.readline() if ready else ""
        if not answer:
            self.close()
            return f"no answer within {_TIMEOUT} s, or the interpreter died", None
        error, found = json.loads(answer)
        return error, found

    def close(self):
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@pytest.fixture(scope="module")
def interpreter():
    shared = _Interpreter()
    yield shared
    shared.close()


def _id(page: pathlib.Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.mark.parametrize(
    "page",
    [
        pytest.param(p, marks=[pytest.mark.slow] if _id(p) in SLOW_PAGES else [])
        for p in _pages()
        if _blocks(p)
    ],
    ids=_id,
)
def test_code_blocks_run_as_pasted(page, tmp_path, interpreter):
    """Each page's Python blocks run in order, as pasted into a fresh interpreter, in
    an empty folder (so files a page writes do not land in the repository)."""
    error, found = interpreter.run(page, tmp_path)
    assert error is None, f"{_id(page)}:\n{error[-4000:]}"
    if page in _PROBES:
        _assert_quickstart_samples_the_data(found)


def _assert_quickstart_samples_the_data(found: dict[str, float]) -> None:
    """The quickstart's map, trained as written, puts its 1- and 2-jump samples
    on the checkerboard's dark squares far more often than the noise falls there."""
    assert 0.35 < found["noise"] < 0.55, found
    for jumps in ("1 jump(s)", "2 jump(s)"):
        assert found[jumps] >= found["noise"] + 0.15, found


def test_the_quickstart_check_fails_on_noise():
    with pytest.raises(AssertionError):
        _assert_quickstart_samples_the_data(
            {"noise": 0.45, "1 jump(s)": 0.46, "2 jump(s)": 0.47}
        )


@pytest.mark.slow
def test_site_builds_strictly(tmp_path):
    """`mkdocs build --strict`: every page, cross-reference and link resolves (no
    network needed)."""
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "methods" / "lagrangian" / "index.html").exists()


def _namespaces() -> list[str]:
    """`fmcalc` and every public submodule of it."""
    found = ["fmcalc"]
    for info in pkgutil.iter_modules(fmcalc.__path__):
        if not info.name.startswith("_"):
            found.append(f"fmcalc.{info.name}")
    return found


def _public(namespace: str) -> set[str]:
    module = importlib.import_module(namespace)
    return {
        f"{namespace}.{name}"
        for name in dir(module)
        if not name.startswith("_") and not inspect.ismodule(getattr(module, name))
    }


def test_api_reference_covers_every_public_name():
    documented = set()
    for page in (DOCS / "api").glob("*.md"):
        documented |= set(re.findall(r"^::: ([\w.]+)", page.read_text(), re.M))
    public = set().union(*(_public(ns) for ns in _namespaces()))
    missing = sorted(public - documented)
    assert not missing, f"public names without an API entry: {missing}"
    gone = sorted(documented - public - set(_namespaces()))
    assert not gone, f"API entries of names that are not public: {gone}"


def test_readme_is_short_and_keeps_its_contract():
    text = README.read_text()
    assert len(text.splitlines()) <= 150
    first = re.search(r"```bash\n(.*?)```", text, re.S)
    assert first is not None
    assert "python3 dev.py check" in first.group(1)
    assert "# the test suite\npython3 dev.py test" in first.group(1)
    assert "python3 dev.py test" in (ROOT / ".ci" / "run").read_text()
    assert 'pip install -e ".[test]"' in text and "pytest" in text
    # The quickstart: the first Python block, at most 25 lines.
    quickstart = _blocks(README)[0][1]
    assert len(quickstart.strip().splitlines()) <= 25


def test_readme_lists_every_method_with_its_full_name():
    text = README.read_text()
    for name in fmcalc.methods.names():
        info = fmcalc.methods.info(name)
        assert f"`{name}`" in text and info.full_name in text, name


def test_docs_never_link_outside_the_site():
    """Links to repository files outside docs/ break on the built site; pages name
    such files as code instead."""
    for page in DOCS.rglob("*.md"):
        for target in re.findall(r"\]\(([^)#]+)", page.read_text()):
            if "://" in target:
                continue
            resolved = (page.parent / target).resolve()
            assert DOCS in resolved.parents, f"{_id(page)} links to {target}"
