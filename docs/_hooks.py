"""Build-time generation of pages from the registry and from benchmark results.

- `<!-- methods: table -->` becomes the table of every registry method: name, full
  name, rule, learning setting, output, static cost and Dieleman's figure.
- `<!-- methods: RULE -->` becomes the reference entry of every method of that rule,
  from `fmcalc.methods.doc(name, format="markdown")` (the text `fmcalc methods NAME`
  prints), with the gradient roles of `fmcalc.explain(name)` in a collapsed block
  and, for a method with a curriculum, its length in the paper and under `fit`.
- `--8<-- "benchmarks/results/....md"` on a line of its own becomes that report, as
  the benchmark wrote it: its headings below the section that includes it, its
  figures copied into the site. Numbers on the benchmark pages come from these
  files only.
"""

import pathlib
import posixpath
import re
import textwrap

from mkdocs.structure.files import File

import fmcalc


_MARKER = re.compile(r"^<!-- methods: ([\w-]+) -->$", re.MULTILINE)
_INCLUDE = re.compile(r'^--8<-- "(benchmarks/results/[^"]+\.md)"$', re.MULTILINE)
_LINK = re.compile(r"(\]\()([^)\s]+)(\))")
_ROOT = pathlib.Path(__file__).resolve().parents[1]


# The run length of the example in each curriculum note.
_EXAMPLE_RUN = 10_000


def _curricula(name: str) -> str:
    """Each schedule of the method as the paper has it, and as `fit` sizes it."""
    method = fmcalc.methods.get(name)
    if not method.schedules:
        return ""
    paper = "; ".join(
        f"`{key}` follows `{' '.join(repr(schedule).split())}`"
        for key, schedule in method.schedules.items()
    )
    settled = method.settled_step
    sized = method.for_run(_EXAMPLE_RUN).settled_step
    return (
        "\n**Curriculum and run length**\n\n"
        f"- In the paper: {paper}, settled at step {settled:,} "
        f'(`fmcalc.methods.get("{name}").settled_step`).\n'
        "- Under [`fmcalc.train.fit`][], by default: `method.for_run(steps)`, each "
        "schedule compressed ([`fmcalc.schedules.Compressed`][]) to settle by half "
        f"the run, e.g. at step {sized:,} of a {_EXAMPLE_RUN:,}-step run. "
        '`options=fmcalc.train.Options(schedules="paper")` keeps the paper\'s step '
        "counts.\n"
    )


# The measured effect of each setting of a method's reference preset
# (benchmarks/reference_differences.py), shown under its differences.
_DIFFERENCES = _ROOT / "benchmarks" / "results" / "reference-differences"


def _entry(name: str) -> str:
    text = fmcalc.methods.doc(name, format="markdown")
    measured = _DIFFERENCES / f"{name}.md"
    if fmcalc.methods.info(name).presets.get("reference"):
        # A preset without its measurement is a page that claims less than it
        # should: fail the build rather than leave the table out.
        text += "\n" + measured.read_text()
    heading, rest = text.split("\n", 1)
    explained = textwrap.indent(str(fmcalc.explain(name)), "    ")
    return (
        f"{heading} {{ #{name} }}\n{rest}"
        + _curricula(name)
        + f'\n??? note "Gradient roles: `fmcalc explain {name}`"\n\n'
        + f"    ```text\n{explained}\n    ```\n"
    )


def _table() -> str:
    lines = [
        "| method | full name | rule | learning | output | FPE per row | FPE, all "
        "terms on all rows | Dieleman's table |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in fmcalc.methods.names():
        method, info = fmcalc.methods.get(name), fmcalc.methods.info(name)
        every_row = method.replace(split=None) if method.split else method
        theirs = "—" if info.dieleman_cost is None else f"{info.dieleman_cost}"
        lines.append(
            f"| [`{name}`]({method.rule}.md#{name}) | {info.full_name} | "
            f"{method.rule} | {method.learning} | `{method.output}` | "
            f"{method.cost():.2f} | {every_row.cost():.2f} | {theirs} |"
        )
    return "\n".join(lines) + "\n"


def _replace(match: re.Match) -> str:
    what = match.group(1)
    if what == "table":
        return _table()
    names = [n for n in fmcalc.methods.names() if fmcalc.methods.get(n).rule == what]
    if not names:
        raise ValueError(f"No registry method follows the rule {what!r}.")
    return "\n".join(_entry(name) for name in names)


def _report_files(report: pathlib.Path) -> list[pathlib.Path]:
    """The files of the results folder that a report links to (its figures)."""
    targets = (report.parent / m.group(2) for m in _LINK.finditer(report.read_text()))
    return [p for p in targets if p.is_file()]


def _included(docs_dir: str) -> set[pathlib.Path]:
    found = set()
    for page in pathlib.Path(docs_dir).rglob("*.md"):
        found |= {_ROOT / m.group(1) for m in _INCLUDE.finditer(page.read_text())}
    return found


def _depth(before: str) -> int:
    """The level of the last heading in `before`, outside code blocks."""
    depth, fenced = 1, False
    for line in before.splitlines():
        fenced ^= line.startswith("```")
        heading = re.match(r"(#+) ", line)
        if heading and not fenced:
            depth = len(heading.group(1))
    return depth


def on_files(files, config):
    for report in sorted(_included(config.docs_dir)):
        if not report.is_file():
            raise FileNotFoundError(f"{report} is not there: run its benchmark.")
        for figure in _report_files(report):
            files.append(
                File(
                    figure.relative_to(_ROOT).as_posix(),
                    src_dir=str(_ROOT),
                    dest_dir=config.site_dir,
                    use_directory_urls=config.use_directory_urls,
                )
            )
    return files


def _include(match: re.Match, page_dir: str, depth: int) -> str:
    report = _ROOT / match.group(1)
    folder = report.parent.relative_to(_ROOT).as_posix()
    lines, fenced = [], False
    for line in report.read_text().splitlines():
        fenced ^= line.startswith("```")
        lines.append(
            "#" * depth + line if line.startswith("#") and not fenced else line
        )

    def relink(link: re.Match) -> str:
        if not (report.parent / link.group(2)).is_file():
            return link.group(0)
        target = posixpath.relpath(f"{folder}/{link.group(2)}", page_dir or ".")
        return link.group(1) + target + link.group(3)

    return _LINK.sub(relink, "\n".join(lines)) + "\n"


def on_page_markdown(markdown: str, page, **kwargs) -> str:
    page_dir = posixpath.dirname(page.file.src_uri)
    # A report's headings go below the section that includes it.
    markdown = _INCLUDE.sub(
        lambda m: _include(m, page_dir, _depth(markdown[: m.start()])), markdown
    )
    return _MARKER.sub(_replace, markdown)
