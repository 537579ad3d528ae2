import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from .._custom_types import Label, Time
from ._embedding import embed_label, sinusoidal_embedding


class MLP(eqx.Module):
    """An average-velocity network `V(x, s, t)` for vector data: a SiLU MLP.

    The input is `[x, emb(s), emb(t)]`, with [`fmcalc.nn.sinusoidal_embedding`][] of
    size `time_features` for each time; `depth` hidden layers of size `width` with
    SiLU; a linear output of size `dim`. With `num_classes`, a learned label embedding
    (one row per class and a last one for [`fmcalc.NULL_LABEL`][], unconditional or
    dropped labels) is added to the first hidden layer's pre-activation, which equals
    concatenating a one-hot label to the input. With `skip=True`, a time-dependent
    scalar gate passes the input through, `V = MLP(...) + g(s, t) x` with `g` linear
    in the time embeddings: a hidden layer narrower than `dim` cannot carry the
    noise that `V` must return near `s = 1` (`v(x, 1) = x - E[x0]`), and the gate can.

    All layers use equinox's default initialisation, so the untrained network is a
    non-trivial function of `(x, s, t)` and derivative checks on it are informative.
    The layers are a Python loop (unrolled in the program), so that
    [`fmcalc.cost.flops`][] counts every layer.

    Called per example: `model(x, s, t, cond=None)` with `x` of shape `(dim,)` and
    scalar `s`, `t`; batch with `jax.vmap`.
    """

    layers: tuple[eqx.nn.Linear, ...]
    label_embedding: eqx.nn.Embedding | None
    gate: eqx.nn.Linear | None
    dim: int = eqx.field(static=True)
    time_features: int = eqx.field(static=True)
    num_classes: int | None = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        *,
        width: int = 256,
        depth: int = 4,
        time_features: int = 64,
        num_classes: int | None = None,
        skip: bool = False,
        dtype=None,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `dim`: the size of `x` (and of the output).
        - `width`: the size of each hidden layer.
        - `depth`: the number of hidden layers (so `depth + 1` linear layers).
        - `time_features`: the size of each time embedding, even.
        - `num_classes`: the number of class labels, or `None` for an unconditional
            network.
        - `skip`: add the gated input `g(s, t) x` to the output.
        - `dtype`: the parameters' floating dtype; JAX's default float if `None`.
        - `key`: a PRNG key for the initialisation.
        """
        for name, value in [("dim", dim), ("width", width), ("depth", depth)]:
            if value < 1:
                raise ValueError(f"`{name}` must be >= 1, but got {name}={value}.")
        if time_features < 2 or time_features % 2 != 0:
            raise ValueError(
                "`time_features` must be an even integer >= 2, but got "
                f"time_features={time_features}."
            )
        if num_classes is not None and num_classes < 1:
            raise ValueError(
                "`num_classes` must be >= 1 or None, but got "
                f"num_classes={num_classes}."
            )
        sizes = [dim + 2 * time_features] + [width] * depth + [dim]
        keys = jr.split(key, len(sizes))
        self.layers = tuple(
            eqx.nn.Linear(n_in, n_out, dtype=dtype, key=k)
            for n_in, n_out, k in zip(sizes[:-1], sizes[1:], keys[:-1], strict=True)
        )
        if num_classes is None:
            self.label_embedding = None
        else:
            self.label_embedding = eqx.nn.Embedding(
                num_classes + 1, width, dtype=dtype, key=keys[-1]
            )
        # A key of its own, so that `skip` leaves the other layers' initialisation
        # as it is without the gate.
        gate_key = jr.fold_in(key, len(sizes))
        self.gate = (
            eqx.nn.Linear(2 * time_features, "scalar", dtype=dtype, key=gate_key)
            if skip
            else None
        )
        self.dim = dim
        self.time_features = time_features
        self.num_classes = num_classes

    def __call__(
        self,
        x: Float[Array, " dim"],
        s: Time,
        t: Time,
        *,
        cond: Label | None = None,
    ) -> Float[Array, " dim"]:
        """The average velocity `V(x, s, t)`.

        **Arguments:**

        - `x`: the state at the source time `s`, shape `(dim,)`.
        - `s`: the source time, a scalar.
        - `t`: the target time, a scalar.
        - `cond`: a scalar integer class label in `[0, num_classes)`, or `None` or
            [`fmcalc.NULL_LABEL`][] for no label. Must be `None` for an
            unconditional network.

        **Returns:** `V(x, s, t)`, shape `(dim,)`.
        """
        if x.shape != (self.dim,):
            raise ValueError(
                f"`x` must have shape ({self.dim},) (one example; batch with "
                f"`jax.vmap`), but got shape {x.shape}."
            )
        label = embed_label(self.label_embedding, cond)
        embed = lambda time: sinusoidal_embedding(
            time, self.time_features, dtype=x.dtype
        )
        times = jnp.concatenate([embed(s), embed(t)])
        h = jnp.concatenate([x, times])
        first, *rest = self.layers
        h = first(h)
        if label is not None:
            h = h + label
        h = jax.nn.silu(h)
        *hidden, last = rest
        for layer in hidden:
            h = jax.nn.silu(layer(h))
        out = last(h)
        if self.gate is not None:
            out = out + self.gate(times) * x
        return out
