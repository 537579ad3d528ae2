"""The data sets of `fmcalc.datasets` load offline, in the shapes `fit` takes."""

import sys

import jax
import numpy as np
import pytest

import fmcalc.datasets as datasets


@pytest.mark.parametrize("name", ["ring", "checkerboard", "moons"])
def test_toy_sets_are_samplers(name):
    data = datasets.load(name)
    x = data.sample(jax.random.key(0), 100)  # pyright: ignore
    assert x.shape == (100, 2) and x.dtype == np.float32
    assert data.train_data is data.sample and not data.is_image
    assert (data.flow is not None) == (name == "ring")


@pytest.mark.parametrize(
    "name, shape, n", [("digits", (8, 8), 1797), ("mnist", (28, 28), 5000)]
)
def test_image_sets_are_labelled_rows(name, shape, n):
    data = datasets.load(name)
    assert data.shape == shape and data.is_image and data.num_classes == 10
    assert data.rows is not None and data.rows.shape == (n, data.dim)
    assert data.rows.min() >= -1 and data.rows.max() <= 1
    assert data.labels is not None and data.labels.shape == (n,)
    assert data.to_data_units(data.rows[:3]).shape == (3, *shape)


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"fmcalc\[data\]"):
        datasets.digits()


def test_own_file_is_standardised_and_mapped_back(tmp_path):
    raw = np.random.default_rng(0).normal(5.0, 3.0, (500, 2))
    np.save(tmp_path / "points.npy", raw)
    data = datasets.load(tmp_path / "points.npy")
    assert data.rows is not None and data.shape == (2,)
    assert np.allclose(data.rows.mean(0), 0, atol=1e-5)
    assert np.isclose(data.rows.std(), 1, atol=1e-3)
    assert np.allclose(data.to_data_units(data.rows), raw, atol=1e-4)


def test_own_images_with_labels(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (20, 4, 5)).astype(np.uint8)
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "labels.npy", np.arange(20) % 3)
    data = datasets.load(tmp_path / "images.npy", labels=tmp_path / "labels.npy")
    assert data.shape == (4, 5) and data.dim == 20 and data.num_classes == 3
    assert data.is_image


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros(5), "one example per row"),
        (np.array([[0.0, np.nan], [1.0, 2.0]]), "NaN"),
        (np.array([["a", "b"], ["c", "d"]]), "real numbers"),
    ],
)
def test_bad_files_are_refused(tmp_path, array, message):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(ValueError, match=message):
        datasets.load(tmp_path / "bad.npy")


def test_bad_labels_and_names_are_refused(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((4, 2)))
    np.save(tmp_path / "y.npy", np.array([0.5, 1, 2, 3]))
    with pytest.raises(ValueError, match="integers"):
        datasets.load(tmp_path / "x.npy", labels=tmp_path / "y.npy")
    with pytest.raises(ValueError, match="checkerboard"):
        datasets.load("chequerboard")
    with pytest.raises(FileNotFoundError):
        datasets.load(tmp_path / "missing.npy")
    with pytest.raises(ValueError, match="own labels"):
        datasets.load("ring", labels=tmp_path / "y.npy")
