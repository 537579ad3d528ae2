from typing import Any, TypeAlias

from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray


Vector: TypeAlias = Float[Array, " dim"]
VectorLike: TypeAlias = Float[ArrayLike, " dim"]
Time: TypeAlias = Float[Array, ""] | float
Scalar: TypeAlias = Float[Array, ""]
Cond: TypeAlias = Any
Label: TypeAlias = Int[ArrayLike, ""]

__all__ = [
    "Array",
    "Cond",
    "Label",
    "PRNGKeyArray",
    "Scalar",
    "Time",
    "Vector",
    "VectorLike",
]
