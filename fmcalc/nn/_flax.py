from typing import Any

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, PyTree

from .._custom_types import Label, Time


class FlaxModel(eqx.Module):
    """A Flax network as an fmcalc model: what [`fmcalc.nn.from_flax`][] returns.

    Its parameters are ordinary arrays of this module, so [`fmcalc.train.fit`][],
    `jax.grad`, EMAs and checkpoints treat it like any other model. Called per
    example as `model(x, s, t, cond=None)`, it returns the Flax network's output,
    read as the average velocity `V(x, s, t)`.

    **Attributes:**

    - `params`: the trainable arrays (an `nnx.State` of the NNX module's
      `nnx.Param`s, or Linen's `variables`).
    - `rest`: an NNX module's other state (e.g. batch statistics), held fixed;
      `None` for Linen.
    - `graphdef`, `module`: the NNX graph definition or the Linen module.
    - `batched`: whether the network expects a leading batch axis.
    """

    params: PyTree
    rest: PyTree
    graphdef: Any = eqx.field(static=True)
    module: Any = eqx.field(static=True)
    batched: bool = eqx.field(static=True)

    def __call__(
        self,
        x: Float[Array, " dim"],
        s: Time,
        t: Time,
        *,
        cond: Label | None = None,
    ) -> Float[Array, " dim"]:
        """The network's output at one example, `V(x, s, t)`."""
        s = jnp.asarray(s, x.dtype)
        t = jnp.asarray(t, x.dtype)
        args = (x[None], s[None], t[None]) if self.batched else (x, s, t)
        kwargs = {}
        if cond is not None:
            kwargs["cond"] = jnp.asarray(cond)[None] if self.batched else cond
        if self.graphdef is not None:
            from flax import nnx

            out = nnx.merge(self.graphdef, self.params, self.rest)(*args, **kwargs)
        else:
            out = self.module.apply(self.params, *args, **kwargs)
        return out[0] if self.batched else out

    def to_flax(self):
        """The trained network back in Flax: the NNX module, or for Linen the pair
        `(module, variables)`."""
        if self.graphdef is not None:
            from flax import nnx

            return nnx.merge(self.graphdef, self.params, self.rest)
        return self.module, self.params


def from_flax(module, variables: PyTree = None, *, batched: bool = True) -> FlaxModel:
    """Use a Flax network (NNX or Linen) with fmcalc's losses, training loop and
    samplers, without rewriting it in equinox.

    The network is called as `network(x, s, t)` (with `cond=labels` as a keyword
    when the data is labelled) and returns the average velocity `V(x, s, t)` with
    the shape of `x`. Its calls must be pure: a module that updates its own state
    (batch statistics in training mode, dropout) runs with that state fixed.

    **Arguments:**

    - `module`: an `nnx.Module`, or a Linen `nn.Module`.
    - `variables`: for Linen, the variables from `module.init(...)`; `None` for
      NNX.
    - `batched`: `True` (default) if the network takes a leading batch axis, as
      Flax networks usually do: each example is then called with a batch of one
      (and `jax.vmap` over examples batches it again). `False` for a network that
      takes one example.

    **Returns:** a [`fmcalc.nn.FlaxModel`][]; `model.to_flax()` gives the trained
    network back.

    !!! Example

        ```python
        import jax.numpy as jnp
        from flax import nnx

        import fmcalc


        class Velocity(nnx.Module):
            def __init__(self, rngs):
                self.hidden = nnx.Linear(4, 64, rngs=rngs)
                self.out = nnx.Linear(64, 2, rngs=rngs)

            def __call__(self, x, s, t):
                h = jnp.concatenate([x, s[:, None], t[:, None]], axis=-1)
                return self.out(nnx.silu(self.hidden(h)))


        model = fmcalc.nn.from_flax(Velocity(nnx.Rngs(0)))
        print(model(jnp.zeros(2), 1.0, 0.0))  # V(x, s, t), shape (2,)
        ```
    """
    try:
        from flax import linen, nnx
    except ImportError:
        raise ImportError(
            "fmcalc.nn.from_flax needs flax; install it with "
            '`pip install "fmcalc[flax]"`.'
        ) from None
    if isinstance(module, nnx.Module):
        if variables is not None:
            raise TypeError(
                "An NNX module holds its own parameters; pass it without `variables`."
            )
        graphdef, params, rest = nnx.split(module, nnx.Param, ...)
        return FlaxModel(params, rest, graphdef, None, batched)
    if isinstance(module, linen.Module):
        if variables is None:
            raise TypeError(
                "A Linen module needs its `variables`, e.g. "
                "`from_flax(module, module.init(key, x, s, t))`."
            )
        return FlaxModel(variables, None, None, module, batched)
    raise TypeError(
        f"`module` must be a flax.nnx.Module or a flax.linen.Module; got "
        f"{type(module).__name__}."
    )
