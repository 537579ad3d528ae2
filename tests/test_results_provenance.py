"""Every committed benchmark record names a commit that holds the code that made it:
the commit is in the history and has the script its command runs, unless the record
says the tree was dirty (its report then says it is not reproducible)."""

import json
import pathlib
import re
import subprocess

import pytest


ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SCRIPT = re.compile(r"\bbenchmarks/(\w+\.py)\b|^python (\w+\.py)\b")


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
    )


def records(tree, where: str = ""):
    """`(where, record)` for each mapping in `tree` that names a `commit`, with the
    nearest `command` and `dirty` flag above or beside it."""
    if isinstance(tree, dict):
        commit = tree.get("commit")
        shown = re.fullmatch(r"([0-9a-f]{7,40})( \(dirty\))?", str(commit))
        if isinstance(commit, str) and shown:
            record = {**tree, "commit": shown.group(1)}
            if shown.group(2):
                record["dirty"] = True
            yield where, record
        for key, value in tree.items():
            for found_where, record in records(value, f"{where}/{key}"):
                merged = dict(record)
                for field in ("command", "dirty"):
                    if field not in merged and field in tree:
                        merged[field] = tree[field]
                yield found_where, merged
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from records(value, f"{where}[{i}]")


def committed_records() -> list[tuple[str, dict]]:
    found = []
    for path in sorted(RESULTS.rglob("*.json")) + sorted(RESULTS.rglob("*.jsonl")):
        lines = (
            path.read_text().splitlines() if path.suffix == ".jsonl"
            else [path.read_text()]
        )  # fmt: skip
        for number, line in enumerate(lines):
            if not line.strip():
                continue
            name = f"{path.relative_to(ROOT)}:{number + 1}"
            found += list(records(json.loads(line), name))
    return found


def missing_code(record: dict, folder: str | None = None) -> str | None:
    """Why a record's commit does not hold its code, or `None` if it does (or the
    record says its tree was dirty). The code is the script its command runs, or
    without a command the script named after its results `folder`
    (`jump-control` -> `benchmarks/jump_control.py`)."""
    commit = record["commit"]
    resolved = _git("rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}")
    if resolved.returncode != 0:
        return f"commit {commit} is not in the history"
    if record.get("dirty") is True:
        return None
    scripts = [a or b for a, b in SCRIPT.findall(str(record.get("command", "")))]
    if not scripts and folder is not None:
        scripts = [folder.replace("-", "_") + ".py"]
    for script in scripts:
        shown = _git("cat-file", "-e", f"{commit}:benchmarks/{script}")
        if shown.returncode != 0:
            return f"commit {commit} has no benchmarks/{script}"
    return None


def _folder(where: str) -> str | None:
    """The results folder of a record's file, if its script is a benchmark."""
    parts = pathlib.Path(where.split(":")[0]).parts
    name = parts[2] if len(parts) > 3 else None
    script = ROOT / "benchmarks" / f"{(name or '').replace('-', '_')}.py"
    return name if name and script.exists() else None


def test_a_record_whose_commit_lacks_its_script_is_caught():
    first = _git("rev-list", "--max-parents=0", "HEAD").stdout.split()[0]
    assert missing_code({"commit": first, "command": "python benchmarks/frontier.py"})
    assert "not in the history" in missing_code(
        {"commit": "0" * 40, "command": "python benchmarks/frontier.py"}
    )
    head = _git("rev-parse", "HEAD").stdout.strip()
    assert (
        missing_code({"commit": head, "command": "python benchmarks/frontier.py"})
        is None
    )
    assert missing_code({"commit": first, "dirty": True, "command": "x"}) is None
    assert "jump_control.py" in missing_code({"commit": first}, "jump-control")


@pytest.mark.slow
def test_every_committed_record_names_a_commit_with_its_code():
    shallow = _git("rev-parse", "--is-shallow-repository").stdout.strip()
    assert shallow == "false", (
        "the records point into the repository's history, which a shallow clone "
        "lacks: clone without --depth, or run `git fetch --unshallow`"
    )
    found = committed_records()
    assert len(found) >= 10
    problems = [
        f"{where}: {reason}"
        for where, record in found
        if (reason := missing_code(record, _folder(where))) is not None
    ]
    assert not problems, "\n".join(problems[:20])
