from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._batch import Batch
from ._derivative import JVP, FiniteDifference, forward_mode_hint
from ._expr import (
    AbstractExpr,
    Add,
    Analytic,
    Call,
    Clip,
    ConditionalVelocity,
    Constant,
    Derivative,
    Div,
    FlowMapCall,
    HasLabel,
    Indicator,
    Mul,
    Neg,
    Network,
    Normalize,
    Param,
    StopGradient,
    Sub,
    Teacher,
    TimeFunction,
    Variable,
    VelocityCall,
    _is_zero,
    walk,
)
from ._precision import Cast
from ._validate import differentiated, validate


def _name(fn: Callable) -> str:
    name = getattr(fn, "__qualname__", None)
    return name if isinstance(name, str) else type(fn).__name__


def _checked(what: str, out, x) -> Array:
    """`out`, a network's or teacher's output at `x`, checked to be a float vector
    shaped like `x`: a trailing axis of 1, or a scalar, would broadcast into a
    residual of the wrong shape and a finite, meaningless loss."""
    if jnp.shape(out) != jnp.shape(x):
        raise ValueError(
            f"{what} returned shape {jnp.shape(out)} for `x` of shape "
            f"{jnp.shape(x)}: it is called per example and must return a vector "
            f"shaped like `x`, {jnp.shape(x)} (batch with `jax.vmap`)."
        )
    dtype = jnp.result_type(out)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{what} returned dtype {dtype}; it must return a real floating vector "
            "(the dtype of `x`)."
        )
    return out


def jvp_many(fn: Callable, primals: tuple, tangents: list[tuple]):
    """`jax.jvp` of `fn` along several tangents, computing the primal once: the
    tangents are batched with `jax.vmap`, and the primal, which does not depend on
    them, stays unbatched."""
    if len(tangents) == 1:
        primal, tangent = JVP()(fn, primals, tangents[0])
        return primal, [tangent]
    stacked = _stack_tangents(primals, tangents)
    primal, out = jax.vmap(
        lambda tangent: jax.jvp(fn, primals, tangent), out_axes=(None, 0)
    )(stacked)
    return primal, list(out)


def _stack_tangents(primals: tuple, tangents: list[tuple]) -> tuple:
    """Tangents stacked along a new leading axis, each shaped and typed like its
    primal."""
    return tuple(
        jnp.stack([jnp.broadcast_to(d, jnp.shape(p)) for d in parts]).astype(
            jnp.result_type(p)
        )
        for p, parts in zip(primals, zip(*tangents, strict=True), strict=True)
    )


def _push_many(linear: Callable, primals: tuple, tangents: list[tuple]) -> list:
    """A linearised function applied to several tangents, batched with `jax.vmap`."""
    return list(jax.vmap(linear)(*_stack_tangents(primals, tangents)))


def primitive_jvps(expr: AbstractExpr) -> dict[tuple, list[Derivative]]:
    """The JVPs of networks in `expr`, grouped by the network call they compute as
    their primal: one group is evaluated together, sharing that primal."""
    groups: dict[tuple, list[Derivative]] = {}

    def visit(node):
        if isinstance(node, Derivative) and node.lowered is None:
            group = groups.setdefault(node.primal.key, [])
            if all(d.key != node.key for d in group):
                group.append(node)

    walk(expr, visit)
    return groups


class _Interpreter:
    def __init__(self, expr, batch, networks, teacher, params):
        self.expr = expr
        self.batch = batch
        self.networks = networks
        self.teacher = teacher
        self.params = params
        self.jvps = primitive_jvps(expr)
        self.differentiated = differentiated(expr)
        self.values: dict[tuple, Array] = {}
        self.in_progress: set[tuple] = set()
        self.dtype = jnp.result_type(batch.x0)

    def network(self, role: str) -> Callable:
        net = self.networks.get(role)
        if net is None:
            raise ValueError(
                f"The residual calls a network with role {role!r}, but none was "
                "passed; "
                f"pass `{'model' if role == 'online' else role}=...`."
            )
        return net

    def call_network(self, network: Network, x, a, b):
        cond = None if network.unconditional else self.batch.cond
        net = self.network(network.role)
        return _checked(self.describe(network, net), net(x, a, b, cond=cond), x)

    def separate_jvp(self, network: Network) -> bool:
        """Whether the network computes its JVPs at another precision than its
        plain calls: then a JVP's primal is not the prediction, which is called
        apart, at the plain calls' precision."""
        net = self.networks.get(network.role)
        return isinstance(net, Cast) and net.jvp_dtype != net.dtype

    def describe(self, network: Network, net: Callable) -> str:
        return f"The {network.role} network `{network.name}` ({_name(net)})"

    def __call__(self, node: AbstractExpr) -> Array:
        key = node.key
        if key in self.values:
            return self.values[key]
        value = self.compute(node, key)
        self.values[key] = value
        return value

    def compute(self, node: AbstractExpr, key: tuple) -> Array:
        if isinstance(node, Variable):
            if node.name == "x":
                return self.batch.x
            value = getattr(self.batch, node.name)
            if value is None:
                raise ValueError(
                    f"The residual uses the time `{node.name}`, but the batch has "
                    f"`{node.name}=None`."
                )
            return value
        if isinstance(node, Constant):
            return jnp.asarray(node.value, self.dtype)
        if isinstance(node, StopGradient):
            return jax.lax.stop_gradient(self(node.operand))
        if isinstance(node, Add):
            return self(node.left) + self(node.right)
        if isinstance(node, Sub):
            return self(node.left) - self(node.right)
        if isinstance(node, Mul):
            return self(node.left) * self(node.right)
        if isinstance(node, Div):
            return self(node.left) / self(node.right)
        if isinstance(node, Neg):
            return -self(node.operand)
        if isinstance(node, FlowMapCall):
            return self(node.lowered)
        if isinstance(node, Derivative):
            lowered = node.lowered
            if lowered is not None:
                if isinstance(node.strategy, FiniteDifference):
                    node.strategy.check_dtype(self.dtype)
                return self(lowered)
            self.jvp_group(node.primal.key)
            return self.values[key]
        if isinstance(node, Call):
            if key in self.jvps and not self.separate_jvp(node.network):
                self.jvp_group(key)
                return self.values[key]
            return self.call_network(
                node.network, self(node.x), self(node.a), self(node.b)
            )
        if isinstance(node, VelocityCall):
            return self.velocity(node)
        if isinstance(node, Param):
            if node.name not in self.params:
                raise ValueError(
                    f"The residual uses the parameter `{node.name}`, but `params` has "
                    f"only {sorted(self.params)}."
                )
            return jnp.asarray(self.params[node.name], self.dtype)
        if isinstance(node, HasLabel):
            cond = self.batch.cond
            if cond is None:
                return jnp.zeros((), self.dtype)
            return (jnp.asarray(cond) >= 0).astype(self.dtype)
        if isinstance(node, Indicator):
            value = self(node.operand)
            return ((value >= node.low) & (value <= node.high)).astype(self.dtype)
        if isinstance(node, TimeFunction):
            fn = (
                jax.nn.sigmoid
                if node.function == "sigmoid"
                else getattr(jnp, node.function)
            )
            return fn(self(node.operand))
        if isinstance(node, Normalize):
            value = self(node.operand)
            return value / (jnp.linalg.norm(value) + node.c)
        if isinstance(node, Clip):
            return jnp.clip(self(node.operand), node.low, node.high)
        raise TypeError(f"Cannot evaluate node of type {type(node).__name__}.")

    def jvp_group(self, primal_key: tuple) -> None:
        """Evaluate every JVP at one point together with their shared primal."""
        if primal_key in self.in_progress:
            raise ValueError(
                "A JVP's tangent depends on its own primal (the network call at the "
                "point it differentiates); a JVP cannot take its tangent from its own "
                "output. Use a different point or a finite difference."
            )
        self.in_progress.add(primal_key)
        group = self.jvps[primal_key]
        first = group[0]
        at = tuple(self(e) for e in first.at)
        # Arguments with a zero tangent in every JVP of the group are closed over
        # rather than differentiated, so no zero tangent is propagated through them.
        moving = [
            i
            for i in range(len(at))
            if not all(_is_zero(node.along[i]) for node in group)
        ] or list(range(len(at)))
        alongs = [
            tuple(
                jnp.zeros_like(at[i])
                if _is_zero(node.along[i])
                else self(node.along[i])
                for i in moving
            )
            for node in group
        ]
        network = first.function
        assert isinstance(network, Network)
        net = self.network(network.role)
        if isinstance(net, Cast):
            net = net.for_jvp()
        cond = None if network.unconditional else self.batch.cond

        def fn(*args):
            point = list(at)
            for i, arg in zip(moving, args, strict=True):
                point[i] = arg
            out = net(*point, cond=cond)
            return _checked(self.describe(network, net), out, point[0])

        primals = tuple(at[i] for i in moving)
        live = [i for i, d in enumerate(group) if d.key in self.differentiated]
        with forward_mode_hint():
            if 0 < len(live) < len(group):
                # Lanes under a stop-gradient are pushed through the linearisation
                # apart from the others: batched with them, the backward pass would
                # run through the stopped lanes too (with zero cotangents) and on
                # into their tangents. The primal is still computed once.
                primal, linear = jax.linearize(fn, *primals)
                stopped = [i for i in range(len(group)) if i not in live]
                tangents: list = [None] * len(group)
                for lanes in (live, stopped):
                    pushed = _push_many(linear, primals, [alongs[i] for i in lanes])
                    for i, tangent in zip(lanes, pushed, strict=True):
                        tangents[i] = tangent
            else:
                primal, tangents = jvp_many(fn, primals, alongs)
        if not self.separate_jvp(network):
            self.values.setdefault(primal_key, primal)
        for node, tangent in zip(group, tangents, strict=True):
            self.values[node.key] = tangent
        self.in_progress.discard(primal_key)

    def velocity(self, node: VelocityCall) -> Array:
        source = node.source
        if isinstance(source, ConditionalVelocity):
            return self.batch.eps - self.batch.x0
        x, t = self(node.x), self(node.t)
        cond = None if node.unconditional else self.batch.cond
        if isinstance(source, Analytic):
            return source.flow.velocity(x, t, cond=cond)
        if isinstance(source, Teacher):
            if self.teacher is None:
                raise ValueError(
                    f"The residual calls the teacher `{node}`, but `teacher=None`; "
                    "pass a per-example velocity `teacher(x, t)`, e.g. "
                    "`flow.velocity` of an analytic flow."
                )
            out = self.teacher(x, t) if cond is None else self.teacher(x, t, cond=cond)
            return _checked(f"The teacher `{_name(self.teacher)}`", out, x)
        raise TypeError(f"Unknown velocity source {type(source).__name__}.")


def evaluate(
    expr: AbstractExpr,
    example: Batch,
    *,
    model: Callable | None = None,
    ema: Callable | None = None,
    teacher: Callable | None = None,
    aux: Callable | None = None,
    params: dict | None = None,
) -> Float[Array, " dim"] | Float[Array, ""]:
    """Evaluate an expression on one example.

    Each distinct network call is computed once; a JVP's primal is reused wherever
    the same call appears (also under a stop-gradient, which then only blocks its
    gradient). Batch with `jax.vmap` over `example`.

    **Arguments:**

    - `expr`: the residual (or any expression).
    - `example`: one example, a [`fmcalc.Batch`][] without batch axes.
    - `model`: the online network, called as `model(x, s, t, cond=...)`.
    - `ema`, `aux`: the networks of [`fmcalc.Network`][] roles `"ema"`, `"aux"`.
    - `teacher`: a per-example velocity `teacher(x, t)` for [`fmcalc.Teacher`][].
    - `params`: values of the [`fmcalc.Param`][] leaves, by name.

    **Returns:** the value of `expr`: a vector shaped like `x`, or a scalar.
    """
    if not isinstance(expr, AbstractExpr):
        raise TypeError(f"Expected an expression; got {type(expr).__name__}.")
    if jnp.ndim(example.x0) != 1:
        raise ValueError(
            "`evaluate` acts on one example (x0 of shape (dim,)); got x0 of shape "
            f"{jnp.shape(example.x0)}. Use `jax.vmap` or `fmcalc.residual_loss`."
        )
    networks = {"online": model, "ema": ema, "aux": aux}
    return _Interpreter(expr, example, networks, teacher, params or {})(expr)


def residual_loss(
    residual: AbstractExpr,
    model: Callable,
    batch: Batch,
    *,
    ema: Callable | None = None,
    teacher: Callable | None = None,
    aux: Callable | None = None,
    check: bool = True,
) -> Float[Array, ""]:
    """Mean squared norm of a residual over a batch: `mean_b ‖R_b‖²`.

    **Arguments:**

    - `residual`: the residual expression `R`.
    - `model`, `ema`, `teacher`, `aux`: as in [`fmcalc.evaluate`][].
    - `batch`: a [`fmcalc.Batch`][] with one leading batch axis.
    - `check`: validate the residual first ([`fmcalc.validate`][]); static, free.

    **Returns:** the scalar loss; differentiate it with `jax.grad` /
    `eqx.filter_grad` with respect to `model`.
    """
    if check:
        validate(residual)
    if jnp.ndim(batch.x0) != 2:
        raise ValueError(
            "`residual_loss` takes a batch with one leading axis (x0 of shape "
            f"(batch, dim)); got x0 of shape {jnp.shape(batch.x0)}."
        )

    def per_example(example: Batch) -> Array:
        r = evaluate(residual, example, model=model, ema=ema, teacher=teacher, aux=aux)
        return jnp.sum(r**2)

    return jnp.mean(jax.vmap(per_example)(batch))
