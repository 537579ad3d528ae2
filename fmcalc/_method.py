"""A training method: residual terms, how their rows are drawn, and how they are
weighted, as one declarative object."""

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, cast, get_args

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from ._batch import Batch
from ._derivative import AbstractDerivative, FiniteDifference
from ._diagnostics import Finding, findings, warn
from ._evaluate import _Interpreter
from ._expr import (
    AbstractExpr,
    Analytic,
    Derivative,
    Network,
    Param,
    Sub,
    Teacher,
    Variable,
    walk,
)
from ._losses import (
    AbstractLoss,
    SquaredError,
    drop_labels,
    weight_source,
    with_reduction,
)
from ._schedules import AbstractSchedule, Compressed
from ._times import AbstractTimeSampler, Equal, FixedSource, FixedTarget, KarrasGrid
from ._validate import check_residual
from .cost._estimate import estimate


Rule = Literal["compositional", "lagrangian", "eulerian", "diagonal"]
Learning = Literal["distillation", "self-distillation", "marginal-from-conditional"]
Output = Literal["F", "V"]
NetworkRole = Literal["online", "ema", "aux", "teacher"]
Sampling = Literal["velocity", "from-noise", "to-data", "two-time"]
RULES: tuple[str, ...] = get_args(Rule)
LEARNING: tuple[str, ...] = get_args(Learning)
OUTPUTS: tuple[str, ...] = get_args(Output)


def _networks(tree) -> frozenset[NetworkRole]:
    """The networks that the expressions (and losses) in `tree` call."""
    kinds = (Teacher, Network)
    leaves = jax.tree.leaves(tree, is_leaf=lambda leaf: isinstance(leaf, kinds))
    roles = (
        "teacher" if isinstance(leaf, Teacher) else leaf.role
        for leaf in leaves
        if isinstance(leaf, kinds)
    )
    return frozenset(cast(NetworkRole, role) for role in roles)


class Term(eqx.Module):
    """One term of a method's loss.

    **Arguments:**

    - `name`: a short name (`"anchor"`, `"consistency"`, ...), used in metrics.
    - `residual`: the residual expression `R = prediction - target`.
    - `times`: the time sampler for this term's rows.
    - `loss`: the per-example loss of the residual (default `‖R‖²`).
    - `weight`: a constant factor.
    - `biased`: why this term is biased by construction, if it is: the exact map
      is not its fixed point (consistency models at a finite step `Δs`), or the
      conditional velocity `eps - x0` enters it where its expectation is not the
      marginal velocity (a finite difference along `eps - x0`), which is otherwise
      refused (see [`fmcalc.validate`][]). The fixed-point check then reports the
      bias instead of failing.
    - `input_gradient`: why the online network may reach this term's loss only
      through the input of a network without parameter gradient (CTM compares in
      data space through the EMA map); otherwise the method raises
      [`fmcalc.GradientPathWarning`][].

    A term is checked when it is built, by the same checks as
    [`fmcalc.validate`][]: some parameter gradient must reach the residual, and the
    conditional velocity must keep the update unbiased unless `biased` says why.
    """

    name: str = eqx.field(static=True)
    residual: AbstractExpr
    times: AbstractTimeSampler
    loss: AbstractLoss = SquaredError()
    weight: float = eqx.field(static=True, default=1.0)
    biased: str | None = eqx.field(static=True, default=None)
    input_gradient: str | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        if not isinstance(self.residual, AbstractExpr):
            raise TypeError(
                f"Term {self.name!r}: `residual` must be an expression; got "
                f"{type(self.residual).__name__}."
            )
        if not isinstance(self.times, AbstractTimeSampler):
            raise TypeError(
                f"Term {self.name!r}: `times` must be a time sampler such as "
                f"`fmcalc.UniformTriangle()`; got {self.times!r}."
            )
        if not isinstance(self.loss, AbstractLoss):
            raise TypeError(
                f"Term {self.name!r}: `loss` must be a per-example loss such as "
                f"`fmcalc.SquaredError()`; got {self.loss!r}."
            )
        if "u" in _leaf_names(self.residual, Variable) and not self.times.uses_u:
            raise ValueError(
                f"Term {self.name!r} uses the intermediate time `u`, but its sampler "
                f"{type(self.times).__name__} draws none; wrap it as "
                "`fmcalc.WithIntermediate(...)` or use a sampler with `uses_u`."
            )
        for field in ("biased", "input_gradient"):
            value = getattr(self, field)
            if value is not None and not (isinstance(value, str) and value.strip()):
                raise TypeError(
                    f"Term {self.name!r}: `{field}` must be a sentence saying why, or "
                    f"None; got {value!r}."
                )
        try:
            check_residual(self.residual, biased=self.biased)
        except ValueError as error:
            raise ValueError(f"Term {self.name!r}: {error}") from None

    def findings(self, *, biased: str | None = None) -> list[Finding]:
        """The warnings this term deserves ([`fmcalc.GradientPathWarning`][],
        [`fmcalc.FixedPointShiftWarning`][]), each with the declaration that accepts
        it: the term's own, or the method's `biased`."""
        return findings(
            self.residual,
            self.loss,
            name=self.name,
            biased=self.biased or biased,
            input_gradient=self.input_gradient,
        )

    def __str__(self) -> str:
        return f"{self.name}: R = {self.residual}; loss {self.loss}"

    @property
    def networks(self) -> frozenset[NetworkRole]:
        """The networks this term's residual and loss call: `"online"`, `"ema"`,
        `"aux"` (passed as `aux=`) and `"teacher"` (passed as `teacher=`)."""
        return _networks((self.residual, self.loss))


def _leaf_names(expr: AbstractExpr, kind: type) -> set[str]:
    names = set()

    def visit(node):
        if isinstance(node, kind):
            names.add(node.name)

    walk(expr, visit)
    return names


def _replace_leaves(tree, kind: type, new):
    return jax.tree.map(
        lambda leaf: new if isinstance(leaf, kind) else leaf,
        tree,
        is_leaf=lambda leaf: isinstance(leaf, kind),
    )


def _row_counts(n: int, split: tuple[float, ...]) -> list[int]:
    counts = [int(round(f * n)) for f in split[:-1]]
    counts.append(n - sum(counts))
    if min(counts) < 0:
        raise ValueError(f"Cannot split {n} rows as {split}.")
    return counts


def _names(value) -> tuple[str, ...] | None:
    """Term names as a tuple (a static field must be hashable); one name alone is
    one name, not its letters."""
    if value is None or isinstance(value, str):
        return None if value is None else (value,)
    return tuple(value)


class Method(eqx.Module):
    """A flow-map training method as data: its terms, batch split and schedules.

    **Arguments:**

    - `name`: the registry name.
    - `rule`: `"compositional"`, `"lagrangian"`, `"eulerian"` or `"diagonal"`.
    - `learning`: `"distillation"`, `"self-distillation"` or
      `"marginal-from-conditional"`.
    - `output`: `"F"` or `"V"`, the parameterisation of the paper's network.
    - `terms`: the [`fmcalc.Term`][]s.
    - `split`: the fraction of the batch's rows given to each term (the cheapest
      cost lever: public code gives the expensive term 1/8 to 1/4 of the rows), or
      `None` to evaluate every term on every data row.
    - `schedules`: values of the [`fmcalc.Param`][] leaves as functions of the
      training step (curricula).
    - `label_dropout`: the probability that `batch` drops an example's label.
    - `label_dropout_rows`: which rows it drops: `"independent"` (default) or
      `"leading"`, a block of leading rows (see [`fmcalc.drop_labels`][]).
    - `biased`: why the method's fixed point is knowingly shifted, if it is: a loss
      weighted by its residual on a term that uses the conditional velocity
      (MeanFlow's adaptive weight). It accepts every term's
      [`fmcalc.FixedPointShiftWarning`][]; a term whose residual is biased by
      construction says so itself (`Term(..., biased=...)`).
    - `label_dropout_terms`: the names of the terms whose rows label dropout may
      reach (shortcut models' code drops labels on its flow-matching rows only);
      default `None`, every row.
    - `sigma_min`: the noise left at the data end of the path, in `[0, 1)`: `batch`
      draws `x0 + sigma_min · eps` in place of `x0`, so that
      `x_s = (1 - s) x0 + (sigma_min + (1 - sigma_min) s) eps` and the conditional
      velocity is `(1 - sigma_min) eps - x0`, the path of Lipman et al. (2023) with
      `σ_min` (shortcut models' code uses `1e-5`). Default 0: the linear path.
    - `noise_scale`: the standard deviation `σ` of the noise at `s = 1`: `batch`
      draws `eps ~ N(0, σ² I)`, so that `x_s = (1 - s) x0 + s eps` and the
      conditional velocity `eps - x0` are those of noise `σ N(0, I)` (the
      self-distillation code of Boffi et al. uses the data's scale, 0.5 for images).
      A run samples from `σ N(0, I)`; a teacher must be trained at the same scale.
      Default 1.

    Building a method raises, once, each [`fmcalc.FmcalcWarning`][] its terms
    deserve and do not declare; [`fmcalc.explain`][] shows them all.

    `method.batch(key, x0)` draws the noise, times and label dropout;
    `method.loss(model, batch)` is deterministic given its inputs.
    """

    name: str = eqx.field(static=True)
    rule: Rule = eqx.field(static=True)
    learning: Learning = eqx.field(static=True)
    output: Output = eqx.field(static=True)
    terms: tuple[Term, ...]
    split: tuple[float, ...] | None = eqx.field(static=True, default=None)
    schedules: Mapping[str, AbstractSchedule] = eqx.field(default_factory=dict)
    label_dropout: float = eqx.field(static=True, default=0.0)
    label_dropout_rows: Literal["independent", "leading"] = eqx.field(
        static=True, default="independent"
    )
    biased: str | None = eqx.field(static=True, default=None)
    label_dropout_terms: tuple[str, ...] | None = eqx.field(
        static=True, default=None, converter=_names
    )
    sigma_min: float = eqx.field(static=True, default=0.0)
    noise_scale: float = eqx.field(static=True, default=1.0)

    def __check_init__(self):
        for field, value, allowed in (
            ("rule", self.rule, RULES),
            ("learning", self.learning, LEARNING),
            ("output", self.output, OUTPUTS),
        ):
            if value not in allowed:
                raise ValueError(
                    f"Unknown {field} {value!r}; expected one of {allowed}."
                )
        if not self.terms:
            raise ValueError("A method needs at least one term.")
        if self.split is not None:
            if len(self.split) != len(self.terms):
                raise ValueError(
                    f"`split` has {len(self.split)} fractions for {len(self.terms)} "
                    "terms; give one fraction per term."
                )
            if min(self.split) <= 0 or abs(sum(self.split) - 1) > 1e-9:
                raise ValueError(
                    "`split` fractions must be positive and sum to 1; got "
                    f"{self.split}."
                )
        if not 0 <= self.label_dropout < 1:
            raise ValueError(
                f"`label_dropout` must lie in [0, 1); got {self.label_dropout}."
            )
        if self.label_dropout_rows not in ("independent", "leading"):
            raise ValueError(
                "`label_dropout_rows` must be 'independent' or 'leading'; got "
                f"{self.label_dropout_rows!r}."
            )
        names = [term.name for term in self.terms]
        unknown = sorted(set(self.label_dropout_terms or ()) - set(names))
        if unknown:
            raise ValueError(
                f"`label_dropout_terms` names {unknown}, which are not terms of "
                f"method {self.name!r}; its terms are {names}."
            )
        if not 0 <= self.sigma_min < 1:
            raise ValueError(f"`sigma_min` must lie in [0, 1); got {self.sigma_min}.")
        if not (np.isfinite(self.noise_scale) and self.noise_scale > 0):
            raise ValueError(
                f"`noise_scale` must be a positive finite float (the noise's standard "
                f"deviation at s = 1); got {self.noise_scale!r}."
            )
        if self.learning == "distillation" and not self._reads_a_teacher():
            raise ValueError(
                f"Method {self.name!r} says learning='distillation', but no term "
                "reads a teacher (`fmcalc.Teacher()`, an analytic velocity "
                "`fmcalc.Analytic(flow)`) or a pre-trained map (`Network('aux')`); "
                f"it calls only {sorted(self.networks)}. Use 'self-distillation' or "
                "'marginal-from-conditional', or put the teacher in a residual."
            )
        params = set().union(*(_leaf_names(t.residual, Param) for t in self.terms))
        missing = sorted(params - set(self.schedules))
        if missing:
            raise ValueError(
                f"Method {self.name!r} uses the parameter(s) {missing} but has no "
                f"schedule for them (schedules: {sorted(self.schedules)}); pass "
                "`schedules={name: fmcalc.schedules.Constant(value), ...}`."
            )
        if self.biased is not None and not (
            isinstance(self.biased, str) and self.biased.strip()
        ):
            raise TypeError(
                f"Method {self.name!r}: `biased` must be a sentence saying why, or "
                f"None; got {self.biased!r}."
            )
        warn(self.findings())

    def _reads_a_teacher(self) -> bool:
        if self.networks & {"teacher", "aux"}:
            return True
        residuals = [term.residual for term in self.terms]
        found = jax.tree.leaves(residuals, is_leaf=lambda n: isinstance(n, Analytic))
        return any(isinstance(leaf, Analytic) for leaf in found)

    def findings(self) -> list[Finding]:
        """Every warning the method's terms deserve, declared or not."""
        return [f for term in self.terms for f in term.findings(biased=self.biased)]

    def __str__(self) -> str:
        lines = [f"{self.name} ({self.rule}, {self.learning}, output {self.output})"]
        for i, term in enumerate(self.terms):
            share = "" if self.split is None else f" [{self.split[i]:.3g} of rows]"
            lines.append(f"  {term}{share}")
        return "\n".join(lines)

    # ----------------------------------------------------------------- rows and batch

    def row_counts(self, n_rows: int) -> list[int]:
        """How many rows of a batch of `n_rows` belong to each term."""
        if self.split is None:
            k = len(self.terms)
            if n_rows % k:
                raise ValueError(
                    f"A method without a split evaluates each of its {k} terms on "
                    f"every data row, so its batches have a multiple of {k} rows; got "
                    f"{n_rows}. Build batches with `method.batch`."
                )
            return [n_rows // k] * k
        return _row_counts(n_rows, self.split)

    def batch(
        self, key: PRNGKeyArray, x0: Float[Array, "n dim"], *, cond: Any = None
    ) -> Batch:
        """Draw noise, times (each term's own sampler on its rows) and label dropout.

        **Arguments:**

        - `key`: PRNG key.
        - `x0`: data, shape `(n, dim)`.
        - `cond`: optional labels, shape `(n,)`; `fmcalc.NULL_LABEL` means no label.

        **Returns:** a [`fmcalc.Batch`][]. Without a split its rows are `x0` repeated
        once per term.
        """
        if jnp.ndim(x0) != 2:
            raise ValueError(f"`x0` must have shape (n, dim); got {jnp.shape(x0)}.")
        if self.split is None:
            reps = len(self.terms)
            x0 = jnp.concatenate([x0] * reps)
            if cond is not None:
                cond = jnp.concatenate([jnp.asarray(cond)] * reps)
        n = x0.shape[0]
        counts = self.row_counts(n)
        if 0 in counts:
            raise ValueError(
                f"With {n} rows, the split {self.split} of method {self.name!r} gives "
                f"the term {self.terms[counts.index(0)].name!r} no rows; draw more."
            )
        k_noise, k_labels, *k_terms = jax.random.split(key, 2 + len(self.terms))
        dtype = x0.dtype
        eps = jax.random.normal(k_noise, x0.shape, dtype)
        if self.noise_scale != 1:
            eps = self.noise_scale * eps
        if self.sigma_min:
            x0 = x0 + self.sigma_min * eps
        draws = [
            term.times(k, count, dtype=dtype)
            for term, k, count in zip(self.terms, k_terms, counts, strict=True)
        ]
        s = jnp.concatenate([d.s for d in draws])
        t = jnp.concatenate([d.t for d in draws])
        uses_u = any(d.u is not None for d in draws)
        u = (
            jnp.concatenate([d.s if d.u is None else d.u for d in draws])
            if uses_u
            else None
        )
        if cond is not None and self.label_dropout > 0:
            cond = jnp.asarray(cond)
            dropped = drop_labels(
                k_labels, cond, self.label_dropout, rows=self.label_dropout_rows
            )
            if self.label_dropout_terms is not None:
                reached = np.repeat(
                    [term.name in self.label_dropout_terms for term in self.terms],
                    counts,
                )
                dropped = jnp.where(reached, dropped, cond)
            cond = dropped
        return Batch(x0, eps, s, t, u, cond)

    # ----------------------------------------------------------------------- loss

    @property
    def settled_step(self) -> int | None:
        """The first training step at which every schedule has reached its final
        value (0 without schedules), or `None` if one never settles."""
        steps = [schedule.settled for schedule in self.schedules.values()]
        if None in steps:
            return None
        return max(steps, default=0)  # pyright: ignore[reportArgumentType,reportCallIssue]

    def for_run(self, steps: int, settle: float = 0.5) -> "Method":
        """This method with its curricula sized for a run of `steps` steps.

        The papers' curricula are counted in absolute steps for their runs of
        100k-400k steps (ECT's ratio decays over 100k, sCT's warm-up takes 10k): in
        a shorter run they would not reach their final values. Every schedule that
        settles after `⌊settle · steps⌋` is run faster
        ([`fmcalc.schedules.Compressed`][]) so that it settles there; schedules that
        settle earlier, or never, are unchanged, and so are the terms.

        **Arguments:**

        - `steps`: the length of the run, `≥ 2`.
        - `settle`: the fraction of the run by which every curriculum settles, in
          `(0, 1]` (default 0.5).

        **Returns:** a method with `settled_step <= settle * steps` (unless one of
        its schedules never settles).
        """
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
            raise ValueError(
                f"`for_run(steps=...)` must be an integer >= 2; got {steps!r}."
            )
        if isinstance(settle, bool) or not (
            isinstance(settle, int | float) and 0 < settle <= 1
        ):
            raise ValueError(
                f"`for_run(settle=...)` must lie in (0, 1]; got {settle!r}."
            )
        by = max(1, math.floor(settle * steps))
        schedules = {}
        for name, schedule in self.schedules.items():
            settled = schedule.settled
            if settled is not None and settled > by:
                schedule = Compressed(schedule, settled / by)
            schedules[name] = schedule
        return dataclasses.replace(self, schedules=schedules)

    @property
    def networks(self) -> frozenset[NetworkRole]:
        """The networks the method's terms call: `"online"`, `"ema"`, `"aux"`
        (passed as `aux=`) and `"teacher"` (passed as `teacher=`)."""
        return frozenset().union(*(term.networks for term in self.terms))

    @property
    def sampling(self) -> Sampling:
        """How the trained network is sampled, from the times its terms train on:

        - `"velocity"`: a diagonal method (flow matching): ODE steps of its
          velocity `V(x, t, t)`;
        - `"from-noise"`: trained from `s = 1` only: one jump per sample;
        - `"to-data"`: trained to `t = 0` only: consistency sampling, re-noising
          between jumps;
        - `"two-time"`: any jumps `s → t`.
        """
        if self.rule == "diagonal":
            return "velocity"
        samplers = [t.times for t in self.terms if not isinstance(t.times, Equal)]
        if any(isinstance(s, FixedSource) and s.source == 1 for s in samplers):
            return "from-noise"
        to_data = [
            isinstance(s, KarrasGrid) or (isinstance(s, FixedTarget) and s.target == 0)
            for s in samplers
        ]
        if samplers and all(to_data):
            return "to-data"
        return "two-time"

    def check_dtype(self, dtype) -> None:
        """Check that the method's finite differences resolve their steps when the
        networks compute in `dtype`: raise if a step is at or below its resolution,
        warn ([`fmcalc.FiniteDifferenceStepWarning`][]) if round-off would outweigh
        the truncation error. Methods without finite differences pass any dtype."""
        for term in self.terms:

            def visit(node):
                strategy = getattr(node, "strategy", None)
                if isinstance(node, Derivative) and isinstance(
                    strategy, FiniteDifference
                ):
                    strategy.check_dtype(dtype)

            walk(term.residual, visit)

    def params(self, step) -> dict[str, Array]:
        """The values of the method's schedules at `step`."""
        return {name: schedule(step) for name, schedule in self.schedules.items()}

    def loss(
        self,
        model: Callable,
        batch: Batch,
        *,
        teacher: Callable | None = None,
        ema: Callable | None = None,
        aux: Callable | None = None,
        step: int | Array = 0,
    ) -> tuple[Float[Array, ""], dict[str, Array]]:
        """The loss on a batch and per-term metrics.

        Each term's per-example losses are summed over its rows; the total is divided
        by the number of data rows, so a term on a fraction `f` of the rows weighs
        `f` and, without a split, every term weighs 1.

        **Arguments:**

        - `model`: the online network.
        - `batch`: from [`fmcalc.Method.batch`][] (any batch with the same row
          layout works).
        - `teacher`, `ema`, `aux`: the other networks the residuals call.
        - `step`: the training step, for the method's schedules. Under `jax.jit`
          pass it as an array (`jnp.asarray(step)`): a Python int is static and
          recompiles the step function at every step.

        **Returns:** `(loss, metrics)`, where metrics hold each term's mean loss
        (`"<term>/loss"`) and mean squared residual (`"<term>/residual"`).
        """
        networks = {"online": model, "ema": ema, "aux": aux}
        pairs = self.term_rows(batch)
        total, sums = self.summed_loss(
            pairs,
            networks,
            teacher=teacher,
            params=self.params(step),
            n_data=self.data_rows(batch.x0.shape[0]),
        )
        counts = {term.name: rows.x0.shape[0] for term, rows in pairs}
        metrics = {
            name: value / counts[name.rpartition("/")[0]]
            for name, value in sums.items()
        }
        return total, metrics

    def summed_loss(
        self,
        pairs: Sequence[tuple[Term, Batch]],
        networks: Mapping[str, Any],
        *,
        teacher: Callable | None,
        params: Mapping[str, Array],
        n_data: int,
    ) -> tuple[Float[Array, ""], dict[str, Array]]:
        """The loss of some rows of a batch of `n_data` data rows, and each term's
        sums over them: what [`fmcalc.Method.loss`][] computes, as sums, so that
        the parts of a batch (micro-batches) add up to the whole.

        **Arguments:**

        - `pairs`: each term with its rows, as [`fmcalc.Method.term_rows`][] gives.
        - `networks`: the `"online"`, `"ema"` and `"aux"` networks.
        - `teacher`: the teacher velocity, or `None`.
        - `params`: the schedules' values, [`fmcalc.Method.params`][].
        - `n_data`: the number of data rows of the whole batch.

        **Returns:** `(loss, sums)`: the weighted loss, and each term's summed
        loss (`"<term>/loss"`) and squared residual (`"<term>/residual"`).
        """
        dtype = pairs[0][1].x0.dtype if pairs else jnp.result_type(float)
        total = jnp.zeros((), dtype)
        sums = {}
        for term, rows in pairs:
            losses, squared = jax.vmap(
                lambda ex, term=term: term_loss(term, ex, networks, teacher, params)
            )(rows)
            total = total + term.weight * jnp.sum(losses) / n_data
            sums[f"{term.name}/loss"] = jnp.sum(losses)
            sums[f"{term.name}/residual"] = jnp.sum(squared)
        return total, sums

    def data_rows(self, n_rows: int) -> int:
        """The number of data rows in a batch of `n_rows` rows."""
        counts = self.row_counts(n_rows)
        return n_rows if self.split is not None else counts[0]

    def term_rows(self, batch: Batch) -> list[tuple[Term, Batch]]:
        """Each term with the rows of `batch` that pay for it (terms given no rows
        are left out)."""
        pairs = []
        start = 0
        for term, count in zip(
            self.terms, self.row_counts(batch.x0.shape[0]), strict=True
        ):
            if count:
                rows = jax.tree.map(lambda a, lo=start, n=count: a[lo : lo + n], batch)
                pairs.append((term, rows))
            start += count
        return pairs

    # ------------------------------------------------------------------ cost, axes

    def cost(self) -> float:
        """Static forward-pass equivalents per data row, with the batch split."""
        shares = self.split if self.split is not None else (1.0,) * len(self.terms)
        return sum(
            share * estimate(term.residual).total
            for share, term in zip(shares, self.terms, strict=True)
        )

    def replace(self, **changes) -> "Method":
        """A copy with one or more axes moved.

        - `derivative=`: replaces the derivative strategy in every residual;
        - `loss=`: replaces every term's per-example loss;
        - `times=`: replaces every term's time sampler;
        - `reduction=`: `"sum"` or `"mean"`, the reduction over dimensions of every
          term's loss ([`fmcalc.SquaredError`][]'s `reduction`, also inside
          [`fmcalc.Sum`][] and [`fmcalc.TimeWeighted`][]);
        - any field of the method (`terms=`, `split=`, `label_dropout=`, `name=`,
          ...); `derivative=`, `loss=` and `times=` then apply to the new terms.
        """
        terms = changes.pop("terms", self.terms)
        derivative = changes.pop("derivative", None)
        if derivative is not None:
            if not isinstance(derivative, AbstractDerivative):
                raise TypeError(
                    f"`derivative` must be a derivative strategy; got {derivative!r}."
                )
            terms = tuple(
                dataclasses.replace(
                    term,
                    residual=_replace_leaves(
                        term.residual, AbstractDerivative, derivative
                    ),
                )
                for term in terms
            )
        for field in ("loss", "times"):
            value = changes.pop(field, None)
            if value is not None:
                terms = tuple(
                    dataclasses.replace(term, **{field: value}) for term in terms
                )
        reduction = changes.pop("reduction", None)
        if reduction is not None:
            terms = tuple(
                dataclasses.replace(term, loss=with_reduction(term.loss, reduction))
                for term in terms
            )
        return dataclasses.replace(self, terms=terms, **changes)


def evaluate_term(term: Term, example: Batch, networks, teacher, params):
    """One example's residual and prediction (the left side of `R = P - target`, or
    `R` itself when the residual is not a difference)."""
    interpreter = _Interpreter(term.residual, example, networks, teacher, params)
    residual = interpreter(term.residual)
    top = term.residual
    prediction = interpreter(top.left) if isinstance(top, Sub) else residual
    return residual, prediction


def term_loss(term: Term, example: Batch, networks, teacher, params):
    """One example's loss under `term` and its squared residual."""
    residual, prediction = evaluate_term(term, example, networks, teacher, params)
    aux = weight_source(term.loss, networks)
    loss = term.loss(residual, prediction=prediction, s=example.s, t=example.t, aux=aux)
    return loss, jnp.sum(residual**2)
