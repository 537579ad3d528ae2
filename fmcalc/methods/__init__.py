"""Every method of the literature as a short declarative spec built from the public
primitives. `names()` lists them; `get(name, **overrides)` builds one; `info(name)`
and `doc(name)` say what it is: full name, citation, formula, options, cost and
known deviations from public code.

Each spec's docstring gives its loss in fmcalc's convention and how the paper's
symbols translate.
"""

# isort: off
# Registration order is the listing order: Dieleman's 22 methods, then extras.
from . import _baseline, _lagrangian, _eulerian, _compositional  # noqa: F401
from . import _extras  # noqa: F401

# isort: on
from ._doc import doc as doc
from ._registry import (
    MethodInfo as MethodInfo,
    get as get,
    info as info,
    names as names,
    options as options,
    parse as parse,
    register as register,
    settings as settings,
)
