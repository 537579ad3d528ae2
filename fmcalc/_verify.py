"""The verification table behind `fmcalc check`, and the table of `fmcalc methods`.

The checks run on analytic flows: the flow-map identities on the exact Gaussian and on
a Gaussian mixture (diffrax reference), in float64 and float32, with each derivative
strategy; every consistency rule built from primitives evaluated on the exact map; the
marginal-from-conditional test; and the fixed-point test of every registered training
method (the exact map must not move under its update). `groups` lists them in the order
they run, `not_run` the methods left out with the reason; `fmcalc check` streams
the rows of each group as `format_row` lays them out, under `header`.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Row(NamedTuple):
    """One check: what it ran on (`flow`, `dtype`, derivative `strategy`), the
    measured `value`, the `criterion` it must meet and whether it `passed`."""

    flow: str
    check: str
    dtype: str
    strategy: str
    value: float
    criterion: str
    passed: bool


def _gaussian(dtype):
    from .flows import Gaussian

    key_q, key_mean = jax.random.split(jax.random.PRNGKey(0))
    dim = 8
    q, _ = jnp.linalg.qr(jax.random.normal(key_q, (dim, dim), jnp.float64))
    lam = jnp.geomspace(1e-2, 2.0, dim)
    cov = (q * lam[None, :]) @ q.T
    mean = jax.random.normal(key_mean, (dim,), jnp.float64)
    return Gaussian(mean.astype(dtype), ((cov + cov.T) / 2).astype(dtype))


def _mixture(dtype):
    from .flows import GaussianMixture

    angles = jnp.linspace(0, 2 * jnp.pi, 4, endpoint=False)
    means = 2.0 * jnp.stack([jnp.cos(angles), jnp.sin(angles)], axis=1)
    covs = jnp.stack([jnp.diag(jnp.array([0.05 + 0.05 * i, 0.1])) for i in range(4)])
    weights = jnp.array([0.1, 0.2, 0.3, 0.4])
    return GaussianMixture(
        weights.astype(dtype), means.astype(dtype), covs.astype(dtype)
    )


def _points(flow, n, dtype, key):
    k_data, k_noise, k_times = jax.random.split(key, 3)
    x0 = flow.sample(k_data, n).astype(dtype)
    eps = jax.random.normal(k_noise, x0.shape, dtype)
    times = jnp.sort(jax.random.uniform(k_times, (n, 3), dtype), axis=1)
    # Include the edges of [0, 1].
    times = times.at[0].set(jnp.array([0.0, 0.5, 1.0], dtype))
    times = times.at[1].set(jnp.array([0.0, 0.0, 1.0], dtype))
    t, u, s = times[:, 0], times[:, 1], times[:, 2]
    return x0, eps, s, u, t


def _identity_rows(name, flow, dtype, tol, n) -> list[Row]:
    from . import testing
    from ._conventions import interpolate

    x0, eps, s, u, t = _points(flow, n, dtype, jax.random.PRNGKey(1))
    x = interpolate(x0, eps, s)
    found = testing.all_residuals(
        flow.flow_map, flow.average_velocity, flow.velocity, x, s, u, t
    )
    label = jnp.dtype(dtype).name
    return [
        Row(name, identity, label, "jvp", value, f"<= {tol:.0e}", value <= tol)
        for identity, value in found.items()
    ]


def _order_rows(name, flow) -> list[Row]:
    from . import testing

    x0, eps, s, _, t = _points(flow, 8, jnp.float64, jax.random.PRNGKey(2))
    i = 4
    x = (1 - s[i]) * x0[i] + s[i] * eps[i]
    tangents = {
        "lagrangian": (jnp.zeros_like(x), 0.0, 1.0),
        "eulerian": (flow.velocity(x, s[i]), 1.0, 0.0),
    }
    rows = []
    for identity, tangent in tangents.items():
        for scheme, order in (("forward", 1), ("central", 2)):
            slope, _ = testing.derivative_convergence(
                flow.flow_map,
                (x, s[i], t[i]),
                tangent,
                scheme=scheme,
                steps=np.logspace(-4, -1, 5),
            )
            rows.append(
                Row(
                    name,
                    f"{identity} FD order, {scheme}",
                    "float64",
                    f"fd-{scheme}",
                    slope,
                    f"{order} ± 0.3",
                    abs(slope - order) <= 0.3,
                )
            )
    return rows


def _rule_rows(flow, dtype, tol, n) -> list[Row]:
    from . import (
        Batch,
        Diagonal,
        FiniteDifference,
        Teacher,
        compositional,
        eulerian,
        evaluate,
        improved_meanflow,
        lagrangian,
        meanflow,
    )

    x0, eps, s, u, t = _points(flow, n, dtype, jax.random.PRNGKey(3))
    batch = Batch(x0, eps, s, t, u)
    label = jnp.dtype(dtype).name
    rules = {
        "lagrangian F (LSD)": lagrangian(form="F", velocity=Diagonal()),
        "lagrangian V": lagrangian(form="V"),
        "eulerian F": eulerian(form="F", stop_gradient="none"),
        "eulerian V": eulerian(form="V"),
        "meanflow": meanflow(velocity=Teacher()),
        "improved meanflow": improved_meanflow(velocity=Teacher()),
        "compositional V": compositional(),
        "compositional F": compositional(form="F"),
    }
    rows = []
    for name, rule in rules.items():
        r = jax.jit(
            jax.vmap(
                lambda ex, rule=rule: evaluate(
                    rule, ex, model=flow, teacher=flow.velocity
                )
            )
        )(batch)
        value = float(jnp.max(jnp.abs(r)))
        rows.append(
            Row(
                "gaussian",
                f"rule: {name}",
                label,
                "jvp",
                value,
                f"<= {tol:.0e}",
                value <= tol,
            )
        )
    if dtype == jnp.float64:
        mf = meanflow(derivative=FiniteDifference(1e-4, "central"), velocity=Teacher())
        r = jax.vmap(lambda ex: evaluate(mf, ex, model=flow, teacher=flow.velocity))(
            batch
        )
        value = float(jnp.max(jnp.abs(r)))
        rows.append(
            Row(
                "gaussian",
                "rule: meanflow, central finite difference",
                label,
                "fd-central h=1e-4",
                value,
                "<= 1e-6",
                value <= 1e-6,
            )
        )
    return rows


def _unbiased_rows() -> list[Row]:
    from . import lagrangian, meanflow
    from .testing import check_unbiased, perturbed

    flow = _gaussian(jnp.float64)
    model = perturbed(flow, 8, key=jax.random.PRNGKey(4))
    key = jax.random.PRNGKey(5)
    unbiased = check_unbiased(meanflow(), model, flow, key=key)
    biased = check_unbiased(lagrangian(), model, flow, key=key)
    return [
        Row(
            "gaussian",
            "meanflow with eps - x0: unbiased",
            "float64",
            "jvp",
            unbiased.p_value,
            "p > 1e-6",
            unbiased.p_value > 1e-6,
        ),
        Row(
            "gaussian",
            "lagrangian with eps - x0: flagged",
            "float64",
            "jvp",
            biased.p_value,
            "p < 1e-6",
            biased.p_value < 1e-6,
        ),
    ]


_FINITE_STEP = ("ct", "cd", "ect")


def _method_rows(n: int, names: list[str]) -> list[Row]:
    """The fixed-point test of registered methods on the exact Gaussian map."""
    from . import FiniteDifference, methods
    from .testing import check_fixed_point

    flow = _gaussian(jnp.float64)
    rows = []
    for name in names:
        method = methods.get(name)
        strategy = "default"
        if any(isinstance(d, FiniteDifference) for d in _derivatives(method)):
            method = method.replace(derivative=FiniteDifference(1e-5, "central"))
            strategy = "fd-central 1e-5"
        result = check_fixed_point(
            method, flow, key=jax.random.PRNGKey(6), n=n, step=10**6
        )
        residual = max(c.relative_residual for c in result.terms)
        p_values = [c.p_value for c in result.terms if c.conditional]
        criterion = "rel. residual ≤ 1e-6" + (", p > 1e-6" if p_values else "")
        rows.append(
            Row(
                "gaussian",
                f"method {name}: exact map is a fixed point",
                "float64",
                strategy,
                residual,
                criterion,
                result.passed,
            )
        )
    return rows


def _derivatives(method):
    from . import AbstractDerivative

    return [
        leaf
        for leaf in jax.tree.leaves(
            method, is_leaf=lambda x: isinstance(x, AbstractDerivative)
        )
        if isinstance(leaf, AbstractDerivative)
    ]


# Biased by construction at a finite step (their tests measure the order instead).
_FINITE_STEP_REASON = (
    "biased by construction at a finite step Δs, so the exact map is not its fixed "
    "point (the test suite measures that the bias shrinks with Δs instead)"
)


def groups(*, quick: bool = False) -> list[tuple[str, Callable[[], list[Row]]]]:
    """The checks in the order they run: `(title, compute rows)` pairs."""
    n = 64 if quick else 256
    out: list[tuple[str, Callable[[], list[Row]]]] = []
    for dtype in (jnp.float64, jnp.float32):
        tol = 1e-10 if dtype == jnp.float64 else 1e-4
        name = jnp.dtype(dtype).name
        out.append(
            (
                f"Gaussian identities, {name}",
                lambda d=dtype, tol=tol: _identity_rows(
                    "gaussian", _gaussian(d), d, tol, n
                ),
            )
        )
        out.append(
            (
                f"rules on the exact Gaussian map, {name}",
                lambda d=dtype, tol=tol: _rule_rows(_gaussian(d), d, tol, n),
            )
        )
    out.append(
        (
            "finite-difference order, Gaussian",
            lambda: _order_rows("gaussian", _gaussian(jnp.float64)),
        )
    )
    for dtype, tol in ((jnp.float64, 1e-8), (jnp.float32, 1e-4)):
        out.append(
            (
                f"mixture identities, {jnp.dtype(dtype).name}",
                lambda d=dtype, tol=tol: _identity_rows(
                    "mixture", _mixture(d), d, tol, 32 if quick else 64
                ),
            )
        )
    out.append(
        (
            "finite-difference order, mixture",
            lambda: _order_rows("mixture", _mixture(jnp.float64)),
        )
    )
    out.append(("marginal-from-conditional (Hotelling)", _unbiased_rows))
    from . import methods

    for name in methods.names():
        if name not in _FINITE_STEP:
            out.append(
                (
                    f"fixed point of {name}",
                    lambda name=name: _method_rows(500 if quick else 2000, [name]),
                )
            )
    return out


def not_run() -> list[tuple[str, str]]:
    """The registry methods `check` leaves out, each with the reason."""
    return [(f"method {name}", _FINITE_STEP_REASON) for name in _FINITE_STEP]


def check(*, quick: bool = False) -> list[Row]:
    """Run every check and return the rows of the table."""
    return [row for _, compute in groups(quick=quick) for row in compute()]


_WIDTHS = (8, 48, 7, 18, 9, 30, 6)
_HEADER = ("flow", "check", "dtype", "strategy", "value", "criterion", "result")


LEGEND = (
    "How to read the value column, by check:",
    "  identities of the exact map, each the largest |residual| over the points:",
    "    semigroup F(F(x, s, u), u, t) = F(x, s, t); inverse F(F(x, s, t), t, s) = x;",
    "    boundary F(x, t, t) = x; diagonal V(x, t, t) = v(x, t); parameterisation",
    "    F = x + (t - s) V; lagrangian ∂t F = v(F, t); eulerian ∂s F + ∇x F · v = 0",
    "  '... FD order, ...': the measured order of a finite difference (the slope of",
    "    its error against its step, log-log)",
    "  'rule: NAME': the largest |residual| of the method's rule at the exact map",
    "  '... with eps - x0: ...': the p-value of the paired test that eps - x0 leaves",
    "    the expected update unchanged (large: unbiased; tiny: flagged)",
    "  'method NAME: ...': the largest relative residual of check_fixed_point",
)


def header() -> str:
    """The table's column titles and the rule under them, two lines."""
    return "\n".join((_line(_HEADER), "-|-".join("-" * w for w in _WIDTHS)))


def format_row(row: Row) -> str:
    """One row as a line of the table, in its fixed column widths."""
    cells = (
        row.flow,
        row.check,
        row.dtype,
        row.strategy,
        f"{row.value:.2e}",
        row.criterion,
        "pass" if row.passed else "FAIL",
    )
    return _line(cells)


def _line(cells) -> str:
    return " | ".join(str(c).ljust(w) for c, w in zip(cells, _WIDTHS, strict=True))


def format_table(rows: list[Row]) -> str:
    """The rows as a table of fixed column widths (the one `fmcalc check` streams)."""
    return "\n".join([header()] + [format_row(r) for r in rows])


def methods_table(verbose: bool = False) -> str:
    """The registered methods: taxonomy, terms with their share of rows, static cost
    in forward-pass equivalents per data row (with the default split, and with every
    term on every row); with `verbose`, each method's residuals."""
    from . import methods

    header = (
        "method",
        "full name",
        "rule",
        "learning",
        "output",
        "terms",
        "FPE split",
        "FPE all",
    )
    body = []
    texts = []
    for name in methods.names():
        m = methods.get(name)
        full_name = methods.info(name).full_name
        shares = m.split or (1.0,) * len(m.terms)
        terms = ", ".join(
            f"{t.name} {share:.3g}" if m.split else t.name
            for t, share in zip(m.terms, shares, strict=True)
        )
        full = m.replace(split=None).cost() if m.split else m.cost()
        body.append(
            (
                name,
                full_name,
                m.rule,
                m.learning,
                m.output,
                terms,
                f"{m.cost():.2f}",
                f"{full:.2f}",
            )
        )
        texts.append(str(m))
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(8)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(header, widths, strict=True))]
    lines.append("-|-".join("-" * w for w in widths))
    lines += [
        " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True))
        for line in body
    ]
    if verbose:
        lines += ["", *texts]
    lines += [
        "",
        "FPE: training cost in forward-pass equivalents per data row (a forward "
        "pass is 1, a backward pass 2, a forward pass with its JVP 2). FPE split: "
        "with the method's "
        "split of the batch between its terms (the share after each term's name); "
        "FPE all: every term on every row.",
        "`fmcalc methods NAME`: one method's citation, formula, options and cost.",
    ]
    return "\n".join(lines)
