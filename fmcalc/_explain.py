"""`fmcalc.explain`: a residual, term or method's gradient paths at a glance."""

from typing import NamedTuple

from ._diagnostics import (
    CallRole,
    Finding,
    call_roles,
    findings,
    is_semigradient,
    live_part,
)
from ._expr import AbstractExpr, Call, Derivative
from ._losses import AbstractLoss, SquaredError
from ._method import Method, Term
from ._validate import check_residual


class TermExplanation(NamedTuple):
    """What one term of a loss does to the online network.

    - `name`: the term's name.
    - `residual`: the residual `R`, printed.
    - `loss`: the per-example loss, as a formula of `R`.
    - `rows`: the share of a batch's rows the term gets (`None`: every row).
    - `times`: the time sampler, printed.
    - `calls`: each network and velocity call with its gradient role.
    - `update`: the parameter update the term induces, as a formula.
    - `semigradient`: whether a stop-gradient blocks part of the gradient (the
      update is then a semigradient, not the gradient of the loss).
    - `findings`: the warnings the term deserves, each with its declaration.
    - `refused`: why the term would be refused at construction (only for a bare
      expression that no `Term` would hold), else `None`.
    """

    name: str
    residual: str
    loss: str
    rows: float | None
    times: str | None
    calls: tuple[CallRole, ...]
    update: str
    semigradient: bool
    findings: tuple[Finding, ...]
    refused: str | None

    def __str__(self) -> str:
        share = "every row" if self.rows is None else f"{self.rows:.3g} of the rows"
        times = "" if self.times is None else f", times {self.times}"
        lines = [f"term {self.name!r} ({share}{times})"]
        lines.append(f"  R      = {self.residual}")
        lines.append(f"  loss   = {self.loss}")
        width = max((len(c.call) for c in self.calls), default=0)
        for i, call in enumerate(self.calls):
            label = "  calls    " if i == 0 else "           "
            lines.append(f"{label}{call.call:<{width}}  {call.network:<8}  {call.role}")
        kind = (
            "a semigradient: the sg[...] parts are held fixed"
            if self.semigradient
            else "the gradient of the loss"
        )
        lines.append(f"  update = {self.update}, {kind}")
        if self.refused is not None:
            lines.append(f"  REFUSED: {self.refused}")
        for finding in self.findings:
            name = finding.category.__name__
            if finding.declared:
                lines.append(f"  declared {name}: {finding.declared}")
            else:
                lines.append(f"  WARNING {name}: {finding.message}")
        return "\n".join(lines)


class Explanation(NamedTuple):
    """What [`fmcalc.explain`][] returns: a header and one
    [`fmcalc.TermExplanation`][] per term. `str()` gives the printout."""

    header: str
    terms: tuple[TermExplanation, ...]

    @property
    def warnings(self) -> tuple[Finding, ...]:
        """The undeclared findings of every term: what building it warns about."""
        return tuple(f for t in self.terms for f in t.findings if not f.declared)

    def __str__(self) -> str:
        return "\n\n".join([self.header, *(str(t) for t in self.terms)])


def _update(residual: AbstractExpr, loss: AbstractLoss) -> str:
    live = live_part(residual)
    if live is None:
        return "0 (no gradient reaches the online network)"
    inner = f"∂θ {live}" if isinstance(live, Call | Derivative) else f"∂θ({live})"
    weight = loss.gradient_weight
    if weight is None:
        return f"E[∂ℓ/∂R · {inner}]"
    return f"E[{weight} · R · {inner}]"


def _explain_term(
    term: Term | None,
    residual: AbstractExpr,
    *,
    name: str,
    loss: AbstractLoss,
    rows: float | None,
    biased: str | None,
) -> TermExplanation:
    refused = None
    if term is None:
        try:
            check_residual(residual)
        except ValueError as error:
            refused = str(error)
        found = findings(residual, loss, name=name, biased=biased)
        times = None
    else:
        found = term.findings(biased=biased)
        times = repr(term.times)
    return TermExplanation(
        name=name,
        residual=str(residual),
        loss=loss.formula,
        rows=rows,
        times=times,
        calls=tuple(call_roles(residual)),
        update=_update(residual, loss),
        semigradient=is_semigradient(residual),
        findings=tuple(found),
        refused=refused,
    )


def explain(spec: AbstractExpr | Term | Method | str) -> Explanation:
    """Explain what a loss does to the network it trains.

    For each term: its residual and loss; every network call (online, EMA,
    aux, teacher, analytic) with its gradient role — *parameter gradient* (directly,
    through a JVP, through a finite difference, or only through a frozen network's
    input), *input gradient only* (a network without parameter gradient of its
    own, passing gradient to what feeds it) or *none* (under a stop-gradient);
    the parameter update the term induces, written as a formula; and the warnings
    it deserves ([`fmcalc.GradientPathWarning`][],
    [`fmcalc.FixedPointShiftWarning`][]), with the declarations that accept them.
    Stop-gradient placement is visible at a glance: MeanFlow's update is
    `E[w · R · ∂θ V(x, s, t)]`, a semigradient; LMD's is
    `E[2 · R · ∂θ(D[F](x, s, t)·(0, 0, 1) - v(F(x, s, t), t))]`, the gradient of its
    loss.

    **Arguments:**

    - `spec`: a [`fmcalc.Method`][], a [`fmcalc.Term`][], a residual expression
      (explained with the squared error, and also told whether a term would refuse
      it), or a registry name.

    **Returns:** an [`fmcalc.Explanation`][]; `print` it, or read its fields.

    !!! Example

        ```python
        import fmcalc

        print(fmcalc.explain("meanflow"))
        ```
    """
    if isinstance(spec, str):
        from . import methods

        spec = methods.get(spec)
    if isinstance(spec, Method):
        header = f"{spec.name}: {spec.rule} rule, {spec.learning}, output {spec.output}"
        if spec.biased:
            header += f"\nbiased (declared): {spec.biased}"
        shares = spec.split or (None,) * len(spec.terms)
        terms = tuple(
            _explain_term(
                term,
                term.residual,
                name=term.name,
                loss=term.loss,
                rows=share,
                biased=spec.biased,
            )
            for term, share in zip(spec.terms, shares, strict=True)
        )
        return Explanation(header, terms)
    if isinstance(spec, Term):
        header = f"term {spec.name!r}"
        term = _explain_term(
            spec, spec.residual, name=spec.name, loss=spec.loss, rows=None, biased=None
        )
        return Explanation(header, (term,))
    if isinstance(spec, AbstractExpr):
        term = _explain_term(
            None,
            spec,
            name="residual",
            loss=SquaredError(),
            rows=None,
            biased=None,
        )
        return Explanation("residual, with the squared error ‖R‖²", (term,))
    raise TypeError(
        "`explain` takes a fmcalc.Method, a fmcalc.Term, a residual expression or a "
        f"registry name; got {type(spec).__name__}."
    )
