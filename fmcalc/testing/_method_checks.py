"""What every check of a method asks of it before it runs."""

from .._method import Method


def checkable(method: Method, check: str, step: int | None) -> int:
    """The training step to check `method` at (`step`, or the end of its
    curricula), after refusing a method the kit's flows cannot check."""
    if method.noise_scale != 1:
        # Every rule is equivariant under x -> σ x: the map of noise σ N(0, I) is
        # σ F(x / σ, s, t) for the map F of the data scaled by 1 / σ, so a spec is
        # at its fixed point at one scale exactly when it is at the other.
        raise ValueError(
            f"`{check}`: method {method.name!r} has noise_scale="
            f"{method.noise_scale}, but the kit's flows have unit noise N(0, I). "
            "Check `method.replace(noise_scale=1.0)`: the residuals are equivariant "
            "under scaling, so the spec passes at one scale exactly when it "
            "passes at the other."
        )
    if step is None:
        step = method.settled_step
        if step is None:
            raise ValueError(
                f"Method {method.name!r} has a schedule that never settles; pass "
                "the training step to check at, `step=...`."
            )
    return step
