"""What each difference from the authors' code does to the loss and the gradient.

```
python benchmarks/reference_differences.py [--out DIR] [--render]
```

For every registry method with a `"reference"` preset (the settings of its
authors' code), each setting of the preset is turned back to fmcalc's default on
its own, and the loss and its gradient are compared with the full preset's:

- **loss**: `|L - L_ref| / |L_ref|`, with `L` the mean loss over `BATCHES` batches;
- **gradient**: `‖g - g_ref‖ / ‖g_ref‖`, with `g` the gradient of that mean;

both at training step `STEP`, where the curricula are still warming up.

Every method sees the same network (a class-conditional MLP trained briefly by
flow matching, also used as the EMA and, for distillation, as the teacher), data
and keys. A setting that changes how
batches are drawn changes the batches too, so the line `noise` repeats the full
preset on other keys: a difference below it is not resolved by this measurement.
Rows go to `DIR/differences.json`; `DIR/<method>.md`, shown on the method's page
of the documentation, is rendered from them alone.
"""

import argparse
import json
import pathlib
import re
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from _machine import clean_machine

import fmcalc
from fmcalc import methods
from fmcalc.nn import MLP, WithLogVariance


OUT = pathlib.Path(__file__).resolve().parent / "results" / "reference-differences"
# 250 rows: a batch size whose fractions round and floor differently.
DIM, CLASSES, ROWS, BATCHES = 8, 4, 250, 64
# The training step the losses are taken at: inside every preset's and default's
# warm-up, so a schedule's setting shows (at step 0 every warm-up starts alike).
STEP = 1000


def _text(value) -> str:
    """A setting's value on one line (equinox prints modules over several)."""
    text = re.sub(r"\(\n\s*", "(", repr(value))
    text = re.sub(r",?\n\s*\)", ")", text)
    return re.sub(r",\n\s*", ", ", text)


def _problem() -> tuple[jax.Array, jax.Array, WithLogVariance]:
    """Data of four classes at twice the unit scale (so shortcut models' clip at
    ±4 is reached) and an MLP trained on it by 300 steps of flow matching, with
    label dropout 0.1 so that it has seen the null label."""
    key_x, key_c, key_m, key_fit = jax.random.split(jax.random.key(0), 4)
    labels = jax.random.randint(key_c, (2048,), 0, CLASSES)
    centres = 2.0 * jax.random.normal(jax.random.key(1), (CLASSES, DIM))
    data = centres[labels] + 0.5 * jax.random.normal(key_x, (2048, DIM))
    model = MLP(DIM, width=64, depth=2, num_classes=CLASSES, key=key_m)
    method = methods.get("flow-matching").replace(label_dropout=0.1)
    result = fmcalc.train.fit(
        method, model, data, labels=labels, key=key_fit, steps=300, batch_size=128,
        options=fmcalc.train.Options(progress=False),
    )  # fmt: skip
    # The learned log-variance of the self-distillation presets reads `w = 1`, as
    # their authors' MLPs do; the other methods call the network alone.
    return data, labels, WithLogVariance(result.model, 1.0)


def _measure(method, data, labels, model, seed: int):
    """The mean loss over `BATCHES` batches drawn from `seed`, and its gradient."""
    keys = jax.random.split(jax.random.key(seed), BATCHES)

    def draw(key):
        rows = jax.random.choice(jax.random.fold_in(key, 1), data.shape[0], (ROWS,))
        return method.batch(key, data[rows], cond=labels[rows])

    batches = jax.vmap(draw)(keys)
    # Distillation methods take the flow-matching network's velocity as teacher.
    teacher = fmcalc.model_velocity(model.network)

    def mean_loss(model):
        def one(b):
            return method.loss(model, b, ema=model, teacher=teacher, step=STEP)[0]

        return jnp.mean(jax.vmap(one)(batches))

    loss, grads = eqx.filter_jit(eqx.filter_value_and_grad(mean_loss))(model)
    flat = jnp.concatenate([g.ravel() for g in jax.tree.leaves(grads)])
    return float(loss), np.asarray(flat, np.float64)


def _row(name, setting, method, problem, reference, seed: int = 0) -> dict:
    loss, grad = _measure(method, *problem, seed)
    ref_loss, ref_grad = reference
    return {
        "method": name,
        "setting": setting,
        "loss": abs(loss - ref_loss) / abs(ref_loss),
        "gradient": float(np.linalg.norm(grad - ref_grad) / np.linalg.norm(ref_grad)),
    }


def measure() -> list[dict]:
    rows = []
    with jax.enable_x64(True):
        data, labels, model = _problem()
        problem = (
            data.astype(jnp.float64),
            labels,
            jax.tree.map(
                lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a,
                model,
            ),
        )
        for name in methods.names():
            preset = methods.info(name).presets.get("reference")
            if not preset:
                continue
            full = methods.get(name, preset="reference")
            reference = _measure(full, *problem, 0)
            for key, value in preset.items():
                others = {k: v for k, v in preset.items() if k != key}
                method = methods.get(name, **others)
                setting = f"{key} = {_text(value)}"
                rows.append(_row(name, setting, method, problem, reference))
            rows.append(_row(name, "noise", full, problem, reference, seed=1))
    return rows


def missing(rows: list[dict]) -> list[str]:
    """The preset settings that `rows` has no line for: one per method with a
    reference preset and setting, plus each method's `noise` line."""
    found = {(r["method"], r["setting"].partition(" = ")[0]) for r in rows}
    wanted = [
        (name, key)
        for name in methods.names()
        for key in [*methods.info(name).presets.get("reference", {}), "noise"]
        if methods.info(name).presets.get("reference")
    ]
    return [f"{name}: {key}" for name, key in wanted if (name, key) not in found]


def render(rows: list[dict], out: pathlib.Path, record: dict) -> None:
    """`<method>.md` per method in `rows`."""
    for name in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == name]
        lines = [
            "Each setting of preset 'reference' turned back to the default on its "
            "own: the change of the loss and of its gradient relative to the full "
            "preset's, on one network, data set and set of batches "
            "(`benchmarks/reference_differences.py`). `noise` repeats the preset "
            "on other batches.",
            "",
            "| setting turned off | loss change | gradient change |",
            "|---|---|---|",
        ]
        for r in mine:
            lines.append(
                f"| `{r['setting']}` | {r['loss']:.2g} | {r['gradient']:.2g} |"
            )
        lines += ["", f"Measured at {record['commit']} with `{record['command']}`."]
        (out / f"{name}.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=OUT)
    parser.add_argument("--render", action="store_true")
    parser.add_argument(
        "--allow-dirty",
        action="store_true",
        help="measure from a working tree with uncommitted changes (recorded)",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "differences.json"
    if args.render:
        found = json.loads(path.read_text())
    else:
        git = clean_machine(args.allow_dirty)["git"]
        commit = (git["commit"] or "unknown")[:7] + (" (dirty)" if git["dirty"] else "")
        found = {
            "record": {
                "commit": commit,
                "command": "python benchmarks/reference_differences.py",
            },
            "rows": measure(),
        }
        path.write_text(json.dumps(found, indent=1) + "\n")
    lacking = missing(found["rows"])
    if lacking:
        raise SystemExit(f"{path} has no line for {lacking}; rerun the measurement.")
    render(found["rows"], args.out, found["record"])


if __name__ == "__main__":
    sys.exit(main())
