"""fmcalc's warnings: a spec that builds but is probably not what its author meant.

Every warning fmcalc raises through Python's `warnings` module is a subclass of
[`fmcalc.FmcalcWarning`][], so one filter silences or escalates them all:

```python
import warnings
import fmcalc

warnings.simplefilter("error", fmcalc.FmcalcWarning)  # e.g. in a test suite
```
"""

import inspect
import os
import sysconfig
import warnings


# Frames a warning is not attributed to: fmcalc itself, the libraries that call
# into it on a user's behalf (equinox's module machinery, the type checkers'
# wrappers) and the standard library.
_PACKAGES = tuple(
    os.path.dirname(inspect.getfile(module)) + os.sep
    for module in map(__import__, ("beartype", "equinox", "fmcalc", "jaxtyping"))
)
_STDLIB = sysconfig.get_paths()["stdlib"] + os.sep


def _internal(filename: str) -> bool:
    if filename.startswith(_PACKAGES):
        return True
    return filename.startswith(_STDLIB) and "site-packages" not in filename


def warn(message: str, category: type[Warning]) -> None:
    """`warnings.warn`, attributed to the first caller outside fmcalc, equinox,
    the type checkers' wrappers and the standard library: the user's line."""
    frame = inspect.currentframe()
    level = 1  # this frame, the caller of `warnings.warn`
    while frame is not None and _internal(frame.f_code.co_filename):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)


class FmcalcWarning(UserWarning):
    """The base class of every warning fmcalc raises."""


class GradientPathWarning(FmcalcWarning):
    """The online parameters reach a term's loss only through the *input* of a
    network that has no parameter gradient of its own (an EMA, an aux network, a
    teacher, or the online network under a stop-gradient).

    The exact map can still be a fixed point of such a loss, but the update the
    online network receives is the input gradient of a frozen network, which
    training rarely follows back to the map. A spec that means it (CTM compares
    through an EMA network on purpose) declares it with
    `Term(..., input_gradient="why")`.
    """


class FixedPointShiftWarning(FmcalcWarning):
    """A per-example loss whose weight depends on the residual (pseudo-Huber,
    adaptive, cosine) on a term whose target uses the conditional velocity
    `eps - x0`.

    Such a loss estimates a robust location of `eps - x0` given `x_s`, not its
    mean, so the exact map stops being a fixed point on non-Gaussian data (see
    [`fmcalc.Adaptive`][]). A method that accepts the shift declares it with
    `Method(..., biased="why")`.
    """


class FiniteDifferenceStepWarning(FmcalcWarning):
    """A finite-difference step so small that round-off in the network's output,
    divided by the step, outweighs the truncation error it was chosen to remove:
    below `sqrt(eps)` for a forward difference and `cbrt(eps)` for a central one
    (`eps` the machine epsilon of the dtype the loss is traced in)."""


class EMAHorizonWarning(FmcalcWarning):
    """An EMA whose averaging horizon `1 / (1 - decay)` is longer than a fifth of the
    run, for a method whose loss reads the EMA network: its targets then lag far
    behind the online network for most of training."""


class DataScaleWarning(FmcalcWarning):
    """Data far from unit scale: an overall standard deviation outside `[0.1, 10]`.
    fmcalc's conventions pair the data with noise `N(0, I)` (`x_t = (1 - t) x0 +
    t eps`), so data a thousand times larger leaves the noise end almost no noise
    and losses of order its square; data far smaller is drowned. Standardise it
    (`(x - mean) / std`, then samples `* std + mean`), as
    [`fmcalc.datasets.from_file`][] does."""
