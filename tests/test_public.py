"""Every public name imports and is documented."""

import importlib
import inspect

import pytest


NAMESPACES = [
    "fmcalc",
    "fmcalc.datasets",
    "fmcalc.flows",
    "fmcalc.testing",
    "fmcalc.cost",
    "fmcalc.nn",
    "fmcalc.methods",
    "fmcalc.schedules",
    "fmcalc.train",
]


def _public(namespace):
    module = importlib.import_module(namespace)
    for name in dir(module):
        if name.startswith("_"):
            continue
        value = getattr(module, name)
        if inspect.ismodule(value):
            continue
        yield name, value


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_public_names_are_documented(namespace):
    names = dict(_public(namespace))
    assert names, namespace
    undocumented = [
        name
        for name, value in names.items()
        if (inspect.isclass(value) or inspect.isfunction(value))
        and not (inspect.getdoc(value) or "").strip()
    ]
    assert not undocumented, f"{namespace}: {undocumented}"


def test_module_level_leaves():
    import fmcalc

    assert [str(v) for v in (fmcalc.X, fmcalc.S, fmcalc.T, fmcalc.U)] == [
        "x",
        "s",
        "t",
        "u",
    ]
