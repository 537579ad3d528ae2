import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from .._custom_types import Label, Time
from ._embedding import embed_label, sinusoidal_embedding


def _zero_linear(in_features: int, out_features: int, dtype) -> eqx.nn.Linear:
    # adaLN-Zero: modulation and output layers start at zero so every block is the
    # identity and the network outputs zero at initialisation (DiT, Peebles & Xie).
    # The layer's structure comes from `filter_eval_shape`, skipping a random init.
    shapes = eqx.filter_eval_shape(
        eqx.nn.Linear, in_features, out_features, dtype=dtype, key=jr.key(0)
    )
    dtype = shapes.weight.dtype
    return eqx.tree_at(
        lambda lin: (lin.weight, lin.bias),
        shapes,
        (
            jnp.zeros((out_features, in_features), dtype),
            jnp.zeros((out_features,), dtype),
        ),
    )


def _tokenwise(layer: eqx.nn.Linear, x: Float[Array, "n a"]) -> Float[Array, "n b"]:
    return jax.vmap(layer)(x)


def _layer_norm(x: Float[Array, "n w"]) -> Float[Array, "n w"]:
    # No affine parameters: the adaLN modulation supplies scale and shift.
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.var(x, axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-6)


def _modulate(
    x: Float[Array, "n w"], shift: Float[Array, " w"], scale: Float[Array, " w"]
) -> Float[Array, "n w"]:
    return x * (1 + scale[None, :]) + shift[None, :]


def _attention(
    q: Float[Array, "n h d"], k: Float[Array, "n h d"], v: Float[Array, "n h d"]
) -> Float[Array, "n h d"]:
    if q.dtype != jnp.float64:
        return jax.nn.dot_product_attention(q, k, v)
    # `jax.nn.dot_product_attention` computes its softmax in float32 even for float64
    # inputs (jax 0.10), which breaks float64 identity and derivative checks; this is
    # the same computation (and FLOPs) kept in float64.
    logits = jnp.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    return jnp.einsum("hqk,khd->qhd", jax.nn.softmax(logits, axis=-1), v)


class _Block(eqx.Module):
    """One DiT block: adaLN-Zero-modulated self-attention and GELU MLP."""

    modulation: eqx.nn.Linear
    qkv: eqx.nn.Linear
    attention_out: eqx.nn.Linear
    mlp_in: eqx.nn.Linear
    mlp_out: eqx.nn.Linear
    heads: int = eqx.field(static=True)

    def __init__(self, width: int, heads: int, mlp_ratio: int, dtype, *, key):
        k1, k2, k3, k4 = jr.split(key, 4)
        self.modulation = _zero_linear(width, 6 * width, dtype)
        self.qkv = eqx.nn.Linear(width, 3 * width, dtype=dtype, key=k1)
        self.attention_out = eqx.nn.Linear(width, width, dtype=dtype, key=k2)
        self.mlp_in = eqx.nn.Linear(width, mlp_ratio * width, dtype=dtype, key=k3)
        self.mlp_out = eqx.nn.Linear(mlp_ratio * width, width, dtype=dtype, key=k4)
        self.heads = heads

    def __call__(
        self, x: Float[Array, "n w"], c: Float[Array, " w"]
    ) -> Float[Array, "n w"]:
        n, width = x.shape
        (
            shift_attention,
            scale_attention,
            gate_attention,
            shift_mlp,
            scale_mlp,
            gate_mlp,
        ) = jnp.split(self.modulation(jax.nn.silu(c)), 6)
        h = _modulate(_layer_norm(x), shift_attention, scale_attention)
        q, k, v = jnp.split(_tokenwise(self.qkv, h), 3, axis=-1)
        head_shape = (n, self.heads, width // self.heads)
        h = _attention(
            q.reshape(head_shape), k.reshape(head_shape), v.reshape(head_shape)
        ).reshape(n, width)
        x = x + gate_attention[None, :] * _tokenwise(self.attention_out, h)
        h = _modulate(_layer_norm(x), shift_mlp, scale_mlp)
        h = _tokenwise(self.mlp_out, jax.nn.gelu(_tokenwise(self.mlp_in, h)))
        return x + gate_mlp[None, :] * h


class _TimeEmbedder(eqx.Module):
    """`Linear → SiLU → Linear` on a sinusoidal embedding of a time."""

    linear_in: eqx.nn.Linear
    linear_out: eqx.nn.Linear
    features: int = eqx.field(static=True)

    def __init__(self, features: int, width: int, dtype, *, key):
        k1, k2 = jr.split(key)
        self.linear_in = eqx.nn.Linear(features, width, dtype=dtype, key=k1)
        self.linear_out = eqx.nn.Linear(width, width, dtype=dtype, key=k2)
        self.features = features

    def __call__(self, time: Time, dtype) -> Float[Array, " w"]:
        embedding = sinusoidal_embedding(time, self.features, dtype=dtype)
        return self.linear_out(jax.nn.silu(self.linear_in(embedding)))


class Transformer(eqx.Module):
    """An average-velocity network `V(x, s, t)` for square images: a DiT.

    `x` is a flat vector of length `dim = channels * H * W` with `H = W`; it is
    reshaped to `(channels, H, W)`, cut into `(H / patch_size)²` patches, embedded
    linearly with a learned positional embedding, and passed through `depth`
    transformer blocks. Each block is pre-LayerNorm self-attention and a GELU MLP,
    both modulated by adaLN-Zero on the conditioning vector
    `c = MLP_s(emb(s)) + MLP_t(emb(t)) (+ label embedding)`, with separate embedders
    for `s` and `t` and [`fmcalc.nn.sinusoidal_embedding`][]. A final adaLN and
    linear layer map tokens back to patches, which are reassembled into a flat
    vector of length `dim`.

    Attention is `jax.nn.dot_product_attention`, except in float64, where that
    function computes its softmax in float32; there the same formula is written out
    (same FLOPs) so that float64 checks hold to float64 precision.

    As in DiT, the modulation and output layers are zero-initialised, so the untrained
    network returns exactly zero (its parameter gradients are not zero). Perturb the
    parameters before checking derivatives with respect to `x`, `s` or `t`.

    The blocks are a Python loop (unrolled in the program), so that
    [`fmcalc.cost.flops`][] counts every block. Forward mode (`jax.jvp`) and reverse
    mode through it work, in float32 and float64.

    Called per example: `model(x, s, t, cond=None)`; batch with `jax.vmap`.
    """

    patch_embedding: eqx.nn.Linear
    position_embedding: Float[Array, "tokens width"]
    time_embedders: tuple[_TimeEmbedder, _TimeEmbedder]
    label_embedding: eqx.nn.Embedding | None
    blocks: tuple[_Block, ...]
    final_modulation: eqx.nn.Linear
    final_linear: eqx.nn.Linear
    dim: int = eqx.field(static=True)
    channels: int = eqx.field(static=True)
    patch_size: int = eqx.field(static=True)
    num_classes: int | None = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        *,
        patch_size: int,
        channels: int = 1,
        width: int = 128,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: int = 4,
        time_features: int = 128,
        num_classes: int | None = None,
        dtype=None,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `dim`: the size of the flat input, `channels * H * W` with `H = W`.
        - `patch_size`: the side of a square patch; must divide `H`.
        - `channels`: the number of image channels.
        - `width`: the token width.
        - `depth`: the number of transformer blocks.
        - `heads`: the number of attention heads; must divide `width`.
        - `mlp_ratio`: the hidden size of each block's MLP, in multiples of `width`.
        - `time_features`: the size of each sinusoidal time embedding, even.
        - `num_classes`: the number of class labels, or `None` for an unconditional
            network. Labels run from 0 to `num_classes - 1`; [`fmcalc.NULL_LABEL`][]
            means no label.
        - `dtype`: the parameters' floating dtype; JAX's default float if `None`.
        - `key`: a PRNG key for the initialisation.
        """
        for name, value in [
            ("dim", dim),
            ("patch_size", patch_size),
            ("channels", channels),
            ("width", width),
            ("depth", depth),
            ("heads", heads),
            ("mlp_ratio", mlp_ratio),
        ]:
            if value < 1:
                raise ValueError(f"`{name}` must be >= 1, but got {name}={value}.")
        if dim % channels != 0:
            raise ValueError(
                f"`dim` must be channels * H * W, but dim={dim} is not divisible by "
                f"channels={channels}."
            )
        side = math.isqrt(dim // channels)
        if side * side != dim // channels:
            raise ValueError(
                f"`dim` must be channels * H * W with a square image (H = W), but "
                f"dim // channels = {dim // channels} is not a perfect square."
            )
        if side % patch_size != 0:
            raise ValueError(
                f"`patch_size` must divide the image side H={side}, but got "
                f"patch_size={patch_size}."
            )
        if width % heads != 0:
            raise ValueError(
                f"`heads` must divide `width`, but got width={width}, heads={heads}."
            )
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
        tokens = (side // patch_size) ** 2
        patch_features = channels * patch_size * patch_size
        keys = jr.split(key, 5 + depth)
        self.patch_embedding = eqx.nn.Linear(
            patch_features, width, dtype=dtype, key=keys[0]
        )
        self.position_embedding = 0.02 * jr.normal(
            keys[1], (tokens, width), dtype=self.patch_embedding.weight.dtype
        )
        self.time_embedders = (
            _TimeEmbedder(time_features, width, dtype, key=keys[2]),
            _TimeEmbedder(time_features, width, dtype, key=keys[3]),
        )
        if num_classes is None:
            self.label_embedding = None
        else:
            self.label_embedding = eqx.nn.Embedding(
                num_classes + 1, width, dtype=dtype, key=keys[4]
            )
        self.blocks = tuple(
            _Block(width, heads, mlp_ratio, dtype, key=k) for k in keys[5:]
        )
        self.final_modulation = _zero_linear(width, 2 * width, dtype)
        self.final_linear = _zero_linear(width, patch_features, dtype)
        self.dim = dim
        self.channels = channels
        self.patch_size = patch_size
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

        - `x`: the state at the source time `s`, a flat image of shape `(dim,)`.
        - `s`: the source time, a scalar.
        - `t`: the target time, a scalar.
        - `cond`: a scalar integer class label in `[0, num_classes)`, or `None` or
            [`fmcalc.NULL_LABEL`][] for no label. Must be `None` for an
            unconditional network.

        **Returns:** `V(x, s, t)`, shape `(dim,)`.
        """
        if x.shape != (self.dim,):
            raise ValueError(
                f"`x` must have shape ({self.dim},) (one flat image; batch with "
                f"`jax.vmap`), but got shape {x.shape}."
            )
        label = embed_label(self.label_embedding, cond)
        p, c = self.patch_size, self.channels
        side = math.isqrt(self.dim // c)
        n = side // p
        patches = (
            x.reshape(c, n, p, n, p).transpose(1, 3, 0, 2, 4).reshape(n * n, c * p * p)
        )
        h = _tokenwise(self.patch_embedding, patches) + self.position_embedding
        embed_s, embed_t = self.time_embedders
        conditioning = embed_s(s, x.dtype) + embed_t(t, x.dtype)
        if label is not None:
            conditioning = conditioning + label
        for block in self.blocks:
            h = block(h, conditioning)
        shift, scale = jnp.split(self.final_modulation(jax.nn.silu(conditioning)), 2)
        h = _tokenwise(self.final_linear, _modulate(_layer_norm(h), shift, scale))
        return h.reshape(n, n, c, p, p).transpose(2, 0, 3, 1, 4).reshape(self.dim)
