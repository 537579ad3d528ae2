"""Every registry method's loss, metrics and gradient on fixed inputs equal the
values recorded in `tests/golden/losses/` (by `record.py` there): a refactor of
the library changes no number."""

import pathlib
import runpy

import numpy as np
import pytest

import fmcalc


RECORD = pathlib.Path(__file__).parent / "golden" / "losses"
recorder = runpy.run_path(str(RECORD / "record.py"))
recorded = np.load(RECORD / "losses.npz")


@pytest.mark.slow
@pytest.mark.parametrize("name", fmcalc.methods.names())
def test_loss_and_gradient_equal_the_recorded_values(name):
    now = recorder["values"](name)
    before = {
        k.partition(":")[2]: recorded[k]
        for k in recorded.files
        if k.startswith(f"{name}:")
    }
    assert before, f"no recorded values for {name!r}; run {RECORD / 'record.py'}"
    assert sorted(now) == sorted(before)
    for key, value in now.items():
        np.testing.assert_allclose(
            value, before[key], rtol=1e-12, atol=1e-14, err_msg=f"{name} {key}"
        )


@pytest.mark.slow
def test_a_changed_loss_is_caught():
    now = recorder["values"]("lsd")
    moved = now["0/loss"] * (1 + 1e-9)
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(
            moved, recorded["lsd:0/loss"], rtol=1e-12, atol=1e-14
        )
