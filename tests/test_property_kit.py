"""The hypothesis side of the kit: its settings profile, strategies that hold
dimension and dtype fixed, and failing examples that print readably."""

import hypothesis
import jax.numpy as jnp
import numpy as np
import pytest

import fmcalc
from fmcalc.testing import (
    PROFILE,
    gaussian_mixtures,
    gaussians,
    property_settings,
    seeds,
)


def test_profile_is_registered_for_jax_models():
    settings = hypothesis.settings.get_profile(PROFILE)
    assert settings.deadline is None
    assert hypothesis.Phase.shrink not in settings.phases
    assert settings.max_examples == 25
    assert property_settings(max_examples=3).max_examples == 3
    assert property_settings().phases == settings.phases


@property_settings(max_examples=5)
@hypothesis.given(gaussians(dim=3, dtype=np.float32))
def test_gaussians_hold_dimension_and_dtype(flow):
    assert flow.mean.shape == (3,) and flow.mean.dtype == jnp.float32


@property_settings(max_examples=3)
@hypothesis.given(gaussian_mixtures(dim=2, components=2))
def test_mixtures_hold_dimension_and_components(flow):
    assert flow.means.shape == (2, 2)
    assert float(jnp.sum(flow.weights)) == pytest.approx(1.0)


def test_flows_print_their_parameters_rounded():
    gaussian = fmcalc.flows.Gaussian(
        jnp.array([0.123456, -2.0]), jnp.array([[1.0, 0.3], [0.3, 0.5]])
    )
    assert repr(gaussian) == "Gaussian(mean=[0.123, -2], cov=[[1, 0.3], [0.3, 0.5]])"
    mixture = fmcalc.testing.asymmetric_mixture()
    assert repr(mixture).startswith("GaussianMixture(weights=[0.8, 0.2], means=")
    cloud = fmcalc.flows.PointCloud(jnp.arange(20.0).reshape(10, 2))
    assert "... (10 rows)" in repr(cloud) and "t_min=" in repr(cloud)


def test_a_failing_example_prints_the_flow_not_its_construction():
    @property_settings(max_examples=3, print_blob=False)
    @hypothesis.given(gaussians(dim=2), seeds())
    def fails(flow, seed):
        raise AssertionError("deliberately")

    with pytest.raises(AssertionError) as info:
        fails()
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "flow=Gaussian(mean=[" in notes and "cov=[[" in notes, notes
    assert "build(" not in notes
