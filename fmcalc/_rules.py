"""The consistency rules as residual builders.

Each builder returns an expression ([`fmcalc.AbstractExpr`][]) whose square is the
loss. The derivative strategy, the stop-gradient placement, the velocity source and
the networks are arguments, so moving along one axis of the design space is one
argument. Every placement of the stop-gradient leaves the residual's *value* (hence
the loss) unchanged and changes only the gradient:

- `"none"`: backpropagate through everything (a derivative's gradient is then a
  second-order derivative);
- `"target"`: `prediction - sg[target]`, the identity rearranged so that the
  prediction is isolated;
- `"derivative"`: only the derivative term is under `sg`;
- `"tangent"` (`F` forms): `F - sg[F + g]` with `g` the `V`-form residual (the
  Lagrangian `F`-form residual, minus the Eulerian one): the value is `-g`, the
  gradient `(s - t) g ∇_θ V(x, s, t)`, the `V`-form update weighted by `s - t` (the
  "tangent" form of sCM and AYF; in the `V` forms it would coincide with
  `"target"`). The sign matters: `F - sg[F - g]` has the same loss value and the
  fixed point, but for `s > t` it pushes the map away from it;
- `"spatial"` (Eulerian, `F` form): only the advective part `∇_x F · v` is under
  `sg` (ESD).
"""

from ._derivative import JVP, AbstractDerivative
from ._expr import (
    AbstractExpr,
    AbstractVelocity,
    Clip,
    ConditionalVelocity,
    D,
    Diagonal,
    FlowMap,
    Network,
    S,
    T,
    Teacher,
    U,
    Variable,
    X,
    sg,
)
from ._validate import validate


def _check_choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"Unknown {name} {value!r}; expected one of {allowed}.")


def _tangent_form(flow_map: AbstractExpr, g: AbstractExpr) -> AbstractExpr:
    """sCM's tangent surrogate `F - sg[F + g]`, `g` the `V`-form residual: its value
    is `-g` and its semigradient `(s - t) g ∇_θ V`, the `V`-form update weighted by
    `s - t` (a descent direction for `s > t`)."""
    return flow_map - sg(flow_map + g)


def flow_matching(
    *,
    velocity: AbstractVelocity = ConditionalVelocity(),
    network: Network = Network(),
    at: str = "diagonal",
) -> AbstractExpr:
    """The diagonal (flow-matching) residual `V(x, s, s) - v(x, s)`.

    With the conditional velocity `eps - x0` this is plain flow matching (Lipman et
    al. 2023): its minimiser is the marginal velocity. It anchors the diagonal of a
    self-distilled flow map.

    **Arguments:**

    - `velocity`: the velocity source (default [`fmcalc.ConditionalVelocity`][]).
    - `network`: the network trained (default online).
    - `at`: where the network is asked: `"diagonal"` (default, `V(x, s, s)`) or
      `"target"` (`V(x, s, t)` at the batch's `t`). With a sampler that puts `t` a
      small step from `s` ([`fmcalc.GridStep`][]) this is shortcut models' labelling
      of their flow-matching rows with the finest step. The exact map's `V(x, s, t)`
      is the mean velocity over `[t, s]`, not `v(x, s)`, so the term is biased by
      `O(s - t)`: declare it with `Term(biased=...)`.
    """
    _check_choice("at", at, ("diagonal", "target"))
    return validate(network(X, S, S if at == "diagonal" else T) - velocity(X, S))


def lagrangian(
    *,
    form: str = "V",
    stop_gradient: str = "target",
    derivative: AbstractDerivative = JVP(),
    velocity: AbstractVelocity = Teacher(),
    network: Network = Network(),
    target_network: Network | None = None,
) -> AbstractExpr:
    """The Lagrangian rule `∂_t F(x, s, t) = v(F(x, s, t), t)` as a residual.

    - `form="F"`: `R = ∂_t F(x, s, t) - v(F(x, s, t), t)`.
    - `form="V"`: by the product rule `∂_t F = V + (t - s) ∂_t V`, so
      `R = V(x, s, t) - [v(F(x, s, t), t) - (t - s) ∂_t V(x, s, t)]`.

    Both have the same value; `∂_t` is the derivative along the tangent `(0, 0, 1)`.
    With `stop_gradient="target"` the `F` form is LSD's (Boffi et al. 2025) and the
    `V` form needs no backpropagation through the derivative; `"none"` with a teacher
    is LMD (Boffi et al. 2024); `"tangent"` is sCM's tangent surrogate in `F` space
    (the `ayf-lmd` spec writes it in `V` space).

    The velocity at `F(x, s, t)` must be a teacher, an analytic flow or the model's
    diagonal: the conditional velocity is only valid at `(x_s, s)`.

    **Arguments:**

    - `form`: `"F"` or `"V"`.
    - `stop_gradient`: `"none"`, `"target"`, `"derivative"`, or `"tangent"` (F form).
    - `derivative`: [`fmcalc.JVP`][] or [`fmcalc.FiniteDifference`][].
    - `velocity`: [`fmcalc.Teacher`][] (default), [`fmcalc.Diagonal`][] or
      [`fmcalc.Analytic`][].
    - `network`: the network trained; `target_network`: the network evaluated in
      the target (default the same, e.g. `Network("ema")` for an EMA target).
    """
    _check_choice("form", form, ("F", "V"))
    allowed = ("none", "target", "derivative") + (("tangent",) if form == "F" else ())
    _check_choice(f"stop_gradient for form={form!r}", stop_gradient, allowed)
    target_net = network if target_network is None else target_network
    F = FlowMap(network)
    end = FlowMap(target_net)(X, S, T)
    if stop_gradient == "target":
        end = sg(end)
    v_end = velocity(end, T)
    if form == "F":
        dF = D(F, at=(X, S, T), along=(0, 0, 1), by=derivative)
        if stop_gradient == "derivative":
            dF = sg(dF)
        elif stop_gradient == "target":
            v_end = sg(v_end)
        residual = dF - v_end
    else:
        dV = D(target_net, at=(X, S, T), along=(0, 0, 1), by=derivative)
        if stop_gradient == "derivative":
            dV = sg(dV)
        target = v_end - (T - S) * dV
        if stop_gradient == "target":
            target = sg(target)
        residual = network(X, S, T) - target
    if stop_gradient == "tangent":
        # The F-form residual ∂_t F - v(F, t) equals the V-form one.
        residual = _tangent_form(F(X, S, T), residual)
    return validate(residual)


def eulerian(
    *,
    form: str = "V",
    stop_gradient: str = "target",
    derivative: AbstractDerivative = JVP(),
    velocity: AbstractVelocity = Teacher(),
    network: Network = Network(),
    target_network: Network | None = None,
) -> AbstractExpr:
    """The Eulerian rule `∂_s F(x, s, t) + ∇_x F(x, s, t) · v(x, s) = 0` as a residual.

    - `form="F"`: `R = D[F](x, s, t)·(v(x, s), 1, 0)`, the derivative of `F` along
      the flow.
    - `form="V"`: expanding `F = x + (t - s) V` gives the MeanFlow identity
      `V = v + (t - s)(∂_s V + ∇_x V · v)`, so
      `R = V(x, s, t) - [v(x, s) + (t - s) D[V](x, s, t)·(v(x, s), 1, 0)]`
      (the negative of the `F` form; same loss).

    `form="V", stop_gradient="target"` with the conditional velocity is MeanFlow
    (Geng et al. 2025, their `(t, r)` is our `(s, t)`); with a teacher and
    `"derivative"` it is AYF-EMD (Sabour et al. 2025); `form="F"` with `"spatial"` is
    ESD and with `"none"` EMD (Boffi et al. 2024, 2025).

    **Arguments:**

    - `form`: `"F"` or `"V"`.
    - `stop_gradient`: `"none"`, `"derivative"` / `"target"` (V form), or
      `"tangent"` / `"spatial"` (F form).
    - `derivative`: [`fmcalc.JVP`][] or [`fmcalc.FiniteDifference`][].
    - `velocity`: the velocity at `(x, s)`: a teacher, the conditional velocity
      (marginal-from-conditional learning), the model's diagonal, or analytic.
    - `network`, `target_network`: as in [`fmcalc.lagrangian`][].
    """
    _check_choice("form", form, ("F", "V"))
    if form == "F" and stop_gradient == "derivative":
        raise ValueError(
            "The F form of the Eulerian residual is the derivative itself, so "
            "stop_gradient='derivative' would leave no gradient at all; use 'none' "
            "(EMD), 'spatial' (ESD) or 'tangent', or the V form."
        )
    allowed = (
        ("none", "tangent", "spatial")
        if form == "F"
        else ("none", "target", "derivative")
    )
    _check_choice(f"stop_gradient for form={form!r}", stop_gradient, allowed)
    target_net = network if target_network is None else target_network
    v = velocity(X, S)
    if form == "F":
        F = FlowMap(target_net)
        if stop_gradient == "spatial":
            temporal = D(F, at=(X, S, T), along=(0, 1, 0), by=derivative)
            spatial = D(F, at=(X, S, T), along=(v, 0, 0), by=derivative)
            residual = temporal + sg(spatial)
        else:
            dF = D(F, at=(X, S, T), along=(v, 1, 0), by=derivative)
            residual = sg(dF) if stop_gradient == "derivative" else dF
        if stop_gradient == "tangent":
            # The F-form residual is minus the V-form one: F - sg[F - R].
            flow_map = FlowMap(network)(X, S, T)
            residual = flow_map - sg(flow_map - residual)
    else:
        dV = D(target_net, at=(X, S, T), along=(v, 1, 0), by=derivative)
        if stop_gradient == "derivative":
            dV = sg(dV)
        target = v + (T - S) * dV
        if stop_gradient == "target":
            target = sg(target)
        residual = network(X, S, T) - target
    return validate(residual)


def meanflow(
    *,
    derivative: AbstractDerivative = JVP(),
    velocity: AbstractVelocity = ConditionalVelocity(),
    network: Network = Network(),
    target_network: Network | None = None,
) -> AbstractExpr:
    """MeanFlow's residual (Geng et al. 2025):
    `V(x, s, t) - sg[v(x, s) + (t - s) D[V](x, s, t)·(v(x, s), 1, 0)]`.

    The Eulerian rule in `V` form with the whole target under a stop-gradient. The
    target is affine in `v` (a JVP is linear in its tangent) and evaluated at
    `(x_s, s)`, so `v` may be the conditional velocity `eps - x0`: the expected
    update is the one with the marginal velocity. With [`fmcalc.JVP`][] the primal of
    the JVP is the prediction: 4 forward-pass equivalents per step.

    Paper symbols: MeanFlow's `u(z_t, r, t)` with `t > r` is our `V(x, s, t)` with
    `(t, r) -> (s, t)`.

    **Arguments:** as in [`fmcalc.eulerian`][].
    """
    return eulerian(
        form="V",
        stop_gradient="target",
        derivative=derivative,
        velocity=velocity,
        network=network,
        target_network=target_network,
    )


def improved_meanflow(
    *,
    derivative: AbstractDerivative = JVP(),
    velocity: AbstractVelocity = ConditionalVelocity(),
    network: Network = Network(),
) -> AbstractExpr:
    """Improved MeanFlow's compound-predictor residual (Geng et al. 2025b, iMF).

    Rearranging the MeanFlow identity for `v` and using the model's own diagonal
    `V(x, s, s)` as the tangent gives a velocity predictor

    `W(x, s, t) = V(x, s, t) - (t - s) sg[D[V](x, s, t)·(V(x, s, s), 1, 0)]`,

    trained by flow matching: `R = W(x, s, t) - v(x, s)`. (iMF writes
    `V + (s - t) sg(D_s V)` with their `(t, r)` as our `(s, t)`; the sign of the
    correction is the one derived from `F = x + (t - s) V`.) The conditional velocity
    enters only additively, so the update is unbiased; the stop-gradient only saves
    a second-order backward pass.

    **Arguments:**

    - `derivative`: [`fmcalc.JVP`][] or [`fmcalc.FiniteDifference`][].
    - `velocity`: the regression target at `(x, s)` (default conditional).
    - `network`: the network trained.
    """
    tangent = Diagonal(network)(X, S)
    dV = D(network, at=(X, S, T), along=(tangent, 1, 0), by=derivative)
    compound = network(X, S, T) - (T - S) * sg(dV)
    return validate(compound - velocity(X, S))


def compositional(
    *,
    form: str = "V",
    stop_gradient: str = "target",
    u: float | Variable = 0.5,
    network: Network = Network(),
    target_network: Network | None = None,
    clip: float | None = None,
) -> AbstractExpr:
    """The compositional (semigroup) rule `F(F(x, s, u), u, t) = F(x, s, t)`.

    - `form="F"`: `R = F(x, s, t) - F(F(x, s, u), u, t)`.
    - `form="V"`: dividing by `t - s`, with `u = s + r (t - s)`,
      `R = V(x, s, t) - [r V(x, s, u) + (1 - r) V(F(x, s, u), u, t)]` — the shortcut
      model's target for `r = 1/2` (Frans et al. 2025) and SplitMeanFlow's / PSD's
      for general `r`.

    **Arguments:**

    - `form`: `"F"` or `"V"`.
    - `stop_gradient`: `"target"` (the two-jump target under `sg`) or `"none"`.
    - `u`: the intermediate time: a fraction `r` in `(0, 1)` of the way from `s` to
      `t` (default `0.5`, the midpoint), or the leaf [`fmcalc.U`][] to take `u` from
      the batch (then the `V` form divides by `t - s`: the batch needs `t != s`).
    - `network`, `target_network`: as in [`fmcalc.lagrangian`][].
    - `clip`: clip the first jump `F(x, s, u)` and the target elementwise to
      `[-clip, clip]`, as shortcut models' code does with `clip = 4` (a guard
      against a target network far from its fixed point early in training; a
      no-op once every value lies within the bound). Default `None`: no clipping.
    """
    _check_choice("form", form, ("F", "V"))
    _check_choice("stop_gradient", stop_gradient, ("none", "target"))
    if clip is not None and not clip > 0:
        raise ValueError(f"`clip` must be a positive bound or None; got {clip!r}.")
    bounded = (lambda e: e) if clip is None else (lambda e: Clip(e, -clip, clip))
    if isinstance(u, Variable):
        if u.key != U.key:
            raise ValueError(f"`u` must be a fraction in (0, 1) or fmcalc.U; got {u}.")
        mid: AbstractExpr = U
        r: AbstractExpr | float = (U - S) / (T - S)
    else:
        if not 0 < u < 1:
            raise ValueError(
                f"`u` as a fraction of the way from s to t must lie in (0, 1); got {u}."
            )
        mid = S + u * (T - S)
        r = u
    target_net = network if target_network is None else target_network
    F_target = FlowMap(target_net)
    first = bounded(F_target(X, S, mid))
    if form == "F":
        prediction: AbstractExpr = FlowMap(network)(X, S, T)
        target = F_target(first, mid, T)
    else:
        prediction = network(X, S, T)
        target = r * target_net(X, S, mid) + (1 - r) * target_net(first, mid, T)
    target = bounded(target)
    if stop_gradient == "target":
        target = sg(target)
    return validate(prediction - target)
