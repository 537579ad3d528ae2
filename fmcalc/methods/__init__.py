"""Every method of the taxonomy as a short declarative spec built from the public
primitives. `names()` lists them; `get(name, **overrides)` builds one.

Each spec's docstring gives its loss in fmcalc's convention, how the paper's symbols
translate, its defaults (with the paper or code they come from) and which deviations
of public code it follows or avoids.
"""

from . import _compositional, _eulerian, _lagrangian  # noqa: F401  (registration)
from ._registry import get as get, names as names, register as register
