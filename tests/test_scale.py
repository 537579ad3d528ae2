"""Training beyond one device: a mesh of simulated devices, two processes with
their own coordinator, sharded state, gradient accumulation, streams of batches,
mixed precision and checkpoint directories.

The test process has one CPU device (see conftest.py). Runs on 8 simulated devices
(`--xla_force_host_platform_device_count=8`) and on two processes (each with 2
devices, `jax.distributed` on a localhost coordinator, gloo collectives) are
subprocesses running `scale_run.py`; a run on N devices must equal the 1-device
run up to the order of floating-point sums.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import equinox as eqx
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import fit

import fmcalc
from fmcalc import testing, train
from fmcalc.nn import MLP
from fmcalc.train._orbax import save as save_directory


CHILD = Path(__file__).with_name("scale_run.py")
OPTIMIZER = optax.adam(1e-2)
# Reduction order is all that differs between layouts; Adam turns a near-zero
# gradient component's rounding into a full step, so parameters are compared as
# one vector, by norm.
RELATIVE = 1e-5


def _relative(a, b) -> float:
    a, b = (np.concatenate([np.ravel(x) for x in tree]) for tree in (a, b))
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _params(results, prefix: str = "") -> list[np.ndarray]:
    count = sum(1 for k in results if k.startswith(f"{prefix}param"))
    return [results[f"{prefix}param{i}"] for i in range(count)]


def _environment(devices: int, **extra: str) -> dict[str, str]:
    flags = f"--xla_force_host_platform_device_count={devices}"
    return os.environ | {"XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"} | extra


def _one_process(scenario: str, out: Path, *args: str, devices: int = 8):
    process = subprocess.run(
        [sys.executable, str(CHILD), scenario, str(out), *args],
        env=_environment(devices),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    return np.load(out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start_two(spec: dict, out: Path, **extra: str) -> list[subprocess.Popen]:
    """Two processes of 2 devices each, one job."""
    return _start_two_with(["run", str(out), json.dumps(spec)], **extra)


def _start_two_with(args: list[str], **extra: str) -> list[subprocess.Popen]:
    port = _free_port()
    return [
        subprocess.Popen(
            [sys.executable, str(CHILD), *args],
            env=_environment(
                2,
                COORDINATOR=f"localhost:{port}",
                PROCESSES="2",
                PROCESS_ID=str(i),
                **extra,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]


def _plan(runs: dict[str, dict], folder: Path) -> str:
    return json.dumps(
        [[str(folder / f"{name}.npz"), spec] for name, spec in runs.items()]
    )


def _runs(runs: dict[str, dict], folder: Path, devices: int) -> dict:
    """Several runs in one process, in order; their results by name."""
    process = subprocess.run(
        [sys.executable, str(CHILD), "runs", _plan(runs, folder)],
        env=_environment(devices),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    return {name: np.load(folder / f"{name}.npz") for name in runs}


def _two_process_runs(runs: dict[str, dict], folder: Path) -> dict:
    """Several runs in order, each by two processes of 2 devices."""
    for process in _start_two_with(["runs", _plan(runs, folder)]):
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
    return {name: np.load(folder / f"{name}.npz") for name in runs}


# 8 simulated devices ------------------------------------------------------------


@pytest.mark.slow
def test_eight_devices_equal_one(tmp_path):
    """50 steps of MeanFlow on the MLP and LSD on the transformer: the same
    parameters and losses on 8 devices as on 1, and the arrays stay on the
    8-device mesh."""
    results = _one_process("equal", tmp_path / "equal.npz", "50")
    for method, kind in (("meanflow", "mlp"), ("lsd", "transformer")):
        run = f"{method}/{kind}"
        assert results[f"{run}/all/devices"].tolist() == list(range(8))
        assert results[f"{run}/all/on_mesh"]
        every, one = (_params(results, f"{run}/{name}/") for name in ("all", "one"))
        assert _relative(every, one) <= RELATIVE, run
        losses = results[f"{run}/all/losses"], results[f"{run}/one/losses"]
        assert losses[0].shape == (50,)
        np.testing.assert_allclose(*losses, rtol=RELATIVE, err_msg=run)


@pytest.mark.slow
def test_sharded_state_saves_memory_and_trains_alike(tmp_path):
    results = _one_process("sharded", tmp_path / "sharded.npz")
    # The transformer's state (parameters, EMA, Adam's moments) split 8 ways.
    for what in ("state", "arguments"):
        ratio = results[f"sharded/{what}"] / results[f"replicated/{what}"]
        assert ratio <= 1 / 6, (what, ratio)
    assert (
        _relative(_params(results, "sharded/"), _params(results, "replicated/"))
        <= RELATIVE
    )
    assert any("'data'" in spec for spec in results["sharded/specs"])
    assert all(spec == "P()" for spec in results["replicated/specs"])
    refusal = str(results["refusal"])
    assert "8 devices" in refusal and "batch_size=12" in refusal
    assert "batch_size=16" in refusal


_COMMITTED_TEACHER = """
import equinox as eqx, jax, jax.numpy as jnp, numpy as np, optax
import fmcalc
from fmcalc.nn import MLP

class Velocity(eqx.Module):
    weight: jax.Array

    def __call__(self, x, t, *, cond=None):
        return self.weight * x

teacher = Velocity(jax.device_put(jnp.full(2, 0.5), jax.devices()[0]))
data = np.random.default_rng(0).normal(size=(64, 2)).astype(np.float32)
model = MLP(2, width=16, depth=1, time_features=8, key=jax.random.key(0))
result = fmcalc.train.fit(
    fmcalc.methods.get("lmd"), model, data, key=jax.random.key(2), steps=2,
    batch_size=16, optimizer=optax.adam(1e-3), teacher=teacher,
    options=fmcalc.train.Options(progress=False),
)
assert result.mesh.devices.size == 2 and np.isfinite(result.losses).all()
"""


@pytest.mark.slow
def test_teacher_on_one_device_is_read_by_every_device():
    """A teacher whose arrays sit on one device (a network trained there) serves
    a run on two devices: fit lays its arrays out on the mesh."""
    process = subprocess.run(
        [sys.executable, "-c", _COMMITTED_TEACHER],
        env=_environment(2),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert process.returncode == 0, process.stderr[-3000:]


# Two processes --------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_equal_one_and_exchange_checkpoints(tmp_path):
    """2 processes x 2 devices equal 1 process x 4 devices; a checkpoint directory
    written by the two resumes in one, and a file written by one resumes in two;
    streams give each process its rows."""
    base = {"method": "meanflow", "kind": "mlp", "every": 5}
    one = base | {"devices": 4}
    file, directory = tmp_path / "one.eqx", tmp_path / "two"
    # One process: a straight run, a file written for 20 steps, a stream.
    single = _runs(
        {
            "straight": one | {"steps": 30},
            "first": one | {"steps": 20, "checkpoint": str(file)},
            "whole": one | {"steps": 10, "stream": True},
        },
        tmp_path,
        devices=4,
    )
    straight, first = single["straight"], single["first"]
    # Two processes: resume the file to 30; write a directory for 20 steps; a
    # stream of which each process yields its half of every batch.
    two = _two_process_runs(
        {
            "again": base | {"steps": 30, "checkpoint": str(file)},
            "two": base | {"steps": 20, "checkpoint": str(directory)},
            "halves": base | {"steps": 10, "stream": True},
        },
        tmp_path,
    )
    again = two["again"]
    assert again["devices"] == 4 and again["losses"].shape == (10,)
    assert train.checkpoint_header(file)["step"] == 30
    assert _relative(_params(again), _params(straight)) <= RELATIVE
    assert directory.is_dir() and train.checkpoint_header(directory)["step"] == 20
    assert _relative(_params(two["two"]), _params(first)) <= RELATIVE
    np.testing.assert_allclose(two["two"]["losses"], first["losses"], rtol=RELATIVE)
    assert _relative(_params(two["halves"]), _params(single["whole"])) <= RELATIVE
    # One process resumes the two processes' directory to 30.
    resumed = _runs({"resumed": one | {"steps": 30, "checkpoint": str(directory)}},
                    tmp_path, devices=4)["resumed"]  # fmt: skip
    assert resumed["losses"].shape == (10,)
    assert _relative(_params(resumed), _params(straight)) <= RELATIVE


@pytest.mark.slow
def test_killing_one_process_stops_the_other(tmp_path):
    spec = {"method": "meanflow", "kind": "mlp", "steps": 10**6, "report": True}
    survivor, victim = _start_two(spec, tmp_path / "never.npz", HEARTBEAT="5")
    try:
        assert survivor.stdout is not None
        # gloo writes its own lines to stdout too.
        for line in survivor.stdout:
            if line.strip().isdigit() and int(line) >= 3:
                break
        victim.kill()
        start = time.monotonic()
        survivor.communicate(timeout=180)
        assert survivor.returncode != 0
        assert time.monotonic() - start < 180
    finally:
        for process in (survivor, victim):
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGKILL)
            process.wait()


# One device: the same code paths ---------------------------------------------------


def _model(key: int = 0) -> MLP:
    return MLP(
        2,
        width=16,
        depth=2,
        time_features=8,
        dtype=jnp.float32,
        key=jax.random.key(key),
    )


def _data() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(256, 2)).astype(np.float32)


def _fit(
    method: str | fmcalc.Method = "shortcut", data=None, **options
) -> train.TrainResult:
    options = (
        dict(
            key=jax.random.key(2),
            steps=20,
            batch_size=16,
            optimizer=OPTIMIZER,
            ema=train.EMA(decay=0.5),
            progress=False,
        )
        | options
    )
    data = _data() if data is None else data
    if isinstance(method, str):
        method = fmcalc.methods.get(method)
    return fit(method, _model(), data, **options)


def _leaves(tree) -> list[np.ndarray]:
    arrays = jax.tree.leaves(eqx.filter(tree, eqx.is_array))
    return [
        np.asarray(jax.random.key_data(x) if x.dtype == jax.random.key(0).dtype else x)
        for x in arrays
    ]


def _equal(a, b) -> bool:
    return all(
        np.array_equal(x, y) for x, y in zip(_leaves(a), _leaves(b), strict=True)
    )


@pytest.mark.slow
def test_result_names_its_mesh_and_keeps_arrays_there():
    result = _fit(steps=2)
    assert result.mesh.devices.tolist() == jax.devices()
    for x in jax.tree.leaves(
        eqx.filter((result.model, result.opt_state), eqx.is_array)
    ):
        assert x.sharding.mesh == result.mesh
    mesh = jax.sharding.Mesh(jax.devices(), ("data",))
    assert _fit(steps=2, mesh=mesh).mesh is mesh


@pytest.mark.parametrize(
    "options, error, match",
    [
        # The test run's type-check hook or fit's own message; either names it.
        (dict(mesh=jax.devices()), TypeError, "a jax.sharding.Mesh|parameter 'mesh'"),
        (dict(shard_params="model"), ValueError, "must name an axis of the mesh"),
        (dict(accumulate=0), ValueError, r"accumulate=\.\.\.\)` must be .* got 0"),
        (dict(accumulate=3), ValueError, "multiples of 3"),
        (dict(precision=jnp.bfloat16), TypeError, "Precision|parameter 'precision'"),
    ],
)
def test_bad_scale_options_are_refused(options, error, match):
    with pytest.raises(error, match=match):
        _fit(**options)


@pytest.mark.slow
def test_accumulation_equals_one_pass():
    one, four = (
        _fit("meanflow", batch_size=64, accumulate=k, optimizer=optax.adam(1e-3))
        for k in (1, 4)
    )
    assert _relative(_leaves(four.model), _leaves(one.model)) <= 1e-6
    for name in one.metrics:
        np.testing.assert_allclose(four.metrics[name], one.metrics[name], rtol=1e-6)


def _plain_stream():
    rng = np.random.default_rng(0)
    while True:
        yield rng.normal(size=(16, 2)).astype(np.float32)


def _grain_stream():
    dataset = grain.MapDataset.source(_data()).shuffle(seed=3).repeat().batch(16)
    return iter(dataset)


def _interrupt_at(step: int):
    def hook(state):
        if state.step == step:
            raise KeyboardInterrupt
        return {}

    return hook


@pytest.mark.slow
@pytest.mark.parametrize("make", [_plain_stream, _grain_stream], ids=["plain", "grain"])
def test_interrupted_stream_resumes_bit_for_bit(tmp_path, make):
    path = tmp_path / "run.eqx"
    straight = _fit(data=make())
    with pytest.raises(KeyboardInterrupt):
        _fit(
            data=make(),
            checkpoint=train.Checkpoint(path, every=5),
            evaluation=train.Evaluation(_interrupt_at(12), every=1),
        )
    position = json.loads(train.checkpoint_header(path)["stream"])
    assert position["drawn"] == 12
    assert (position["state"] is None) == (make is _plain_stream)
    resumed = _fit(data=make(), checkpoint=train.Checkpoint(path, every=5))
    assert resumed.losses.shape == (8,)
    assert _equal(resumed.model, straight.model)
    np.testing.assert_array_equal(resumed.losses, straight.losses[12:])


@pytest.mark.slow
def test_stream_batches_are_checked():
    def wrong(shape, dtype=np.float32):
        while True:
            yield np.zeros(shape, dtype)

    with pytest.raises(ValueError, match=r"shape \(8, 2\).*16 rows"):
        _fit(data=wrong((8, 2)), steps=2)
    with pytest.raises(TypeError, match="float16"):
        _fit(data=wrong((16, 2), np.float16), steps=2)
    with pytest.raises(ValueError, match="ran out after 3 batches"):
        _fit(data=iter([np.zeros((16, 2), np.float32)] * 3), steps=5)
    with pytest.raises(ValueError, match="labels"):
        _fit(data=_plain_stream(), labels=np.zeros(256, np.int32), steps=2)


@pytest.mark.slow
def test_checkpoint_directory_resumes_and_falls_back(tmp_path):
    """A checkpoint directory (what a run of several processes writes) resumes in
    one process, which goes on writing it; a damaged newest save falls back to the
    one before it."""
    straight = _fit(steps=20)
    first = _fit(steps=10)
    run = tmp_path / "run"
    # Saved by hand, without a record of the run: only its structure is checked.
    save_directory(str(run), first.state, {}, None)
    assert train.checkpoint_header(run)["step"] == 10
    loaded = train.load_checkpoint(run, first.state)
    assert loaded.step == 10 and _equal(loaded, first.state)
    resumed = _fit(steps=20, checkpoint=run)
    assert _equal(resumed.model, straight.model)
    assert sorted(os.listdir(run)) == ["0", "1"]
    # Flip one byte in each data file of the newest save's model. Orbax keeps
    # more than one copy of the array store, and which copy a restore reads is
    # its own business; damaging one chosen file passed unnoticed on some runs.
    chunks = [
        p
        for p in (run / "1" / "model").rglob("*")
        if p.is_file() and p.parent.name == "d" and p.stat().st_size > 200
    ]
    assert chunks
    for target in chunks:
        contents = bytearray(target.read_bytes())
        contents[len(contents) // 2] ^= 0xFF
        target.write_bytes(bytes(contents))
    with pytest.warns(RuntimeWarning, match="damaged.*previous checkpoint"):
        again = _fit(steps=20, checkpoint=run)
    assert again.losses.shape == (10,) and _equal(again.model, straight.model)


# Mixed precision -----------------------------------------------------------------


_DTYPES: list[str] = []


class _Recorder(eqx.Module):
    """A model that records the dtype of each call's `x` at trace time."""

    model: MLP

    def __call__(self, x, s, t, *, cond=None):
        _DTYPES.append(jnp.result_type(x).name)
        return self.model(x, s, t, cond=cond)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lsd", "meanflow"])
@pytest.mark.parametrize("jvp", [None, jnp.float32], ids=["bfloat16", "float32"])
def test_precision_runs_networks_in_16_bits(method, jvp):
    """LSD calls the network plainly (its target) and in a JVP (`∂_t F`), MeanFlow
    in a JVP whose primal is the prediction: every call in bfloat16, or the JVP's
    in float32 and the prediction apart in bfloat16; parameters stay float32."""
    _DTYPES.clear()
    result = fit(
        fmcalc.methods.get(method),
        _Recorder(_model()),
        _data(),
        key=jax.random.key(2),
        steps=3,
        batch_size=16,
        optimizer=OPTIMIZER,
        progress=False,
        precision=train.Precision(jnp.bfloat16, jvp=jvp),
    )
    expected = {"bfloat16"} if jvp is None else {"bfloat16", "float32"}
    assert set(_DTYPES) == expected
    assert all(x.dtype == jnp.float32 for x in _leaves(result.model.model))
    assert np.isfinite(result.losses).all()


def test_precision_is_checked():
    with pytest.raises(ValueError, match="bfloat16 or jnp.float16"):
        train.Precision(jnp.float32)
    with pytest.raises(ValueError, match="at least as wide"):
        train.Precision(jnp.float16, jvp=jnp.int8)
    soflow = fmcalc.methods.get("soflow")
    with pytest.raises(ValueError, match="resolution of bfloat16"):
        _fit(soflow, precision=train.Precision())


# Matrix-product precision of the testing kit ------------------------------------

_PRECISIONS: list[str | None] = []


class _PrecisionRecorder(eqx.Module):
    """A model that records the matrix-product precision in force at trace time."""

    model: testing.AffinePerturbation

    def __call__(self, x, s, t, *, cond=None):
        _PRECISIONS.append(jax.config.jax_default_matmul_precision)
        return self.model(x, s, t, cond=cond)


@pytest.mark.slow
def test_kit_checks_run_at_full_matmul_precision():
    """On GPUs float32 products default to TF32; the kit's checks set "highest"
    (which a CPU run sees at trace time), and leave the setting as it was."""
    _PRECISIONS.clear()
    flow = fmcalc.flows.Gaussian(jnp.zeros(2), jnp.eye(2))
    model = _PrecisionRecorder(testing.perturbed(flow, 2))

    def flow_map(x, s, t):
        return x + (t - s) * model(x, s, t)

    x = flow.sample(jax.random.key(0), 8)
    s, u, t = jnp.full(8, 0.9), jnp.full(8, 0.5), jnp.full(8, 0.1)
    testing.semigroup_residual(flow_map, x, s, u, t)
    testing.check_fixed_point(
        fmcalc.methods.get("meanflow"), flow, key=jax.random.key(1), n=16, model=model
    )
    assert _PRECISIONS and set(_PRECISIONS) == {"highest"}
    assert jax.config.jax_default_matmul_precision is None


# Committed measurements ------------------------------------------------------------

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _scaling_faults(rows: list[dict]) -> list[str]:
    """Where a table of `benchmarks/scaling.py` departs from what docs/scaling.md
    says of it: every model, method, device count and layout measured; per
    device, the FLOPs of a step fall as 1/N, the sharded state falls as 1/N (at
    most 1/6 of the replicated state on 8 devices) and the replicated state stays
    whole."""
    faults = []
    cells = {(r["model"], r["method"], r["devices"], r["layout"]) for r in rows}
    for model in ("mlp", "transformer"):
        for method in ("meanflow", "lsd", "shortcut"):
            for devices, layout in [(1, "data")] + [
                (n, lay) for n in (2, 4, 8) for lay in ("data", "sharded")
            ]:
                if (model, method, devices, layout) not in cells:
                    faults.append(f"missing: {model} {method} {devices} {layout}")
    one = {(r["model"], r["method"]): r for r in rows if r["devices"] == 1}
    for r in rows:
        base = one.get((r["model"], r["method"]))
        if base is None:
            continue
        n = r["devices"]
        flops = r["flops"] / base["flops"] * n
        if not 0.8 <= flops <= 1.25:
            faults.append(f"FLOPs x devices = {flops:.2f} of 1 device's: {r}")
        state = r["state_bytes"] / base["state_bytes"]
        if r["layout"] == "sharded":
            if state * n > 1.25 or (n == 8 and state > 1 / 6):
                faults.append(f"sharded state {state:.3f} of 1 device's: {r}")
        elif state != 1:
            faults.append(f"replicated state {state:.3f} of 1 device's: {r}")
    return faults


def _precision_faults(record: dict) -> list[str]:
    """Where a record of `benchmarks/precision.py` departs from the bar: bfloat16
    MeanFlow with float32 JVPs ends within 1.5 times float32's 1-step paired
    error on the ring (mean over seeds), and every run has its loss curve."""
    rows = record["training"]

    def error(policy: str) -> float:
        mine = [
            r["one_step"]
            for r in rows
            if r["method"] == "meanflow" and r["policy"] == policy
        ]
        return float(np.mean(mine)) if mine else float("nan")

    low, full = error("bfloat16, float32 JVP"), error("float32")
    faults = [] if low <= 1.5 * full else [f"1-step error {low} vs float32 {full}"]
    faults += [
        f"no loss curve: {r['method']} {r['policy']} seed {r['seed']}"
        for r in rows
        if not (r["loss_curve"] and np.all(np.isfinite(r["loss_curve"])))
    ]
    return faults


def test_committed_scaling_table_divides_the_work():
    """`benchmarks/scaling.py --out benchmarks/results`."""
    rows = json.loads((RESULTS / "scaling.json").read_text())["rows"]
    assert _scaling_faults(rows) == []


def test_scaling_check_rejects_work_that_is_not_divided():
    rows = json.loads((RESULTS / "scaling.json").read_text())["rows"]
    one = {(r["model"], r["method"]): r for r in rows if r["devices"] == 1}
    flat = [r | {"flops": one[r["model"], r["method"]]["flops"]} for r in rows]
    assert any("FLOPs" in fault for fault in _scaling_faults(flat))
    whole = [
        r | {"state_bytes": one[r["model"], r["method"]]["state_bytes"]} for r in rows
    ]
    assert any("sharded state" in fault for fault in _scaling_faults(whole))
    partial = [r for r in rows if r["model"] == "mlp"]
    assert any("missing: transformer" in fault for fault in _scaling_faults(partial))


def test_committed_precision_table_meets_the_bar():
    """`benchmarks/precision.py --out benchmarks/results`."""
    record = json.loads((RESULTS / "precision.json").read_text())
    assert _precision_faults(record) == []


def test_precision_check_rejects_a_worse_bfloat16_run():
    record = json.loads((RESULTS / "precision.json").read_text())
    worse = [
        r | {"one_step": 2 * r["one_step"]}
        if r["policy"] == "bfloat16, float32 JVP"
        else r
        for r in record["training"]
    ]
    assert _precision_faults(record | {"training": worse})
    broken = [r | {"loss_curve": [float("nan")]} for r in record["training"]]
    assert any("loss curve" in f for f in _precision_faults({"training": broken}))
