import math

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._batch import NULL_LABEL
from .._custom_types import Label, Time
from .._misc import checked


def sinusoidal_embedding(
    t: Time, features: int, *, max_frequency: float = 100.0, dtype=None
) -> Float[Array, " features"]:
    """Sinusoidal embedding of a scalar time `t ∈ [0, 1]`.

    Returns `[cos(ω_k t), sin(ω_k t)]` for `features // 2` angular frequencies `ω_k`
    spaced geometrically from `1` to `max_frequency` (radians per unit time).

    The DiT convention embeds `1000 t` with frequencies down from 1, i.e. up to 1000
    rad per unit time; that makes `∂_t` of the embedding (and so every JVP tangent in
    `s` or `t`) up to 1000 times larger than the time range, which FastGen removes
    for its JVPs for that reason. The default `max_frequency = 100` keeps the
    embedding's time derivative at most 100.

    **Arguments:**

    - `t`: a scalar time.
    - `features`: the embedding size, even and at least 2.
    - `max_frequency`: the highest angular frequency, at least 1.
    - `dtype`: the floating dtype of the result; by default that of `t` (promoted
        to a float).

    **Returns:** an array of shape `(features,)`.

    **Example:**

    ```python
    emb = sinusoidal_embedding(0.3, 64)  # shape (64,)
    ```
    """
    if features < 2 or features % 2 != 0:
        raise ValueError(
            f"`features` must be an even integer >= 2, but got features={features}."
        )
    if max_frequency < 1:
        raise ValueError(
            f"`max_frequency` must be >= 1, but got max_frequency={max_frequency}."
        )
    t = jnp.asarray(t)
    if t.shape != ():
        raise ValueError(f"`t` must be a scalar, but got shape {t.shape}.")
    if dtype is None:
        dtype = jnp.result_type(t.dtype, float)
    t = t.astype(dtype)
    half = features // 2
    # Geometric spacing from 1 to max_frequency; a single frequency is just 1.
    exponents = jnp.arange(half, dtype=dtype) / max(half - 1, 1)
    frequencies = jnp.exp(math.log(max_frequency) * exponents)
    angles = t * frequencies
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)])


def embed_label(
    embedding: eqx.nn.Embedding | None, cond: Label | None
) -> Float[Array, " width"] | None:
    """The label embedding of `cond`, shared by the models' `cond` handling.

    `embedding` has `num_classes + 1` rows: one per class label `0 … num_classes - 1`,
    and a last one for "no label", used when `cond is None` or `cond` is
    [`fmcalc.NULL_LABEL`][] (unconditional or dropped labels). Any other label is an
    error, at run time under `jit`: `num_classes` itself would otherwise silently
    mean "no label" (1-indexed labels would lose their last class).
    Returns `None` for an unconditional model (`embedding is None`).
    """
    if embedding is None:
        if cond is not None:
            raise ValueError(
                "This model was built with `num_classes=None` (unconditional), but "
                f"got cond={cond!r}. Pass `num_classes` at construction to use labels."
            )
        return None
    num_classes = embedding.num_embeddings - 1
    if cond is None:
        return embedding(jnp.asarray(num_classes))
    label = jnp.asarray(cond)
    if label.shape != () or not jnp.issubdtype(label.dtype, jnp.integer):
        raise ValueError(
            "`cond` must be a scalar integer label (batch with `jax.vmap`), but got "
            f"shape {label.shape} and dtype {label.dtype}."
        )
    label = checked(
        label,
        (label >= num_classes) | (label < NULL_LABEL),
        f"`cond` must be a class label in [0, {num_classes}) or fmcalc.NULL_LABEL = "
        f"{NULL_LABEL} (no label); labels counted from 1 must be shifted down by 1.",
    )
    return embedding(jnp.where(label == NULL_LABEL, num_classes, label))
