"""The reference entry of a registry method, as text (`fmcalc methods NAME`) or
Markdown (the documentation's method pages)."""

import inspect
import re
import textwrap
from typing import Literal

from .._method import Method
from ._registry import (
    _BUILDERS,
    _CROSS_REFERENCE,
    MethodInfo,
    _type_name,
    get,
    info,
    options,
)


def _notes(name: str) -> str:
    return inspect.cleandoc(_BUILDERS[name].__doc__ or "")


def _one_line(value) -> str:
    """`repr(value)` on one line (equinox prints modules over several)."""
    text = re.sub(r"\(\n\s*", "(", repr(value))
    text = re.sub(r",?\n\s*\)", ")", text)
    return re.sub(r",\n\s*", ", ", text)


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
    for preset, values in facts.presets.items():
        lines += ["", f'preset {preset!r} (fmcalc.methods.get("{name}", preset=...))']
        lines += [f"  {k} = {_one_line(v)}" for k, v in values.items()]
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
    lines += ["", "differences from the authors' code", wrap(_compared(facts))]
    return "\n".join(lines)


def _compared(facts: MethodInfo) -> str:
    if facts.compared_with is None and facts.read_code is not None:
        return (
            f"Read, not run: {facts.read_code}. The deviations above list what "
            "differs from it, each with the setting that removes it where fmcalc "
            "has one; no test recomputes its loss."
        )
    if facts.compared_with is None:
        return (
            "Not compared with the authors' code: the deviations above come from "
            "reading the paper and public code."
        )
    found = f"Compared with {facts.compared_with}."
    if facts.presets.get("reference"):
        found += (
            " preset='reference' sets each difference listed above that has a "
            "setting; those that have none (no option) remain."
        )
    return found


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
    for preset, values in facts.presets.items():
        out += ["", f'**Preset `{preset}`** (`get("{facts.name}", preset="{preset}")`)']
        out += [""] + [f"- `{k} = {_one_line(v)}`" for k, v in values.items()]
    out += ["", "**Cost** (static count, `method.cost()`)", ""]
    out += [f"- {line}" for line in _cost_lines(method, facts.dieleman_cost)]
    out += ["", "**Deviations from the paper and public code**", ""]
    out += [f"- {d}" for d in facts.deviations] or ["None known."]
    out += ["", "**Differences from the authors' code**", "", _compared(facts)]
    return "\n".join(out) + "\n"
