import inspect
import re
import textwrap
from collections.abc import Callable
from typing import Literal, NamedTuple

from .._method import Method


class MethodInfo(NamedTuple):
    """What a registry method is, as data: the facts printed by
    `fmcalc methods NAME` and [`fmcalc.methods.doc`][], and shown on the method
    pages of the documentation.

    **Attributes:**

    - `name`: the registry name (`"lsd"`).
    - `full_name`: the method's name in full (`"Lagrangian self-distillation"`).
    - `citation`: the paper: authors, title, venue and year.
    - `summary`: what the method does, in one sentence.
    - `deviations`: where the spec knowingly differs from the paper or its public
      code, and why; empty when it follows them.
    - `dieleman_cost`: the training cost in forward-pass equivalents that
      Dieleman's "Learning the integral of a diffusion model" (2026) lists for it
      (every term on every row), or `None` when the method is not in that table.
    """

    name: str
    full_name: str
    citation: str
    summary: str
    deviations: tuple[str, ...] = ()
    dieleman_cost: int | None = None


# `[`fmcalc.X`][]`, a cross-reference of the documentation, is `fmcalc.X` in a terminal.
_CROSS_REFERENCE = re.compile(r"\[(`[^`]+`)\]\[[^\]]*\]")

_BUILDERS: dict[str, Callable[..., Method]] = {}
_INFO: dict[str, MethodInfo] = {}


def register(
    name: str,
    *,
    full_name: str,
    citation: str,
    summary: str,
    deviations: tuple[str, ...] = (),
    dieleman_cost: int | None = None,
):
    """Register a method builder under `name` (a decorator), with the facts
    [`fmcalc.methods.info`][] returns.

    **Arguments:**

    - `name`: the registry name.
    - `full_name`, `citation`, `summary`, `deviations`, `dieleman_cost`: see
      [`fmcalc.methods.MethodInfo`][].

    The builder takes keyword-only options with defaults and returns an
    [`fmcalc.Method`][]; its docstring gives the loss in fmcalc's convention and
    how the paper's symbols translate.

    !!! Example

        ```python
        import fmcalc
        from fmcalc import FlowMap, Network, S, T, X, sg


        @fmcalc.methods.register(
            "my-shortcut",
            full_name="My shortcut model",
            citation="Me, 'A note on shortcuts', 2026",
            summary="One jump equals two half jumps of the online map.",
        )
        def my_shortcut() -> fmcalc.Method:
            \"\"\"`R = F(x, s, t) - sg[F(F(x, s, u), u, t)]`, `u = (s + t)/2`.\"\"\"
            residual = fmcalc.compositional(form="F")
            term = fmcalc.Term("compositional", residual, fmcalc.UniformTriangle())
            return fmcalc.Method(
                "my-shortcut", "compositional", "self-distillation", "V", (term,)
            )


        print(fmcalc.methods.doc("my-shortcut"))
        ```
    """
    for field, value in (
        ("full_name", full_name),
        ("citation", citation),
        ("summary", summary),
    ):
        if not (isinstance(value, str) and value.strip()):
            raise TypeError(
                f"register({name!r}): `{field}` must be a non-empty string; got "
                f"{value!r}."
            )

    def decorate(builder: Callable[..., Method]) -> Callable[..., Method]:
        if name in _BUILDERS:
            raise ValueError(f"A method named {name!r} is already registered.")
        _BUILDERS[name] = builder
        _INFO[name] = MethodInfo(
            name, full_name, citation, summary, tuple(deviations), dieleman_cost
        )
        return builder

    return decorate


def names() -> list[str]:
    """The names of all registered methods, in registration order."""
    return list(_BUILDERS)


def _known(name: str) -> None:
    if name not in _BUILDERS:
        raise ValueError(f"Unknown method {name!r}; the registered ones are {names()}.")


def get(name: str, **overrides) -> Method:
    """The method `name`, with its defaults changed by `overrides`.

    **Arguments:**

    - `name`: a registry name (see [`fmcalc.methods.names`][]).
    - `overrides`: keyword options of that method's builder
      ([`fmcalc.methods.doc`][] lists them with their defaults), e.g.
      `derivative=fmcalc.FiniteDifference(1e-3)` or `split=(0.5, 0.5)`.

    **Returns:** the [`fmcalc.Method`][].
    """
    _known(name)
    builder = _BUILDERS[name]
    options = inspect.signature(builder).parameters
    unknown = sorted(set(overrides) - set(options))
    if unknown:
        raise TypeError(
            f"Method {name!r} has no option(s) {unknown}; its options are "
            f"{sorted(options)}."
        )
    return builder(**overrides)


def info(name: str) -> MethodInfo:
    """The full name, citation, summary and known deviations of the method `name`.

    **Arguments:**

    - `name`: a registry name (see [`fmcalc.methods.names`][]).

    **Returns:** a [`fmcalc.methods.MethodInfo`][].
    """
    _known(name)
    return _INFO[name]


def options(name: str) -> dict[str, inspect.Parameter]:
    """The keyword options of the method `name`'s builder, with their defaults
    (`parameter.default`) and types (`parameter.annotation`)."""
    _known(name)
    return dict(inspect.signature(_BUILDERS[name]).parameters)


def _notes(name: str) -> str:
    return inspect.cleandoc(_BUILDERS[name].__doc__ or "")


def _type_name(annotation) -> str:
    if annotation is inspect.Parameter.empty:
        return ""
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("fmcalc._", "").replace("typing.", "")


def _cost_lines(method: Method, cost: int | None) -> list[str]:
    if method.split is None:
        lines = [f"{method.cost():.2f} forward-pass equivalents per data row"]
    else:
        shares = ", ".join(
            f"{term.name} {share:.3g}"
            for term, share in zip(method.terms, method.split, strict=True)
        )
        full = method.replace(split=None).cost()
        lines = [
            f"{method.cost():.2f} forward-pass equivalents per data row with the "
            f"default split ({shares})",
            f"{full:.2f} with every term on every row",
        ]
    if cost is not None:
        lines.append(f"Dieleman's table: {cost:g} (every term on every row)")
    return lines


def _term_lines(method: Method) -> list[tuple[str, str, str]]:
    rows = []
    for i, term in enumerate(method.terms):
        share = (
            "every row" if method.split is None else f"{method.split[i]:.3g} of rows"
        )
        rows.append(
            (
                f"{term.name} ({share}, times {term.times!r})",
                f"R = {term.residual}",
                f"loss {term.loss}",
            )
        )
    return rows


def doc(name: str, format: Literal["text", "markdown"] = "text") -> str:
    """The reference entry of the method `name`: full name, citation, summary,
    rule / learning / output, formula of every term, notes (the paper's symbols in
    fmcalc's convention), options with defaults, static cost and known deviations.
    `fmcalc methods NAME` prints the text form; the documentation's method pages
    are built from the Markdown form.

    **Arguments:**

    - `name`: a registry name (see [`fmcalc.methods.names`][]).
    - `format`: `"text"` (for a terminal) or `"markdown"`.

    **Returns:** the entry as a string.

    !!! Example

        ```python
        import fmcalc

        print(fmcalc.methods.doc("meanflow"))
        ```
    """
    if format not in ("text", "markdown"):
        raise ValueError(f"`format` must be 'text' or 'markdown'; got {format!r}.")
    facts = info(name)
    method = get(name)
    opts = options(name)
    if format == "markdown":
        return _markdown(facts, method, opts, _notes(name))
    wrap = lambda text, indent="  ": textwrap.fill(
        text, 88, initial_indent=indent, subsequent_indent=indent
    )
    lines = [f"{name}: {facts.full_name}", "", wrap(facts.citation, ""), ""]
    lines += [wrap(facts.summary, ""), ""]
    lines += [
        f"rule {method.rule}, learning {method.learning}, output {method.output}",
        "",
        "formula",
    ]
    for head, residual, loss in _term_lines(method):
        lines += [f"  {head}", f"    {residual}", f"    {loss}"]
    notes = _CROSS_REFERENCE.sub(r"\1", _notes(name))
    if notes:
        lines += ["", "notes"]
        lines += [textwrap.indent(p, "  ") for p in notes.splitlines()]
    lines += ["", f'options (fmcalc.methods.get("{name}", option=value, ...))']
    width = max((len(k) for k in opts), default=0)
    lines += [f"  {k.ljust(width)} = {p.default!r}" for k, p in opts.items()]
    lines += ["", "cost"]
    lines += [f"  {line}" for line in _cost_lines(method, facts.dieleman_cost)]
    lines += ["", "deviations from the paper and public code"]
    if facts.deviations:
        for d in facts.deviations:
            lines.append(
                textwrap.fill(d, 88, initial_indent="  - ", subsequent_indent="    ")
            )
    else:
        lines.append("  none known")
    return "\n".join(lines)


def _markdown(facts: MethodInfo, method: Method, opts, notes: str) -> str:
    out = [f"### `{facts.name}`: {facts.full_name}", "", facts.summary, ""]
    out += [f"*{facts.citation}*", ""]
    out += [
        f"**Rule** {method.rule} · **learning** {method.learning} · "
        f"**output** `{method.output}`",
        "",
        "**Formula**",
        "",
    ]
    for head, residual, loss in _term_lines(method):
        out += [f"- {head}:", "", f"    `{residual}`, {loss}", ""]
    if notes:
        out += ["**Notes**", "", notes, ""]
    out += [
        f'**Options** (`fmcalc.methods.get("{facts.name}", option=value)`)',
        "",
        "| option | type | default |",
        "|---|---|---|",
    ]
    for key, p in opts.items():
        type_name = _type_name(p.annotation).replace("|", "\\|")
        out.append(f"| `{key}` | `{type_name}` | `{p.default!r}` |")
    out += ["", "**Cost** (static count, `method.cost()`)", ""]
    out += [f"- {line}" for line in _cost_lines(method, facts.dieleman_cost)]
    out += ["", "**Deviations from the paper and public code**", ""]
    out += [f"- {d}" for d in facts.deviations] or ["None known."]
    return "\n".join(out) + "\n"
