"""Every method of the taxonomy as a short declarative spec built from the public
primitives. `names()` lists them; `get(name, **overrides)` builds one.

Each spec's docstring gives its loss in fmcalc's convention, how the paper's symbols
translate, its defaults (with the paper or code they come from) and which deviations
of public code it follows or avoids.
"""

# isort: off
# Registration order is the listing order: the taxonomy's 22 methods, then extras.
from . import _baseline, _lagrangian, _eulerian, _compositional  # noqa: F401
from . import _extras  # noqa: F401

# isort: on
from ._registry import get as get, names as names, register as register
