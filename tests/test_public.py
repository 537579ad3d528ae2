"""Every public name imports and is documented; what the project shows its users
(benchmarks, examples, documentation) uses only public names; and fmcalc's own
modules import one another without a cycle."""

import ast
import importlib
import inspect
import pathlib
import re

import pytest


ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fmcalc"


NAMESPACES = [
    "fmcalc",
    "fmcalc.datasets",
    "fmcalc.flows",
    "fmcalc.testing",
    "fmcalc.apps",
    "fmcalc.cost",
    "fmcalc.nn",
    "fmcalc.methods",
    "fmcalc.schedules",
    "fmcalc.train",
]


def _public(namespace):
    module = importlib.import_module(namespace)
    for name in dir(module):
        if name.startswith("_"):
            continue
        value = getattr(module, name)
        if inspect.ismodule(value):
            continue
        yield name, value


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_public_names_are_documented(namespace):
    names = dict(_public(namespace))
    assert names, namespace
    undocumented = [
        name
        for name, value in names.items()
        if (inspect.isclass(value) or inspect.isfunction(value))
        and not (inspect.getdoc(value) or "").strip()
    ]
    assert not undocumented, f"{namespace}: {undocumented}"


def test_module_level_leaves():
    import fmcalc

    assert [str(v) for v in (fmcalc.X, fmcalc.S, fmcalc.T, fmcalc.U)] == [
        "x",
        "s",
        "t",
        "u",
    ]


# ----------------------------------------------------------- public names only


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _attribute_path(node: ast.AST) -> list[str] | None:
    """`["fmcalc", "a", "_b"]` for the expression `fmcalc.a._b`, else `None`."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return [node.id, *reversed(parts)]
    return None


def private_uses(tree: ast.AST) -> list[tuple[int, str]]:
    """`(line, what)` for each private fmcalc module or name that `tree` imports
    (`import fmcalc._x`, `from fmcalc.a._b import c`, `from fmcalc.x import _y`) or
    reaches by attribute (`fmcalc._x.y`)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "fmcalc" and any(map(_private, parts)):
                    found.append((node.lineno, f"import {alias.name}"))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            parts = node.module.split(".")
            if parts[0] != "fmcalc":
                continue
            names = [alias.name for alias in node.names]
            if any(map(_private, parts)) or any(map(_private, names)):
                found.append(
                    (node.lineno, f"from {node.module} import {', '.join(names)}")
                )
        elif isinstance(node, ast.Attribute):
            path = _attribute_path(node)
            if path and path[0] == "fmcalc" and _private(path[-1]):
                found.append((node.lineno, ".".join(path)))
    return sorted(set(found))


FENCE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
# A block that only includes a file (`--8<-- "examples/lsd.py"`) shows that file,
# which is checked as a file.
SNIPPET = re.compile(r'^\s*--8<-- "[^"]+"\s*$')


def _sources() -> list[tuple[pathlib.Path, int, str]]:
    """`(file, first line, code)`: every Python file of the benchmarks and examples,
    and every Python block of the README and the documentation."""
    out = []
    for folder in ("benchmarks", "examples"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            out.append((path, 1, path.read_text()))
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        text = page.read_text()
        for match in FENCE.finditer(text):
            code = match.group(1)
            lines = code.splitlines()
            if all(SNIPPET.match(line) or not line.strip() for line in lines):
                continue
            out.append((page, text.count("\n", 0, match.start(1)) + 1, code))
    return out


def test_users_see_only_public_names():
    """Benchmarks, examples and documentation show how to use fmcalc, so they use
    only its public names: no module path component or imported name of fmcalc's
    that starts with `_`. (The benchmarks' own helper modules, `_datasets` and the
    like, are theirs.)"""
    sources = _sources()
    assert len(sources) > 20, "no benchmarks, examples or documentation found"
    bad = []
    for path, first, code in sources:
        where = path.relative_to(ROOT)
        try:
            tree = ast.parse(code, filename=str(where))
        except SyntaxError as error:
            bad.append(f"{where}:{first + (error.lineno or 1) - 1}: {error.msg}")
            continue
        bad += [
            f"{where}:{first + line - 1}: {what}" for line, what in private_uses(tree)
        ]
    assert not bad, "private fmcalc names in use:\n" + "\n".join(bad)


def test_private_uses_are_found():
    code = """
import fmcalc._run
import fmcalc.apps._likelihood as lik
from fmcalc._cli import main
from fmcalc.testing._training import paired_error
from fmcalc.testing import _error
from fmcalc import _sampling
x = fmcalc._sampling.sample_batch
import fmcalc, fmcalc.apps, _datasets
from fmcalc.testing import paired_error
from _metrics import median_paired_error
from . import _local
y = fmcalc.__version__
"""
    assert [line for line, _ in private_uses(ast.parse(code))] == [2, 3, 4, 5, 6, 7, 8]


# ------------------------------------------------------------ no import cycle


def _module_names() -> dict[str, pathlib.Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    name = test.attr if isinstance(test, ast.Attribute) else getattr(test, "id", None)
    return name == "TYPE_CHECKING"


def _imports(node: ast.AST):
    """Every import statement in `node`, at any depth (in functions too), except
    under `if TYPE_CHECKING:`."""
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
    children = ast.iter_child_nodes(node)
    if isinstance(node, ast.If) and _is_type_checking(node):
        children = node.orelse
    for child in children:
        yield from _imports(child)


def import_graph() -> dict[str, dict[str, str]]:
    """fmcalc's modules and what each imports of fmcalc: `graph[a][b]` is where
    (`file:line`) module `a` imports module `b`.

    Imports inside functions count as well as those at module level: they do not run
    at load time, but a module that needs another only later still depends on it,
    and a cycle through them is one refactoring away from a circular import. Only
    `if TYPE_CHECKING:` blocks are left out. `from p import x` inside a package
    imports the module `p.x` when there is one, else (a name of `p`) the module `p`;
    a package's `__init__` importing its own submodules is an edge like any other,
    and importing `p.x` does not count as importing its parent packages (every
    submodule would otherwise form a cycle with `fmcalc/__init__.py`).
    """
    modules = _module_names()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, str]] = {name: {} for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in _imports(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    base = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    base = node.module or ""
                targets = [
                    f"{base}.{alias.name}"
                    if f"{base}.{alias.name}" in modules
                    else base
                    for alias in node.names
                ]
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            for target in targets:
                if target.split(".")[0] != "fmcalc":
                    continue
                found = resolve(target)
                if found is not None and found != name:
                    graph[name].setdefault(found, where)
    return graph


def cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one
    module (Tarjan's algorithm), as the list of its modules, the first repeated at
    the end."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(set(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    out = []
    for component in components:
        start = min(component)
        # Breadth first from `start` to the nearest module that imports it back.
        paths = {start: [start]}
        queue = [start]
        for v in queue:
            if start in graph[v]:
                out.append([*paths[v], start])
                break
            for w in sorted(graph[v]):
                if w in component and w not in paths:
                    paths[w] = [*paths[v], w]
                    queue.append(w)
    return sorted(out)


def test_no_import_cycle():
    graph = import_graph()
    assert "fmcalc.testing._training" in graph
    assert "fmcalc._sampling" in graph["fmcalc.testing._training"]
    found = cycles(graph)
    described = [
        " -> ".join(f"{a} ({graph[a][b]})" for a, b in zip(c, c[1:], strict=False))
        + f" -> {c[-1]}"
        for c in found
    ]
    assert not found, "import cycles:\n" + "\n".join(described)


def test_cycles_are_found():
    graph = {"a": {"b": "a.py:1"}, "b": {"c": "b.py:1"}, "c": {"a": "c.py:1"}, "d": {}}
    graph["d"]["a"] = "d.py:1"
    assert cycles(graph) == [["a", "b", "c", "a"]]


MAX_MODULE_LINES = 700


def long_modules(root: pathlib.Path, limit: int = MAX_MODULE_LINES) -> list[str]:
    """The modules under `root` longer than `limit` lines, with their lengths."""
    return [
        f"{path.relative_to(root.parent)}: {n} lines"
        for path in sorted(root.rglob("*.py"))
        if (n := len(path.read_text().splitlines())) > limit
    ]


def test_no_module_is_over_700_lines(tmp_path):
    root = pathlib.Path(__file__).resolve().parents[1] / "fmcalc"
    assert not long_modules(root), long_modules(root)
    # The check can fail: a module one line too long is named with its length.
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "long.py").write_text("x = 1\n" * (MAX_MODULE_LINES + 1))
    (package / "short.py").write_text("x = 1\n")
    assert long_modules(package) == [f"pkg/long.py: {MAX_MODULE_LINES + 1} lines"]


@pytest.mark.slow
def test_the_kit_is_an_attribute_of_fmcalc():
    """`import fmcalc; fmcalc.testing.check_fixed_point` works in a fresh process, and
    `import fmcalc` alone does not load the kit."""
    import subprocess
    import sys

    code = (
        "import sys, fmcalc\n"
        "assert 'fmcalc.testing' not in sys.modules\n"
        "print(fmcalc.testing.check_fixed_point.__name__)\n"
        "try:\n    fmcalc.no_such_name\nexcept AttributeError as e:\n    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.splitlines() == [
        "check_fixed_point",
        "module 'fmcalc' has no attribute 'no_such_name'",
    ]
