"""What produced a benchmark's numbers: machine, load, versions and commit."""

import importlib.metadata
import os
import pathlib
import platform
import subprocess
from typing import Any

import jax


ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("fmcalc", "jax", "jaxlib", "equinox", "optax", "diffrax", "numpy")


def versions() -> dict[str, str | None]:
    """Installed versions of the packages a benchmark's numbers depend on."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git() -> dict[str, Any]:
    """The checked-out commit and whether the working tree has changes."""

    def run(*args) -> str | None:
        try:
            return subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    return {"commit": run("rev-parse", "HEAD"), "dirty": dirty(run("status", "-s"))}


def dirty(status: str | None) -> bool:
    """Whether `git status -s` shows a change that could alter a result: any
    change outside `benchmarks/results/`, where runs write their own rows while
    other chunks start (every row records the trial it read from there)."""
    for line in (status or "").splitlines():
        # `XY PATH`; the first line may have lost its leading blank to a strip.
        path = line.split(None, 1)[-1]
        if not path.startswith("benchmarks/results/"):
            return True
    return False


def device_label(machine: dict[str, Any]) -> str:
    """The JAX backend, with the accelerator's name and any matmul precision set
    (`gpu (NVIDIA H200), matmul precision highest`); records written before those
    fields existed give the backend alone."""
    label = machine["jax_backend"]
    if machine.get("device_kind") and label != "cpu":
        label += f" ({machine['device_kind']})"
    if machine.get("matmul_precision"):
        label += f", matmul precision {machine['matmul_precision']}"
    return label


def provenance(record: dict[str, Any]) -> str:
    """`Command: ...; commit ...; N min on PROCESSOR (K CPU cores).` from a run's
    record (`command`, `seconds` and `machine()`); a run from a working tree with
    uncommitted changes says so."""
    found = record["machine"]
    commit = f"commit `{found['git']['commit']}`"
    if found["git"].get("dirty"):
        commit += " with uncommitted changes, so not reproducible from it"
    return (
        f"Command: `{record['command']}`; {commit}; "
        f"{record['seconds'] / 60:.1f} min on {found['processor']} "
        f"({found['cpu_count']} CPU cores)."
    )


def machine() -> dict[str, Any]:
    """The machine, its load average at the call, the JAX devices, the package
    versions, and the commit and tree state when this module was imported: the
    code a benchmark loaded when it started, even if the tree changes while it
    runs."""
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": load,
        "python": platform.python_version(),
        "jax_backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "matmul_precision": jax.config.jax_default_matmul_precision,
        "versions": versions(),
        "git": dict(AT_START),
    }


# The tree as the benchmark that imports this module found it, before it ran.
AT_START = git()


def clean_machine(allow_dirty: bool) -> dict[str, Any]:
    """`machine()`, after refusing a tree with uncommitted changes unless
    `allow_dirty` (the run is then recorded as dirty): a benchmark's rows must be
    traceable to a commit."""
    found = machine()
    if found["git"]["dirty"] and not allow_dirty:
        raise SystemExit(
            "The working tree has uncommitted changes, so the results could not be "
            "traced to a commit: commit them, or pass --allow-dirty (recorded as "
            "dirty with the results)."
        )
    return found
