"""Metrics of the benchmarks, on plain NumPy arrays (float64 inside).

- Paired errors between a sample and the exact end point of the same noise row.
- The right-component share of mixture samples.
- The unbiased energy distance between two samples.
- The Fréchet distance between two feature sets, and the small image classifier
  whose features it uses.
"""

import hashlib
import json
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax


def paired_errors(samples: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """Per-row Euclidean distance `‖samples_i - exact_i‖` (rows paired by noise)."""
    samples = np.asarray(samples, np.float64)
    exact = np.asarray(exact, np.float64)
    if samples.shape != exact.shape:
        raise ValueError(
            f"paired rows need equal shapes; got {samples.shape} and {exact.shape}."
        )
    return np.linalg.norm(samples - exact, axis=1)


def paired_rmse(samples: np.ndarray, exact: np.ndarray) -> float:
    """`sqrt(mean_i ‖samples_i - exact_i‖²)`."""
    return float(np.sqrt(np.mean(paired_errors(samples, exact) ** 2)))


def median_paired_error(samples: np.ndarray, exact: np.ndarray) -> float:
    """`median_i ‖samples_i - exact_i‖`."""
    return float(np.median(paired_errors(samples, exact)))


def component_log_posterior(x: np.ndarray, mixture: dict) -> np.ndarray:
    """`log w_k + log N(x; mu_k, Sigma_k)` up to a shared constant, shape `(n, k)`."""
    x = np.asarray(x, np.float64)
    weights = np.asarray(mixture["weights"], np.float64)
    means = np.asarray(mixture["means"], np.float64)
    covs = np.asarray(mixture["covs"], np.float64)
    out = np.empty((x.shape[0], weights.shape[0]))
    for k in range(weights.shape[0]):
        chol = np.linalg.cholesky(covs[k])
        z = np.linalg.solve(chol, (x - means[k]).T)
        logdet = 2 * np.sum(np.log(np.diag(chol)))
        out[:, k] = np.log(weights[k]) - 0.5 * logdet - 0.5 * np.sum(z**2, axis=0)
    return out


def assign_components(x: np.ndarray, mixture: dict) -> np.ndarray:
    """The most probable mixture component of each row of `x` (the data-time
    posterior `argmax_k w_k N(x; mu_k, Sigma_k)`)."""
    return np.argmax(component_log_posterior(x, mixture), axis=1)


def right_component_share(samples: np.ndarray, exact: np.ndarray, mixture) -> float:
    """The share of rows whose sample lies in the component of the exact end point of
    the same noise (both by posterior)."""
    hits = assign_components(samples, mixture) == assign_components(exact, mixture)
    return float(np.mean(hits))


def _mean_distance(a: np.ndarray, b: np.ndarray, *, exclude_diagonal: bool) -> float:
    """Mean pairwise Euclidean distance, in row blocks to bound memory."""
    total = 0.0
    b_sq = np.sum(b**2, axis=1)
    block = max(1, 2_000_000 // max(b.shape[0], 1))
    for start in range(0, a.shape[0], block):
        rows = a[start : start + block]
        sq = np.sum(rows**2, axis=1)[:, None] + b_sq[None, :] - 2 * rows @ b.T
        dist = np.sqrt(np.maximum(sq, 0.0))
        if exclude_diagonal:
            index = np.arange(rows.shape[0])
            dist[index, start + index] = 0.0
        total += float(np.sum(dist))
    pairs = a.shape[0] * (b.shape[0] - 1 if exclude_diagonal else b.shape[0])
    return total / pairs


def energy_distance(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased estimator of the energy distance
    `2 E‖X - Y‖ - E‖X - X'‖ - E‖Y - Y'‖` (zero iff the laws agree).

    Within-sample means leave out the diagonal (U-statistics), so the estimate is
    unbiased and scatters around 0 for two samples of one law (it can be negative).
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"need (n, d) and (m, d) arrays; got {x.shape}, {y.shape}.")
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError("each sample needs at least two rows.")
    cross = _mean_distance(x, y, exclude_diagonal=False)
    within_x = _mean_distance(x, x, exclude_diagonal=True)
    within_y = _mean_distance(y, y, exclude_diagonal=True)
    return 2 * cross - within_x - within_y


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """`‖mu_a - mu_b‖² + tr(S_a + S_b - 2 (S_a S_b)^{1/2})` between the Gaussian fits
    of two feature sets (rows are examples)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))
    # tr (S_a S_b)^{1/2} = tr (S_a^{1/2} S_b S_a^{1/2})^{1/2}: two symmetric roots.
    lam, q = np.linalg.eigh(cov_a)
    root_a = (q * np.sqrt(np.maximum(lam, 0.0))) @ q.T
    middle = root_a @ cov_b @ root_a
    cross = np.sum(np.sqrt(np.maximum(np.linalg.eigvalsh((middle + middle.T) / 2), 0)))
    value = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * cross
    return float(max(value, 0.0))


# ------------------------------------------------------------------- classifier


class Classifier(eqx.Module):
    """A ReLU MLP classifier; its last hidden layer is the feature map of the
    Fréchet distance."""

    layers: tuple[eqx.nn.Linear, ...]

    def __init__(self, dim: int, hidden: tuple[int, ...], classes: int, *, key):
        sizes = (dim, *hidden, classes)
        keys = jax.random.split(key, len(sizes) - 1)
        self.layers = tuple(
            eqx.nn.Linear(a, b, key=k)
            for a, b, k in zip(sizes[:-1], sizes[1:], keys, strict=True)
        )

    def features(self, x):
        for layer in self.layers[:-1]:
            x = jax.nn.relu(layer(x))
        return x

    def __call__(self, x):
        return self.layers[-1](self.features(x))


CLASSIFIER = {"hidden": (256, 128), "steps": 3000, "batch": 128, "lr": 1e-3}


def _split(n: int, seed: int = 0, test_fraction: float = 0.2):
    order = np.random.default_rng(seed).permutation(n)
    n_test = int(round(test_fraction * n))
    return order[n_test:], order[:n_test]


def train_classifier(images: np.ndarray, labels: np.ndarray, classes: int, *, key):
    """Train the feature classifier on 80% of the images (fixed split), with a small
    additive-noise augmentation so that its features are defined a little off the
    data. **Returns:** `(classifier, test accuracy)`."""
    train, test = _split(images.shape[0])
    x_train = jnp.asarray(images[train], jnp.float32)
    y_train = jnp.asarray(labels[train])
    config = CLASSIFIER
    init_key, train_key = jax.random.split(key)
    model = Classifier(images.shape[1], config["hidden"], classes, key=init_key)
    optim = optax.adamw(optax.cosine_decay_schedule(config["lr"], config["steps"]))
    state = optim.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, state, key):
        k_rows, k_noise = jax.random.split(key)
        rows = jax.random.randint(k_rows, (config["batch"],), 0, x_train.shape[0])
        x = x_train[rows]
        x = x + 0.1 * jax.random.normal(k_noise, x.shape, x.dtype)

        def loss(model):
            logits = jax.vmap(model)(x)
            return optax.softmax_cross_entropy_with_integer_labels(
                logits, y_train[rows]
            ).mean()

        grads = eqx.filter_grad(loss)(model)
        updates, state = optim.update(
            grads, state, eqx.filter(model, eqx.is_inexact_array)
        )
        return eqx.apply_updates(model, updates), state

    for i in range(config["steps"]):
        model, state = step(model, state, jax.random.fold_in(train_key, i))
    predicted = predict(model, images[test])
    return model, float(np.mean(predicted == labels[test]))


@eqx.filter_jit
def _apply(model, x):
    return jax.vmap(model)(x), jax.vmap(model.features)(x)


def _batched(model, x: np.ndarray):
    logits, features = [], []
    for start in range(0, x.shape[0], 1024):
        out = _apply(model, jnp.asarray(x[start : start + 1024], jnp.float32))
        logits.append(np.asarray(out[0]))
        features.append(np.asarray(out[1]))
    return np.concatenate(logits), np.concatenate(features)


def predict(model: Classifier, x: np.ndarray) -> np.ndarray:
    """Predicted class of each row."""
    return np.argmax(_batched(model, x)[0], axis=1)


def features(model: Classifier, x: np.ndarray) -> np.ndarray:
    """The classifier's features of each row."""
    return _batched(model, x)[1]


def cached_classifier(
    name: str, images: np.ndarray, labels: np.ndarray, classes: int, cache: pathlib.Path
):
    """The feature classifier of data set `name`, trained once and cached under
    `cache` (keyed by the data and the classifier settings).

    **Returns:** `(classifier, test accuracy)`.
    """
    digest = hashlib.sha256(np.ascontiguousarray(images).tobytes())
    digest.update(np.ascontiguousarray(labels).tobytes())
    digest.update(json.dumps(CLASSIFIER, sort_keys=True).encode())
    stem = cache / f"classifier-{name}-{digest.hexdigest()[:12]}"
    skeleton = Classifier(
        images.shape[1], CLASSIFIER["hidden"], classes, key=jax.random.key(0)
    )
    weights, meta = stem.with_suffix(".eqx"), stem.with_suffix(".json")
    if weights.exists() and meta.exists():
        model = eqx.tree_deserialise_leaves(weights, skeleton)
        return model, json.loads(meta.read_text())["test_accuracy"]
    model, accuracy = train_classifier(images, labels, classes, key=jax.random.key(0))
    cache.mkdir(parents=True, exist_ok=True)
    eqx.tree_serialise_leaves(weights, model)
    meta.write_text(json.dumps({"test_accuracy": accuracy, **CLASSIFIER}))
    return model, accuracy
