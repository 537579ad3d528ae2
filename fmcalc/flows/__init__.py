"""Analytic flows: data distributions whose probability-flow ODE is known exactly."""

from ._base import AbstractFlow as AbstractFlow
from ._gaussian import Gaussian as Gaussian
from ._mixture import GaussianMixture as GaussianMixture, PointCloud as PointCloud
