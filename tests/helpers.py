import contextlib
import dataclasses
import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np

import fmcalc
from fmcalc.flows import Gaussian


def random_gaussian(key, dim: int, min_eigenvalue: float = 0.1) -> Gaussian:
    """A full-covariance Gaussian with eigenvalues in [min_eigenvalue, 2]."""
    k_q, k_mean = jax.random.split(key)
    q, _ = jnp.linalg.qr(jax.random.normal(k_q, (dim, dim)))
    lam = jnp.geomspace(min_eigenvalue, 2.0, dim)
    cov = (q * lam[None, :]) @ q.T
    return Gaussian(jax.random.normal(k_mean, (dim,)), (cov + cov.T) / 2)


def random_batch(key, flow, n: int, *, with_u: bool = True) -> fmcalc.Batch:
    """Data from `flow`, noise, and times `s >= u >= t` uniform on [0, 1]."""
    k_data, k_noise, k_times = jax.random.split(key, 3)
    x0 = flow.sample(k_data, n)
    eps = jax.random.normal(k_noise, x0.shape, x0.dtype)
    times = jnp.sort(jax.random.uniform(k_times, (n, 3), x0.dtype), axis=1)
    t, u, s = times[:, 0], times[:, 1], times[:, 2]
    return fmcalc.Batch(x0, eps, s, t, u if with_u else None)


def residuals(expr, batch, **networks):
    return jax.vmap(lambda ex: fmcalc.evaluate(expr, ex, **networks))(batch)


def loglog_slope(steps, errors) -> float:
    return float(np.polyfit(np.log(steps), np.log(errors), 1)[0])


@contextlib.contextmanager
def without_runtime_typechecks():
    """Switch off the jaxtyping/beartype hook to reach fmcalc's own validation, which
    is what users running without the hook see."""
    previous = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", previous)


OPTION_FIELDS = frozenset(f.name for f in dataclasses.fields(fmcalc.train.Options))
DEVICE_FIELDS = frozenset(f.name for f in dataclasses.fields(fmcalc.train.Devices))


def fit(method, model, data, **kwargs):
    """`fmcalc.train.fit` without a progress bar, where the fields of
    `fmcalc.train.Options` (`checkpoint=`, `divergence=`, ...) and of
    `fmcalc.train.Devices` (`mesh=`, `accumulate=`, ...) may also be passed as
    keywords of their own: the tests vary one option at a time."""
    fields = {name: kwargs.pop(name) for name in list(kwargs) if name in OPTION_FIELDS}
    devices = {name: kwargs.pop(name) for name in list(kwargs) if name in DEVICE_FIELDS}
    options = kwargs.pop("options", None)
    if devices:
        fields["devices"] = fmcalc.train.Devices(**devices)
    if options is None:
        options = fmcalc.train.Options(**({"progress": False} | fields))
    elif fields:
        raise TypeError(f"pass {sorted(fields)} in `options`, not beside it")
    return fmcalc.train.fit(method, model, data, options=options, **kwargs)


BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """The module `benchmarks/NAME.py`, with its folder importable (the scripts
    import their siblings, `_render`, `_datasets`, ...)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(
        f"fmcalc_benchmark_{name}", BENCHMARKS / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_record(command: str, commit: str = "abc1234", dirty: bool = False) -> dict:
    """A benchmark run's record as `_machine.provenance` reads it: the command, a
    minute of time and a two-core machine at `commit`."""
    return {
        "command": command,
        "seconds": 60.0,
        "machine": {
            "git": {"commit": commit, "dirty": dirty},
            "processor": "x86_64",
            "cpu_count": 2,
        },
    }


def assert_same_loss_and_grads(
    ours, theirs, model, *, rtol=1e-12, grad_rtol=1e-10, grad_atol=1e-14
):
    """`ours(model)` and `theirs(model)`, two scalar losses of the same model: equal
    values to `rtol` and equal parameter gradients to `grad_rtol`/`grad_atol`.
    Returns `ours`'s gradients, for a test that checks more of them."""
    import equinox as eqx

    loss, grads = eqx.filter_value_and_grad(ours)(model)
    expected, expected_grads = eqx.filter_value_and_grad(theirs)(model)
    np.testing.assert_allclose(loss, expected, rtol=rtol)
    for a, b in zip(
        jax.tree.leaves(grads), jax.tree.leaves(expected_grads), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=grad_rtol, atol=grad_atol)
    return grads
