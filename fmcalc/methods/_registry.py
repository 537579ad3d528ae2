import inspect
import math
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

from .._derivative import JVP, AbstractDerivative, FiniteDifference
from .._expr import AbstractVelocity, ConditionalVelocity, Teacher
from .._losses import AbstractLoss, Adaptive, PseudoHuber, SquaredError
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
    - `presets`: named sets of options (`get(name, preset=...)`), e.g.
      `"reference"`, the settings of the authors' code.
    - `compared_with`: the authors' code the spec was compared with (repository,
      commit and file) and how, or `None` where no comparison was made; the
      deviations then come from reading the paper and public code.
    - `read_code`: the code that was read but not run against the spec (repository,
      commit and files; noted where it is not the authors'), when no test
      recomputes its loss; the deviations list what the reading found.
    """

    name: str
    full_name: str
    citation: str
    summary: str
    deviations: tuple[str, ...] = ()
    dieleman_cost: int | None = None
    presets: Mapping[str, Mapping[str, Any]] = types.MappingProxyType({})
    compared_with: str | None = None
    read_code: str | None = None


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
    presets: Mapping[str, Mapping[str, Any]] | None = None,
    compared_with: str | None = None,
    read_code: str | None = None,
):
    """Register a method builder under `name` (a decorator), with the facts
    [`fmcalc.methods.info`][] returns.

    **Arguments:**

    - `name`: the registry name.
    - `full_name`, `citation`, `summary`, `deviations`, `dieleman_cost`,
      `presets`, `compared_with`, `read_code`: see
      [`fmcalc.methods.MethodInfo`][]. A preset's keys must be options of the
      builder.

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
        accepted = set(inspect.signature(builder).parameters) | set(_EVERY_METHOD)
        for preset, values in (presets or {}).items():
            unknown = sorted(set(values) - accepted)
            if unknown:
                raise TypeError(
                    f"register({name!r}): preset {preset!r} sets {unknown}, which "
                    f"are not options of the builder; its options are "
                    f"{sorted(accepted)}."
                )
        _BUILDERS[name] = builder
        frozen = {
            k: types.MappingProxyType(dict(v)) for k, v in (presets or {}).items()
        }
        _INFO[name] = MethodInfo(
            name, full_name, citation, summary, tuple(deviations), dieleman_cost,
            types.MappingProxyType(frozen), compared_with, read_code,
        )  # fmt: skip
        return builder

    return decorate


def names() -> list[str]:
    """The names of all registered methods, in registration order."""
    return list(_BUILDERS)


def _known(name: str) -> None:
    if name not in _BUILDERS:
        raise ValueError(_unknown(name, cli=False))


def get(name: str, *, preset: str | None = None, **overrides) -> Method:
    """The method `name`, with its defaults changed by a preset and `overrides`.

    **Arguments:**

    - `name`: a registry name (see [`fmcalc.methods.names`][]).
    - `preset`: a named set of options of the method (`info(name).presets`, which
      [`fmcalc.methods.doc`][] lists), e.g. `"reference"` for the settings of the
      authors' code; `None` (default) for the defaults.
    - `overrides`: keyword options of that method's builder
      ([`fmcalc.methods.doc`][] lists them with their defaults), e.g.
      `derivative=fmcalc.FiniteDifference(1e-3)` or `split=(0.5, 0.5)`; they take
      precedence over the preset's. Every method also takes `reduction="mean"`,
      which averages every term's loss over dimensions instead of summing
      ([`fmcalc.Method.replace`][]).

    **Returns:** the [`fmcalc.Method`][].
    """
    _known(name)
    builder = _BUILDERS[name]
    if preset is not None:
        presets = _INFO[name].presets
        if preset not in presets:
            raise ValueError(
                f"Method {name!r} has no preset {preset!r}; its presets are "
                f"{sorted(presets) or 'none'}."
            )
        overrides = {**presets[preset], **overrides}
    # Applied whenever given, "sum" too: a preset's own losses may average.
    reduction = overrides.pop("reduction", None)
    if reduction is not None and reduction not in ("sum", "mean"):
        raise ValueError(
            f"Method {name!r}: `reduction` must be 'sum' (over dimensions, the "
            f"default) or 'mean' (the sum divided by the dimension); got {reduction!r}."
        )
    known = options(name)
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise TypeError(
            f"Method {name!r} has no option(s) {unknown}; its options are "
            f"{sorted(known)}."
        )
    method = builder(**overrides)
    return method if reduction is None else method.replace(reduction=reduction)


def info(name: str) -> MethodInfo:
    """The full name, citation, summary and known deviations of the method `name`.

    **Arguments:**

    - `name`: a registry name (see [`fmcalc.methods.names`][]).

    **Returns:** a [`fmcalc.methods.MethodInfo`][].
    """
    _known(name)
    return _INFO[name]


# Options every method takes, applied to the built method: `reduction` is the
# reduction over dimensions of every term's loss (`Method.replace(reduction=...)`).
_EVERY_METHOD = {
    "reduction": inspect.Parameter(
        "reduction",
        inspect.Parameter.KEYWORD_ONLY,
        default="sum",
        annotation=Literal["sum", "mean"],
    )
}


def options(name: str) -> dict[str, inspect.Parameter]:
    """The keyword options of the method `name`, with their defaults
    (`parameter.default`) and types (`parameter.annotation`): its builder's, and
    `reduction` (`"sum"` over dimensions, the default, or `"mean"`), which every
    method takes."""
    _known(name)
    return {**inspect.signature(_BUILDERS[name]).parameters, **_EVERY_METHOD}


# ------------------------------------------------------------ variants by name

# The finite-difference steps of the named derivatives `fd` and `central`: PID's and
# SoFlow's forward step, FreeFlow's central one.
FD_STEP = 1e-3
CENTRAL_STEP = 5e-3

# Values of object-typed options that can be named in text, by the option's type.
_NAMED: dict[type, dict[str, Callable[[], Any]]] = {
    AbstractLoss: {
        "squared": SquaredError,
        "adaptive": Adaptive,
        "pseudo-huber": PseudoHuber,
    },
    AbstractDerivative: {
        "jvp": JVP,
        "fd": lambda: FiniteDifference(FD_STEP),
        "central": lambda: FiniteDifference(CENTRAL_STEP, "central"),
    },
    AbstractVelocity: {"teacher": Teacher, "conditional": ConditionalVelocity},
}
# Named finite differences that also take their step: `fd:2e-3`, `central:1e-2`.
_SCHEMES = {"fd": "forward", "central": "central"}
_NONE = ("none", "null")
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
# The last word of a variant's made-up name (`meanflow-mse`) and the setting it
# usually means, for the message that refuses the name.
_WORDS = {
    "mse": "loss=squared",
    "l2": "loss=squared",
    "squared": "loss=squared",
    "adaptive": "loss=adaptive",
    "huber": "loss=pseudo-huber",
    "pseudo-huber": "loss=pseudo-huber",
    "jvp": "derivative=jvp",
    "fd": "derivative=fd",
    "central": "derivative=central",
    "central-fd": "derivative=central",
    "fd-central": "derivative=central",
}
_SPEC = re.compile(r"\s*([^\[\]]*?)\s*(?:\[([^\[\]]*)\])?\s*", re.DOTALL)


class _Unreadable(Exception):
    """A value's text does not fit its type; `expected` says what would."""

    def __init__(self, expected: str):
        super().__init__(expected)
        self.expected = expected


def _suggestion(name: str) -> tuple[str, str | None] | None:
    """For a name `<registry name>-<word>`: the registry name, and the setting the
    word usually means when that method has the option (else `None`)."""
    bases = [n for n in _BUILDERS if name.startswith(n + "-")]
    if not bases:
        return None
    base = max(bases, key=len)
    setting = _WORDS.get(name[len(base) + 1 :].lower())
    if setting is not None and setting.partition("=")[0] not in options(base):
        setting = None
    return base, setting


def _unknown(name: str, *, cli: bool) -> str:
    """Why `name` is refused; for `<registry name>-<word>`, how to name the variant
    (as `fmcalc train` options when `cli`, else as a `parse` string)."""
    hint = _suggestion(name) if isinstance(name, str) else None
    if hint is None and not cli and isinstance(name, str) and "[" in name:
        return (
            f"Unknown method {name!r}; a variant with settings in brackets is read "
            f"by fmcalc.methods.parse({name!r})."
        )
    if hint is None:
        known = ", ".join(names()) if cli else str(names())
        return f"Unknown method {name!r}; the registered ones are {known}."
    base, setting = hint
    shown = setting or "OPTION=VALUE"
    how = (
        f"--method {base} --set {shown}"
        if cli
        else f"fmcalc.methods.parse({f'{base}[{shown}]'!r})"
    )
    return (
        f"Unknown method {name!r}: it is not a registry name. A variant of {base!r} "
        f"is named by its settings: {how} (the options of {base}: "
        f"{', '.join(options(base))}; `fmcalc methods {base}` gives their defaults)."
    )


def _type_name(annotation) -> str:
    if annotation is inspect.Parameter.empty:
        return ""
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("fmcalc._", "").replace("typing.", "")


def _type_text(annotation) -> str:
    return _type_name(annotation) or "text"


def _named(text: str, kind: type) -> Any:
    table = {
        word: build
        for base, words in _NAMED.items()
        if issubclass(kind, base)
        for word, build in words.items()
        if isinstance(build(), kind)
    }
    if not table:
        raise _Unreadable(
            f"an instance of {kind.__name__}, which has no text form (build it in "
            "Python and pass it to fmcalc.methods.get)"
        )
    word = text.lower()
    if word in table:
        return table[word]()
    head, colon, step = word.partition(":")
    stepped = [w for w in table if w in _SCHEMES]
    expected = f"one of {', '.join(table)}" + (
        f" ({' and '.join(stepped)} also take a step: {stepped[0]}:0.002)"
        if stepped
        else ""
    )
    if colon and head in stepped:
        try:
            return FiniteDifference(float(step), _SCHEMES[head])
        except (TypeError, ValueError):
            raise _Unreadable(
                f"{head}:STEP with a step in (0, 0.25], e.g. {head}:0.002"
            ) from None
    raise _Unreadable(expected)


def _read(text: str, kind: Any) -> Any:
    """The value of type `kind` that `text` writes, or `_Unreadable`."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(kind)
        if type(None) in members and text.lower() in _NONE:
            return None
        expected = []
        for member in members:
            if member is type(None):
                expected.append("None")
                continue
            try:
                return _read(text, member)
            except _Unreadable as error:
                expected.append(error.expected)
        raise _Unreadable(" or ".join(expected))
    if kind is type(None):
        if text.lower() in _NONE:
            return None
        raise _Unreadable("None")
    if origin is Literal:
        for choice in typing.get_args(kind):
            if str(choice) == text:
                return choice
        raise _Unreadable(f"one of {', '.join(map(str, typing.get_args(kind)))}")
    if origin is tuple:
        items = [item.strip() for item in text.split(",")]
        args = typing.get_args(kind)
        if len(args) == 2 and args[1] is Ellipsis:
            kinds = [args[0]] * len(items)
            expected = f"comma-separated values of type {_type_text(args[0])}"
        else:
            kinds = list(args)
            example = ",".join(["0.5"] * len(args)) if float in args else "..."
            expected = (
                f"{len(args)} comma-separated values of types "
                f"({', '.join(map(_type_text, args))}), e.g. {example}"
            )
            if len(items) != len(args):
                raise _Unreadable(expected)
        try:
            return tuple(_read(i, k) for i, k in zip(items, kinds, strict=True))
        except _Unreadable:
            raise _Unreadable(expected) from None
    if kind is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise _Unreadable("true or false")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise _Unreadable("an integer") from None
    if kind is float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise _Unreadable("a finite number, e.g. 0.1 or 1e-3")
        return value
    if kind is str:
        return text
    if isinstance(kind, type):
        return _named(text, kind)
    raise _Unreadable(
        f"a value of type {_type_text(kind)}, which has no text form (build it in "
        "Python and pass it to fmcalc.methods.get)"
    )


def _assignment(item: Any) -> tuple[str, str]:
    """`(key, value)` of one `KEY=VALUE` setting, tidied: `-` in the key read as
    `_`, spaces around the value and its commas dropped."""
    if not isinstance(item, str):
        raise TypeError(f"A setting is a 'KEY=VALUE' string; got {item!r}.")
    key, equals, value = item.partition("=")
    key = key.strip().replace("-", "_")
    value = ",".join(part.strip() for part in value.split(","))
    if not (equals and key and value):
        raise ValueError(
            f"A setting is written KEY=VALUE (e.g. loss=squared); got {item!r}."
        )
    return key, value


def settings(name: str, sets: Sequence[str]) -> dict[str, Any]:
    """The options of the method `name` that `KEY=VALUE` strings set (what
    `fmcalc train --set` takes), read against each option's declared type, as
    keyword arguments for [`fmcalc.methods.get`][].

    **Arguments:**

    - `name`: a registry name (see [`fmcalc.methods.names`][]).
    - `sets`: strings such as `"loss=squared"`, `"split=0.5,0.5"`, `"c=None"`.
      A `-` in a key is read as `_` (`label-dropout=0.1`).

    A value is read by the option's type ([`fmcalc.methods.options`][]):

    - a number (`float`, `int`): `0.1`, `1e-3`, `4`;
    - `bool`: `true` or `false` (also `yes`/`no`, `on`/`off`, `1`/`0`);
    - a tuple: its numbers separated by commas, `0.5,0.5`;
    - `None` (`none`, `null`), where the option accepts it;
    - `str`: the text itself;
    - a loss: `squared` ([`fmcalc.SquaredError`][]), `adaptive`
      ([`fmcalc.Adaptive`][] with its defaults), `pseudo-huber`
      ([`fmcalc.PseudoHuber`][]);
    - a derivative: `jvp` ([`fmcalc.JVP`][]), `fd` (forward
      [`fmcalc.FiniteDifference`][] with step `1e-3`), `central` (central, step
      `5e-3`); `fd:STEP` and `central:STEP` choose the step;
    - a velocity: `teacher` ([`fmcalc.Teacher`][]) or `conditional`
      ([`fmcalc.ConditionalVelocity`][]).

    Other objects (time samplers, schedules, guidance) have no text form: pass them
    to [`fmcalc.methods.get`][] in Python.

    **Returns:** a dict from option name to value.

    **Raises:** `ValueError` naming the method, the option and the text: for an
    unknown option (with the method's options), a value that its type does not
    read (with what would be right), or an option set twice.

    !!! Example

        ```python
        import fmcalc

        overrides = fmcalc.methods.settings("lsd", ["split=0.5,0.5", "loss=squared"])
        method = fmcalc.methods.get("lsd", **overrides)
        ```
    """
    _known(name)
    if isinstance(sets, str):
        raise TypeError(
            f"`sets` is a list of 'KEY=VALUE' strings; got the string {sets!r} "
            f"(write [{sets!r}])."
        )
    opts = options(name)
    found: dict[str, Any] = {}
    for item in sets:
        key, text = _assignment(item)
        if key not in opts:
            raise ValueError(
                f"Method {name!r} has no option {key!r} (in {item!r}); its options "
                f"are {', '.join(opts)}."
            )
        if key in found:
            raise ValueError(f"Method {name!r}: the option {key!r} is set twice.")
        param = opts[key]
        kind = param.annotation
        if kind is inspect.Parameter.empty or isinstance(kind, str):
            default = param.default
            unset = default is inspect.Parameter.empty or default is None
            kind = str if unset else type(default)
        try:
            found[key] = _read(text, kind)
        except _Unreadable as error:
            raise ValueError(
                f"Method {name!r}: the option {key!r} cannot be {text!r}; expected "
                f"{error.expected} (default {key}={param.default!r})."
            ) from None
    return found


def _split(spec: str) -> tuple[str, list[str]]:
    """`"lsd[split=0.5,0.5,loss=squared]"` -> `("lsd", ["split=0.5,0.5",
    "loss=squared"])`: a comma starts a new setting only before a `KEY=`."""
    if not isinstance(spec, str):
        raise TypeError(f"A method is named by a string; got {spec!r}.")
    match = _SPEC.fullmatch(spec)
    if match is None or not match.group(1):
        raise ValueError(
            f"Cannot read the method {spec!r}: write NAME or NAME[KEY=VALUE,...], "
            "e.g. 'meanflow[loss=squared]'."
        )
    name, body = match.group(1), match.group(2)
    items: list[str] = []
    for piece in (body or "").split(","):
        if items and "=" not in piece:
            items[-1] += "," + piece
        elif piece.strip():
            items.append(piece)
    return name, items


def _variant(
    spec: str, sets: Sequence[str] = (), *, cli: bool = False
) -> tuple[str, list[str], Method]:
    """The registry name, the tidied settings and the method of `spec` with `sets`."""
    name, inline = _split(spec)
    if name not in _BUILDERS:
        raise ValueError(_unknown(name, cli=cli))
    if isinstance(sets, str):
        raise TypeError(
            f"`sets` is a list of 'KEY=VALUE' strings; got the string {sets!r}."
        )
    items = [*inline, *sets]
    presets = [value for key, value in map(_assignment, items) if key == "preset"]
    if len(presets) > 1:
        raise ValueError(f"{spec!r} names {len(presets)} presets, {presets}; name one.")
    options = [item for item in items if _assignment(item)[0] != "preset"]
    method = get(
        name, preset=presets[0] if presets else None, **settings(name, options)
    )
    tidy = ["=".join(_assignment(item)) for item in items]
    if tidy:
        method = method.replace(name=f"{name}[{','.join(tidy)}]")
    return name, tidy, method


def parse(spec: str, sets: Sequence[str] = ()) -> Method:
    """The method that a string names: a registry name, optionally with settings
    of its options, `"meanflow[loss=squared]"` or
    `"lsd[split=0.5,0.5,loss=squared]"`.

    **Arguments:**

    - `spec`: `NAME` or `NAME[KEY=VALUE,...]`; a comma separates settings only
      before a `KEY=`, so a tuple's commas need no quoting. `preset=NAME` picks a
      preset of the method (`"shortcut[preset=reference]"`); the other settings
      take precedence over it.
    - `sets`: more `KEY=VALUE` settings, after those in brackets (what
      `fmcalc train --method NAME --set KEY=VALUE` passes).

    Values are read by each option's type as [`fmcalc.methods.settings`][] says:
    numbers, booleans, tuples, `None`, and names for losses (`squared`,
    `adaptive`, `pseudo-huber`), derivatives (`jvp`, `fd`, `central`) and
    velocities (`teacher`, `conditional`).

    **Returns:** the [`fmcalc.Method`][], equal to
    `fmcalc.methods.get(NAME, KEY=value, ...)` except that a variant's `name`
    says what was set: `"meanflow[loss=squared]"` (a plain name keeps its name).

    **Raises:** `ValueError` for an unknown method (a made-up name such as
    `"meanflow-mse"` is answered with the setting that names it), an unknown
    option (with the method's options) or a value its option does not read (with
    what would be right).

    !!! Example

        ```python
        import fmcalc

        method = fmcalc.methods.parse("meanflow[loss=squared]")
        print(method.name)  # meanflow[loss=squared]
        same = fmcalc.methods.get("meanflow", loss=fmcalc.SquaredError())
        assert method.terms == same.terms
        ```
    """
    return _variant(spec, sets)[2]
