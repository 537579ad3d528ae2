"""Faults a run survives: SIGTERM and SIGKILL mid-run, then a resume that continues
bit for bit; and checkpoints damaged in every part of the file, each refused with a
message.

The killed runs are subprocesses (`fault_run.py`); so is the uninterrupted run they
are compared with, so that all of them compile in the same environment.
"""

import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import fault_run
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fmcalc import train


CHILD = Path(__file__).with_name("fault_run.py")


def _start(checkpoint: Path, losses: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(CHILD), str(checkpoint), str(losses)],
        stdout=subprocess.PIPE,
        text=True,
    )


def _run(checkpoint: Path, losses: Path) -> np.ndarray:
    """Run (or resume) to the end; the losses of the call, after the step they
    start from."""
    process = _start(checkpoint, losses)
    process.communicate(timeout=300)
    assert process.returncode == 0
    return np.load(losses)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> np.ndarray:
    directory = tmp_path_factory.mktemp("uninterrupted")
    losses = _run(directory / "run.eqx", directory / "losses.npy")
    assert losses[0] == 0 and losses.size == fault_run.STEPS + 1
    return losses[1:]


@pytest.mark.slow
@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"]
)
def test_killed_run_resumes_bit_for_bit(uninterrupted, tmp_path, signum):
    checkpoint = tmp_path / "run.eqx"
    process = _start(checkpoint, tmp_path / "killed.npy")
    assert process.stdout is not None
    printed = 0
    while printed < 3 * fault_run.EVERY + 7:
        printed = int(process.stdout.readline())
    process.send_signal(signum)
    rest, _ = process.communicate(timeout=120)
    printed = max([printed, *map(int, rest.split())])
    # Ended by the signal itself, as if the run had not caught it.
    assert process.returncode == -signum
    saved = train.checkpoint_header(checkpoint)["step"]
    if signum == signal.SIGTERM:
        # Saved at the signal: no step the run had taken is lost.
        assert saved >= printed
    else:
        assert printed - fault_run.EVERY <= saved < printed
    resumed = _run(checkpoint, tmp_path / "resumed.npy")
    assert resumed[0] == saved
    assert np.array_equal(resumed[1:], uninterrupted[saved:])


# Damaged checkpoints -------------------------------------------------------------

MAGIC = len(b"FMCALC-CHECKPOINT\n")
PREAMBLE = MAGIC + struct.calcsize("<IQ32s")


def _state(model) -> train.TrainState:
    opt_state = optax.adam(1e-3).init(eqx.filter(model, eqx.is_inexact_array))
    return train.TrainState(model, model, opt_state, 7, jax.random.key(0))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint's bytes, the state it holds and where its header ends."""
    model = eqx.nn.MLP(2, 2, 8, 2, activation=jax.nn.silu, key=jax.random.key(1))
    state = _state(model)
    path = tmp_path_factory.mktemp("saved") / "state.eqx"
    train.save_checkpoint(path, state)
    contents = path.read_bytes()
    (length,) = struct.unpack("<Q", contents[MAGIC + 4 : MAGIC + 12])
    return contents, state, PREAMBLE + length


def _flip(contents: bytes, i: int) -> bytes:
    return contents[:i] + bytes([contents[i] ^ 0x10]) + contents[i + 1 :]


@pytest.mark.parametrize(
    "where, match",
    [
        ("magic", "does not start with"),
        ("format", "its format is"),
        ("header length", "header length is corrupt|header does not match"),
        ("header checksum", "header does not match its sha256"),
        ("header", "header does not match its sha256"),
        ("payload start", "arrays do not match their sha256"),
        ("payload end", "arrays do not match their sha256"),
        ("truncated in the magic", "truncated to 5 bytes"),
        ("truncated in the preamble", "truncated to 30 bytes"),
        ("truncated in the header", "file ends after"),
        ("truncated in the payload", "should take .* bytes but"),
        ("extended", "should take .* bytes but"),
        ("empty", "truncated to 0 bytes"),
    ],
)
def test_damaged_checkpoint_is_refused(saved, tmp_path, where, match):
    contents, state, header_end = saved
    damaged = {
        "magic": lambda c: _flip(c, 3),
        "format": lambda c: _flip(c, MAGIC),
        "header length": lambda c: _flip(c, MAGIC + 4),
        "header checksum": lambda c: _flip(c, MAGIC + 12),
        "header": lambda c: _flip(c, PREAMBLE + 40),
        "payload start": lambda c: _flip(c, header_end + 2),
        "payload end": lambda c: _flip(c, len(c) - 1),
        "truncated in the magic": lambda c: c[:5],
        "truncated in the preamble": lambda c: c[:30],
        "truncated in the header": lambda c: c[: PREAMBLE + 10],
        "truncated in the payload": lambda c: c[: header_end + 100],
        "extended": lambda c: c + b"\0",
        "empty": lambda c: b"",
    }[where](contents)
    path = tmp_path / "state.eqx"
    path.write_bytes(damaged)
    with pytest.raises(train.CheckpointError, match="is damaged: " + f"(.*)({match})"):
        train.load_checkpoint(path, state)
    with pytest.raises(train.CheckpointError, match="is damaged"):
        train.checkpoint_header(path)


def test_every_byte_of_the_file_is_covered(saved, tmp_path):
    """Any single flipped byte, anywhere, is refused."""
    contents, state, _ = saved
    path = tmp_path / "state.eqx"
    for i in range(0, len(contents), max(1, len(contents) // 97)):
        path.write_bytes(_flip(contents, i))
        with pytest.raises(train.CheckpointError, match="is damaged"):
            train.load_checkpoint(path, state)


def test_another_activation_with_equal_shapes_is_refused(saved, tmp_path):
    contents, _, _ = saved
    path = tmp_path / "state.eqx"
    path.write_bytes(contents)
    relu = eqx.nn.MLP(2, 2, 8, 2, activation=jax.nn.relu, key=jax.random.key(1))
    with pytest.raises(train.CheckpointError, match="another model") as error:
        train.load_checkpoint(path, _state(relu))
    assert "`.model.activation` is jax._src.nn.functions.silu there but " in str(
        error.value
    )
    assert not error.value.damaged


def test_header_records_what_wrote_it(saved, tmp_path):
    contents, state, _ = saved
    path = tmp_path / "state.eqx"
    path.write_bytes(contents)
    header = train.checkpoint_header(path)
    assert header["format"] == 1 and header["step"] == 7
    assert set(header["versions"]) == {"fmcalc", "jax", "equinox"}
    assert header["tree"][".model.layers[0].weight"] == "float64[8, 2]"
    assert header["tree"][".key"] == "key<threefry2x32>[]"
    json.dumps(header)
    loaded = train.load_checkpoint(path, state)
    assert loaded.step == 7


def test_a_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "state.eqx"
    model = eqx.nn.MLP(2, 2, 8, 2, key=jax.random.key(1))
    first, second = _state(model), eqx.tree_at(lambda s: s.step, _state(model), 8)
    train.save_checkpoint(path, first)
    train.save_checkpoint(path, second)
    assert train.checkpoint_header(path)["step"] == 8
    assert train.checkpoint_header(f"{path}.prev")["step"] == 7
    assert sorted(os.listdir(tmp_path)) == ["state.eqx", "state.eqx.prev"]


def test_a_bare_array_file_is_refused(tmp_path):
    path = tmp_path / "state.eqx"
    model = eqx.nn.MLP(2, 2, 8, 2, key=jax.random.key(1))
    with open(path, "wb") as f:
        eqx.tree_serialise_leaves(f, jnp.zeros(3))
    with pytest.raises(train.CheckpointError, match="bare array file"):
        train.load_checkpoint(path, _state(model))


_REFUSED_DIRECTORY = """
import os, resource, signal, sys
import jax
import fmcalc
from fmcalc import train
from fmcalc.nn import MLP
from fmcalc.train._orbax import save

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead
run = sys.argv[1]
data = jax.random.normal(jax.random.key(1), (64, 2))
result = train.fit(
    fmcalc.methods.get("lsd"), MLP(2, width=32, depth=2, key=jax.random.key(0)),
    data, key=jax.random.key(2), steps=2, batch_size=16,
    options=train.Options(progress=False),
)
save(run, result.state, {}, None)
_, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (2000, hard))
try:
    save(run, result.state, {}, None)
except train.CheckpointError as error:
    print("REFUSED", error.path == run, error.damaged, str(error))
print("LEFT", sorted(os.listdir(run)))
resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
print("STEP", train.checkpoint_header(run)["step"])
save(run, result.state, {}, None)
print("SAVES", sorted(name for name in os.listdir(run)))
"""


@pytest.mark.slow
def test_a_refused_directory_save_is_a_checkpoint_error(tmp_path):
    """A file-size limit hit while orbax writes a checkpoint directory: a
    `CheckpointError` naming the directory and the cause, the earlier save still
    read, the unfinished one removed before the error is raised (writes still in
    flight would race with orbax's own clean-up on the next save), and the next
    save succeeds."""
    run = tmp_path / "run"
    process = subprocess.run(
        [sys.executable, "-c", _REFUSED_DIRECTORY, str(run)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr[-3000:]
    out = process.stdout
    assert "REFUSED True False Could not save the checkpoint directory" in out, out
    assert "File too large (errno 27); the earlier saves [0] are kept" in out
    assert "LEFT ['0']" in out, out
    assert "STEP 2" in out
    assert "SAVES ['0', '1']" in out
