"""Measured cost of a JAX function: FLOPs and memory of the compiled program.

FLOPs come from XLA's `cost_analysis()` of the program after optimisation (so
common-subexpression elimination and dead-code elimination are accounted for). Two
known ways it can be wrong are refused instead of reported:

- a `while` loop (`lax.scan`, `lax.fori_loop`, `lax.while_loop`) has its body counted
  once, whatever the trip count, so a program with one raises a `ValueError`;
- jax 0.4.30 on CPU rewrote matmuls into oneDNN custom calls that XLA cannot count,
  giving `-1` or far too few FLOPs. When the compiled count is missing or not
  positive, the meter falls back to the lowered (pre-optimisation) program's count,
  which is version-stable but is an upper bound (it counts before XLA merges
  duplicated computations), and warns.
"""

import dataclasses
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
from jaxtyping import PyTree


# An HLO `while` instruction, e.g. `%while.3 = (s32[], f32[8]) while(%tuple), ...`.
# Matching the opcode (not the word) skips `op_name="jit(f)/while/body/..."` metadata.
_HLO_WHILE = re.compile(r"\swhile\(")
_STABLEHLO_WHILE = re.compile(r"\bstablehlo\.while\b")


def _is_argument(leaf: Any) -> bool:
    # `jax.ShapeDtypeStruct` leaves let callers measure without allocating (for
    # example a model built by `eqx.filter_eval_shape`).
    return eqx.is_array(leaf) or isinstance(leaf, jax.ShapeDtypeStruct)


def _lower(fn: Callable, args: Sequence, kwargs: Mapping) -> jax.stages.Lowered:
    # Arrays are traced arguments; everything else (activation functions, static
    # ints, ...) is closed over, as `eqx.filter_jit` does. Non-array outputs are
    # dropped since `jax.jit` cannot return them and they cost nothing.
    dynamic, static = eqx.partition((tuple(args), dict(kwargs)), _is_argument)

    def arrays_only(dynamic):
        call_args, call_kwargs = eqx.combine(dynamic, static)
        return eqx.filter(fn(*call_args, **call_kwargs), eqx.is_array)

    return jax.jit(arrays_only).lower(dynamic)


def _flops_of(analysis: Any) -> float | None:
    # jax < 0.6 returns a list with one dict per computation; newer jax, one dict.
    if analysis is None:
        return None
    if isinstance(analysis, Mapping):
        analysis = [analysis]
    total = 0.0
    for entry in analysis:
        if entry is None or "flops" not in entry:
            return None
        total += float(entry["flops"])
    return total


def _check_no_loops(
    lowered: jax.stages.Lowered, compiled: jax.stages.Compiled, fn: Callable
) -> None:
    compiled_text = compiled.as_text()
    if compiled_text is not None:
        has_loop = _HLO_WHILE.search(compiled_text) is not None
    else:
        # Without the optimised program, a loop before optimisation is assumed to
        # survive it.
        has_loop = _STABLEHLO_WHILE.search(lowered.as_text()) is not None
    if has_loop:
        raise ValueError(
            f"The compiled program of {fn!r} contains a `while` loop (from "
            "`lax.scan`, `lax.fori_loop` or `lax.while_loop`). XLA's cost analysis "
            "counts a loop body once whatever its trip count, so its FLOPs would be "
            "undercounted. Unroll the loop to measure it: a Python `for` loop, or "
            "`lax.scan(..., unroll=True)`."
        )


def _compiled_flops(
    lowered: jax.stages.Lowered, compiled: jax.stages.Compiled, fn: Callable
) -> float:
    _check_no_loops(lowered, compiled, fn)
    count = _flops_of(compiled.cost_analysis())
    if count is not None and count > 0:
        return count
    fallback = _flops_of(lowered.cost_analysis())
    if fallback is None or fallback <= 0:
        raise ValueError(
            f"XLA's cost analysis gave no positive FLOP count for {fn!r} (compiled: "
            f"{count}, lowered: {fallback}). Either the function does no "
            "floating-point work, or this backend cannot count it."
        )
    warnings.warn(
        f"The compiled program's cost analysis gave {count} FLOPs (jax 0.4.30 on CPU "
        "cannot count matmuls rewritten into oneDNN calls); using the lowered, "
        f"pre-optimisation count {fallback:.4g} instead, an upper bound that "
        "ignores XLA's merging of duplicated computations.",
        stacklevel=3,
    )
    return fallback


def flops(fn: Callable, *args: PyTree, **kwargs: PyTree) -> float:
    """FLOPs of one call `fn(*args, **kwargs)`, from XLA's compiled program.

    The function is compiled with `jax.jit` on these arguments (array leaves are
    traced, other leaves such as an equinox module's activation functions are
    static), and the FLOPs are read from `compiled.cost_analysis()`: after XLA's
    optimisations, so an unused tangent or a duplicated forward that XLA merges is not
    counted. See the module notes for the fallback when the compiled count is
    unavailable.

    Pass the arrays the cost depends on (parameters, inputs, times) as arguments,
    not through a closure: closed-over arrays become compile-time constants, and XLA
    may fold work on them away.

    **Arguments:**

    - `fn`: the function to measure. Its outputs may be any pytree; non-array leaves
        are ignored.
    - `*args`, `**kwargs`: its arguments, pytrees of arrays (or `jax.ShapeDtypeStruct`
        placeholders) and static values.

    **Returns:** the FLOP count, a positive float.

    **Raises:** `ValueError` if the program contains a `while` loop, whose body XLA
    counts once (unroll it), or if no positive count is available.

    **Example:**

    ```python
    model = fmcalc.nn.MLP(64, key=jr.key(0))
    forward = lambda model, x, s, t: jax.vmap(model)(x, s, t)
    fmcalc.cost.flops(forward, model, x, s, t)
    ```
    """
    lowered = _lower(fn, args, kwargs)
    return _compiled_flops(lowered, lowered.compile(), fn)


@dataclasses.dataclass(frozen=True)
class Memory:
    """Memory of a compiled program, in bytes, from `compiled.memory_analysis()`.

    **Fields:**

    - `temp_bytes`: scratch buffers (activations kept for the backward pass, ...).
    - `argument_bytes`: the inputs.
    - `output_bytes`: the outputs.
    - `alias_bytes`: outputs that reuse (alias) an input buffer.

    `peak_bytes = argument_bytes + output_bytes + temp_bytes - alias_bytes` is an
    estimate of the peak, not a measurement of the running program.
    """

    temp_bytes: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int

    @property
    def peak_bytes(self) -> int:
        return (
            self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes
        )


def _memory_of(compiled: jax.stages.Compiled) -> Memory:
    stats = compiled.memory_analysis()
    if stats is None:
        raise ValueError("This backend does not provide `memory_analysis()`.")
    return Memory(
        temp_bytes=int(stats.temp_size_in_bytes),
        argument_bytes=int(stats.argument_size_in_bytes),
        output_bytes=int(stats.output_size_in_bytes),
        alias_bytes=int(stats.alias_size_in_bytes),
    )


def memory(fn: Callable, *args: PyTree, **kwargs: PyTree) -> Memory:
    """Memory of one call `fn(*args, **kwargs)`, from XLA's compiled program.

    Compiled as in [`fmcalc.cost.flops`][]; loops are allowed here, since memory
    analysis does not multiply by trip counts.

    **Arguments:**

    - `fn`: the function to measure.
    - `*args`, `**kwargs`: its arguments.

    **Returns:** a [`fmcalc.cost.Memory`][].
    """
    return _memory_of(_lower(fn, args, kwargs).compile())


def forward_pass_equivalents(
    fn: Callable,
    fn_args: Sequence[PyTree],
    *,
    forward: Callable,
    forward_args: Sequence[PyTree],
) -> float:
    """The cost of `fn` in forward-pass equivalents (FPE): `flops(fn) / flops(forward)`.

    **Arguments:**

    - `fn`: the function to measure, typically a training step's `value_and_grad`.
    - `fn_args`: its positional arguments.
    - `forward`: the reference forward pass, typically the vmapped model on the same
        batch.
    - `forward_args`: its positional arguments.

    **Returns:** the ratio, e.g. ≈ 3 for a flow-matching `value_and_grad` (backward ≈
    2 forwards) and ≈ 2 for `jax.jvp` of the forward.
    """
    return flops(fn, *fn_args) / flops(forward, *forward_args)


@dataclasses.dataclass(frozen=True)
class Cost:
    """The measured cost of a function against a reference forward pass.

    **Fields:**

    - `flops`: FLOPs of the function.
    - `forward_flops`: FLOPs of the forward pass.
    - `memory`: the function's [`fmcalc.cost.Memory`][].

    `forward_pass_equivalents = flops / forward_flops`.
    """

    flops: float
    forward_flops: float
    memory: Memory

    @property
    def forward_pass_equivalents(self) -> float:
        return self.flops / self.forward_flops


def measure(
    fn: Callable,
    args: Sequence[PyTree],
    *,
    forward: Callable,
    forward_args: Sequence[PyTree],
) -> Cost:
    """FLOPs, forward-pass equivalents and memory of `fn(*args)`, compiling it once.

    **Arguments:**

    - `fn`: the function to measure.
    - `args`: its positional arguments.
    - `forward`: the reference forward pass.
    - `forward_args`: its positional arguments.

    **Returns:** a [`fmcalc.cost.Cost`][].

    **Raises:** as [`fmcalc.cost.flops`][].
    """
    lowered = _lower(fn, args, {})
    compiled = lowered.compile()
    return Cost(
        flops=_compiled_flops(lowered, compiled, fn),
        forward_flops=flops(forward, *forward_args),
        memory=_memory_of(compiled),
    )
