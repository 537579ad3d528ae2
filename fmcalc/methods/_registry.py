import inspect
from collections.abc import Callable

from .._method import Method


_BUILDERS: dict[str, Callable[..., Method]] = {}


def register(name: str):
    """Register a method builder under `name` (a decorator)."""

    def decorate(builder: Callable[..., Method]) -> Callable[..., Method]:
        if name in _BUILDERS:
            raise ValueError(f"A method named {name!r} is already registered.")
        _BUILDERS[name] = builder
        return builder

    return decorate


def names() -> list[str]:
    """The names of all registered methods, in registration order."""
    return list(_BUILDERS)


def get(name: str, **overrides) -> Method:
    """The method `name`, with its defaults changed by `overrides`.

    **Arguments:**

    - `name`: a registry name (see [`fmcalc.methods.names`][]).
    - `overrides`: keyword options of that method's builder (its docstring lists
      them), e.g. `derivative=fmcalc.FiniteDifference(1e-3)` or `split=(0.5, 0.5)`.

    **Returns:** the [`fmcalc.Method`][].
    """
    if name not in _BUILDERS:
        raise ValueError(f"Unknown method {name!r}; the registered ones are {names()}.")
    builder = _BUILDERS[name]
    options = inspect.signature(builder).parameters
    unknown = sorted(set(overrides) - set(options))
    if unknown:
        raise TypeError(
            f"Method {name!r} has no option(s) {unknown}; its options are "
            f"{sorted(options)}."
        )
    return builder(**overrides)
