"""Training runs on several simulated devices or processes, for tests/test_scale.py.

`python scale_run.py SCENARIO OUT [ARGS...]` runs one scenario and writes its
results to the `.npz` file OUT (`runs PLAN` runs several, each to its own file).
The device count comes from XLA_FLAGS in the environment
(`--xla_force_host_platform_device_count=N`), set by the test before JAX starts;
in a multi-process scenario, the environment variables `COORDINATOR`,
`PROCESS_ID` and `PROCESSES` start `jax.distributed`.
"""

import json
import os
import sys

import jax


if "PROCESSES" in os.environ:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=os.environ["COORDINATOR"],
        num_processes=int(os.environ["PROCESSES"]),
        process_id=int(os.environ["PROCESS_ID"]),
        initialization_timeout=60,
        heartbeat_timeout_seconds=int(os.environ.get("HEARTBEAT", "10")),
    )

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from helpers import fit as fit_quietly  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

import fmcalc  # noqa: E402
from fmcalc import train  # noqa: E402
from fmcalc.nn import MLP, Transformer  # noqa: E402


OPTIMIZER = optax.adam(1e-3)
# Each method and each model once: (method, model kind).
PAIRS = (("meanflow", "mlp"), ("lsd", "transformer"))


def model(kind: str):
    if kind == "mlp":
        return MLP(4, width=32, depth=2, time_features=8, key=jax.random.key(0))
    return Transformer(
        16,
        patch_size=2,
        width=32,
        depth=1,
        heads=2,
        mlp_ratio=2,
        time_features=16,
        key=jax.random.key(0),
    )


def data(kind: str) -> np.ndarray:
    dim = 4 if kind == "mlp" else 16
    return np.asarray(jax.random.normal(jax.random.key(1), (512, dim), jnp.float32))


def leaves(tree) -> list[np.ndarray]:
    """The arrays of `tree`, whole, on this host (every process calls it)."""
    from fmcalc._parallel import fetch

    arrays = jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))
    return [fetch(x) for x in arrays]


def fit(method: str, kind: str, devices: int | None, **options):
    mesh = None if devices is None else Mesh(jax.devices()[:devices], ("data",))
    options = (
        dict(
            data=data(kind),
            key=jax.random.key(2),
            batch_size=32,
            optimizer=OPTIMIZER,
            ema=train.EMA(decay=0.9),
            progress=False,
            mesh=mesh,
        )
        | options
    )
    return fit_quietly(fmcalc.methods.get(method), model(kind), **options)


def save(out: str, results: dict) -> None:
    if jax.process_index() == 0:
        np.savez(out, **results)


def equal_to_one_device(out: str, steps: str) -> None:
    """MeanFlow on the MLP and LSD (which reads the EMA) on the transformer:
    every device vs one device."""
    results = {}
    for method, kind in PAIRS:
        for name, devices in (("all", None), ("one", 1)):
            result = fit(method, kind, devices, steps=int(steps))
            prefix = f"{method}/{kind}/{name}"
            results[f"{prefix}/losses"] = result.losses
            for i, leaf in enumerate(leaves(result.model)):
                results[f"{prefix}/param{i}"] = leaf
            if name == "all":
                results[f"{prefix}/devices"] = np.asarray(
                    [d.id for d in result.mesh.devices.flat]
                )
                on_mesh = all(
                    x.sharding.mesh == result.mesh
                    for x in jax.tree.leaves(eqx.filter(result.model, eqx.is_array))
                )
                results[f"{prefix}/on_mesh"] = np.asarray(on_mesh)
    save(out, results)


def stream(kind: str):
    """Batches of 32 rows, the same whatever the number of processes: each
    process yields its share of every batch."""
    dim = 4 if kind == "mlp" else 16
    rows = 32 // jax.process_count()
    first = jax.process_index() * rows
    step = 0
    while True:
        batch = np.random.default_rng(step).normal(size=(32, dim))
        yield batch[first : first + rows].astype(np.float32)
        step += 1


def run(out: str, spec: str) -> None:
    """One run described by the JSON `spec` (method, kind, steps, devices, whether
    to read a `stream`, whether to `report` each step, a `checkpoint` path saved
    `every` so many steps, and `fit`'s other options); its parameters and
    losses."""
    options = json.loads(spec)
    method, kind = options.pop("method"), options.pop("kind")
    devices = options.pop("devices", None)
    if options.pop("stream", False):
        options["data"] = stream(kind)
    every = options.pop("every", 1000)
    if "checkpoint" in options:
        options["checkpoint"] = train.Checkpoint(options["checkpoint"], every=every)
    if options.pop("report", False):

        def report(state):
            print(state.step, flush=True)
            return {}

        options["evaluation"] = train.Evaluation(report, every=1)
    result = fit(method, kind, devices, **options)
    results = {
        "losses": result.losses,
        "step": np.asarray(result.step),
        "devices": np.asarray(result.mesh.size),
    }
    for i, leaf in enumerate(leaves(result.model)):
        results[f"param{i}"] = leaf
    save(out, results)


def runs(plan: str) -> None:
    """Several runs in one process, one after another: the JSON `plan` is a list
    of `[out, spec]` pairs, each as `run` takes them. Runs with the same shapes
    share their compiled programs."""
    for out, spec in json.loads(plan):
        run(out, json.dumps(spec))


def sharded(out: str) -> None:
    """On every device: the compiled memory of the state, replicated and split;
    a split run against a replicated one; and a batch the mesh cannot split."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import scaling

    results = {}
    for name, split in (("replicated", False), ("sharded", True)):
        step = scaling.build("meanflow", model("transformer"), 16, 8, split)
        memory = step.compile().memory_analysis()
        results[f"{name}/arguments"] = np.asarray(memory.argument_size_in_bytes)
        results[f"{name}/state"] = np.asarray(step.state_bytes())
    for name, axis in (("replicated", None), ("sharded", "data")):
        result = fit("meanflow", "mlp", None, steps=10, shard_params=axis)
        for i, leaf in enumerate(leaves(result.model)):
            results[f"{name}/param{i}"] = leaf
        specs = [
            str(x.sharding.spec)
            for x in jax.tree.leaves(eqx.filter(result.opt_state, eqx.is_array))
        ]
        results[f"{name}/specs"] = np.asarray(specs)
    try:
        fit("meanflow", "mlp", None, steps=10, batch_size=12)
    except ValueError as error:
        results["refusal"] = np.asarray(str(error))
    save(out, results)


if __name__ == "__main__":
    scenario, *args = sys.argv[1:]
    scenarios = {
        "equal": equal_to_one_device,
        "run": run,
        "runs": runs,
        "sharded": sharded,
    }
    scenarios[scenario](*args)
