"""Training step cost on 1, 2, 4 and 8 devices, data-parallel and sharded.

```
python benchmarks/scaling.py [--quick] [--out DIR] [--devices N ...]
                             [--methods NAME ...] [--models mlp transformer]
```

For MeanFlow, LSD and shortcut on an `fmcalc.nn.MLP` and a small
`fmcalc.nn.Transformer`, the step that `fmcalc.train.fit` compiles is built on a
mesh of the first N devices, with the batch split over them and the state either
replicated (`data`) or split along the mesh (`sharded`, `fit(shard_params="data")`).
For each it records, from the compiled program, the FLOPs and the memory of one
device (XLA's `cost_analysis()` and `memory_analysis()` of the partitioned
program: arguments, of which the state `(model, EMA, Adam moments)`, and
temporaries), and the median wall time of a step. The batch is the same at every
N, so the FLOPs per device should fall as 1/N and, sharded, so should the state.

On a CPU the devices are simulated (`--xla_force_host_platform_device_count=8`,
set here when XLA_FLAGS does not say): they share the machine's cores, so the
wall times show the overhead of partitioning, not a speed-up.

Writes `scaling.md` and `scaling.json` (with the command, machine, load, versions
and commit) into `--out` after every row: by default a scratch folder under the
system's temporary directory; `--out benchmarks/results` updates the committed
table, and `--resume` keeps the rows already there and measures the rest.
"""

import os


os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _machine import machine  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

import fmcalc  # noqa: E402
from fmcalc.nn import MLP, Transformer  # noqa: E402
from fmcalc.train import Devices, TrainStep  # noqa: E402


METHODS = ("meanflow", "lsd", "shortcut")
MODELS = ("mlp", "transformer")
BATCH = 256
SCRATCH = pathlib.Path(tempfile.gettempdir()) / "fmcalc-benchmarks"


def network(kind: str, key) -> eqx.Module:
    if kind == "mlp":
        return MLP(16, width=256, depth=4, time_features=64, key=key)
    return Transformer(
        64, patch_size=2, width=64, depth=2, heads=4, time_features=64, key=key
    )


def build(method: str, model: eqx.Module, dim: int, devices: int, sharded: bool):
    """The step `fit` compiles on the first `devices` devices."""
    flow = fmcalc.flows.Gaussian(
        np.zeros(dim, np.float32), np.eye(dim, dtype=np.float32)
    )
    return TrainStep(
        fmcalc.methods.get(method),
        model,
        flow.sample,
        key=jax.random.key(1),
        batch_size=BATCH,
        optimizer=optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-4)),
        ema=fmcalc.train.EMA(decay=0.999),
        devices=Devices(
            mesh=Mesh(jax.devices()[:devices], ("data",)),
            shard_params="data" if sharded else None,
        ),
    )


def measure(method: str, kind: str, devices: int, sharded: bool, steps: int) -> dict:
    dim = 16 if kind == "mlp" else 64
    step = build(method, network(kind, jax.random.key(0)), dim, devices, sharded)
    compiled = step.compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    memory = compiled.memory_analysis()
    times = []
    state = step.state
    for _ in range(steps + 2):
        start = time.perf_counter()
        state, outputs = step(state)
        jax.block_until_ready(outputs)
        times.append(time.perf_counter() - start)
    return {
        "method": method,
        "model": kind,
        "devices": devices,
        "layout": "sharded" if sharded else "data",
        "flops": float(cost["flops"]),
        "argument_bytes": int(memory.argument_size_in_bytes),
        "temp_bytes": int(memory.temp_size_in_bytes),
        "state_bytes": step.state_bytes(state),
        "step_ms": 1e3 * statistics.median(times[2:]),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| model | method | layout | devices | GFLOP / device | x 1 device | "
        "state MB / device | x 1 device | arguments MB | temporaries MB | step ms |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = {(r["model"], r["method"]): r for r in rows if r["devices"] == 1}
    for r in rows:
        one = base.get((r["model"], r["method"]))
        flops = f"{r['flops'] / one['flops']:.3f}" if one else ""
        state = f"{r['state_bytes'] / one['state_bytes']:.3f}" if one else ""
        lines.append(
            f"| {r['model']} | {r['method']} | {r['layout']} | {r['devices']} | "
            f"{r['flops'] / 1e9:.3f} | {flops} | {r['state_bytes'] / 1e6:.3f} | "
            f"{state} | {r['argument_bytes'] / 1e6:.3f} | "
            f"{r['temp_bytes'] / 1e6:.3f} | {r['step_ms']:.1f} |"
        )
    return "\n".join(lines)


def write(out: pathlib.Path, command: str, rows: list[dict]) -> None:
    """Write the rows measured so far, so that an interrupted run can resume."""
    info = machine()
    record = {"command": command, "machine": info, "batch_size": BATCH, "rows": rows}
    (out / "scaling.json").write_text(json.dumps(record, indent=1))
    load = [round(x, 1) for x in info["load_average"] or []]
    header = (
        "# Training step on 1 to 8 devices\n\n"
        f"`{command}` at commit `{info['git']['commit']}`, on "
        f"{info['jax_backend']} ({info['device_kind']}, {len(info['devices'])} "
        f"devices; {info['processor']}, {info['cpu_count']} cores, load {load}), "
        f"jax {info['versions']['jax']}. Batch {BATCH}; per device: FLOPs and "
        "memory of the compiled, partitioned step (`data`: state replicated; "
        "`sharded`: `shard_params='data'`). On a CPU the devices are simulated and "
        "share its cores: step times show the partitioning's overhead, not a "
        "speed-up.\n\n"
    )
    (out / "scaling.md").write_text(header + table(rows) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=SCRATCH)
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument(
        "--resume", action="store_true", help="keep the rows already in --out"
    )
    parser.add_argument(
        "--quick", action="store_true", help="MLP, MeanFlow, 1 and 2 devices, 3 steps"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.devices, args.methods, args.models, args.steps = (
            [1, 2],
            ["meanflow"],
            ["mlp"],
            3,
        )
    if max(args.devices) > len(jax.devices()):
        parser.error(
            f"--devices asks for {max(args.devices)} devices; JAX sees "
            f"{len(jax.devices())}."
        )
    path = args.out / "scaling.json"
    rows = json.loads(path.read_text())["rows"] if args.resume and path.exists() else []
    done = {(r["model"], r["method"], r["devices"], r["layout"]) for r in rows}
    command = "python benchmarks/scaling.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    args.out.mkdir(parents=True, exist_ok=True)
    for kind in args.models:
        for method in args.methods:
            for devices in args.devices:
                for sharded in (False, True) if devices > 1 else (False,):
                    layout = "sharded" if sharded else "data"
                    if (kind, method, devices, layout) in done:
                        continue
                    row = measure(method, kind, devices, sharded, args.steps)
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                    write(args.out, command, rows)
    print(f"wrote {args.out / 'scaling.md'}")


if __name__ == "__main__":
    main()
