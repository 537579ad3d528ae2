"""Registry methods against the loss of their authors' code (or, where the authors
published none, of the public implementation their pages name), recomputed row by
row in float64 from formulas written out from the paper and that code's behaviour,
in their conventions: the settings under which fmcalc's loss and gradient equal
them, and so what each listed difference is made of.

- TVM: lumalabs/tvm at 82e8e5d (training/loss.py `TVMLoss`, training/wrapper.py).
- iMF: Lyy-iiis/imeanflow at bf60cd7 (imf.py `iMeanFlow.forward`).
- SplitMeanFlow: tiaotiaohu-777/SplitMeanFlow at 6404d90 (src/splitmeanflow.py), not
  the authors' (they published none).
- ECT: locuslab/ect at 4311059 (training/loss.py `ECMLoss`), by a spec built here.
- sCT: NVlabs/FastGen at 34f30e8 (sCM.py), not the authors' (they published none),
  by a spec built here.
- SoFlow: zlab-princeton/SoFlow at 3b60d60 (models.py), by a spec built here.
- PID: pantheon5100/pid_diffusion at b99605b (cm/karras_diffusion.py).
- FACM: ali-vilab/FACM at 9be03f7 (losses.py `FACMLoss`).
- AYF-EMD: tec-works/FlowWithMe at 5a5cea5 (main.py), not the authors' (they
  published none)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_same_loss_and_grads

import fmcalc
from fmcalc import methods
from fmcalc.nn import MLP


sg = jax.lax.stop_gradient


def _mlp(key):
    return MLP(3, width=32, depth=2, key=jax.random.key(key))


# --------------------------------------------------------------------------- TVM


class _SourceAndGap(eqx.Module):
    """TVM's network sees the source time and the gap: `V(x, s, t) = φ(x, s, s - t)`
    (unguided, so its output scale `w` is 1)."""

    phi: MLP

    def __call__(self, x, s, t, *, cond=None):
        return self.phi(x, s, s - t)


@pytest.mark.slow
def test_tvm_with_mean_reduction_is_their_loss_on_shared_noise():
    """Their row, unguided (`cfg=1`): `F(τ) = x_s + (τ - s) φ(x_s, s, s - τ)`,
    `‖∂_τ F(t) - φ_ema(sg F(t), t, 0)‖²` plus flow matching at an independent
    time `s'` on the *same* noise and data, each averaged over dimensions. fmcalc
    draws fresh noise per term (a listed difference), so the batch here shares it."""
    method = methods.get("tvm", preset="reference")
    model, ema = _SourceAndGap(_mlp(1)), _SourceAndGap(_mlp(5))
    n = 24
    x0 = jax.random.normal(jax.random.key(2), (n, 3))
    drawn = method.batch(jax.random.key(3), x0)
    s, t, s_fm, eps = drawn.s[:n], drawn.t[:n], drawn.s[n:], drawn.eps[:n]
    assert bool(jnp.all(drawn.t[n:] == s_fm)) and bool(jnp.all(s > t))
    twice = lambda a, b: jnp.concatenate([a, b])  # noqa: E731
    batch = fmcalc.Batch(twice(x0, x0), twice(eps, eps), twice(s, s_fm), twice(t, s_fm))

    def row(model, x0, eps, s, t, s_fm):
        x = (1 - s) * x0 + s * eps
        end, d_t = jax.jvp(
            lambda tau: x + (tau - s) * model.phi(x, s, s - tau),
            (t,),
            (jnp.ones_like(t),),
        )
        terminal = jnp.mean((d_t - ema.phi(sg(end), t, jnp.zeros_like(t))) ** 2)
        x_fm = (1 - s_fm) * x0 + s_fm * eps
        velocity = model.phi(x_fm, s_fm, jnp.zeros_like(s_fm))
        return terminal + jnp.mean((velocity - (eps - x0)) ** 2)

    assert_same_loss_and_grads(
        lambda m: method.loss(m, batch, ema=ema)[0],
        lambda m: jnp.mean(jax.vmap(lambda *a: row(m, *a))(x0, eps, s, t, s_fm)),
        model,
    )


# --------------------------------------------------------------------------- iMF


class _GapOnly(eqx.Module):
    """iMF's network sees the gap `h = s - t` (and guidance tokens, absent here)."""

    phi: MLP

    def __call__(self, x, s, t, *, cond=None):
        return self.phi(x, s - t, jnp.zeros_like(s))


def _adaptive(r):
    """Their adaptive loss: the sum of squares over its stop-gradient plus 0.01."""
    return jnp.sum(r**2) / sg(jnp.sum(r**2) + 0.01)


def _imf_row(model, x0, eps, s, t):
    """Their main term, unguided (`ω = 1`), with the tangent's head read as the
    model's own diagonal: `W = V(x, s, t) + (s - t) sg[dV/ds along (V(x, s, s), 1)]`
    against `eps - x0`; and their head's flow-matching term."""
    x, v = (1 - s) * x0 + s * eps, eps - x0
    tangent = sg(model(x, s, s))
    value, d_s = jax.jvp(
        lambda z, a: model(z, a, t), (x, s), (tangent, jnp.ones_like(s))
    )
    return _adaptive(value + (s - t) * sg(d_s) - v), _adaptive(model(x, s, s) - v)


@pytest.mark.slow
def test_imf_at_its_defaults_is_their_main_term_and_with_a_head_term_their_loss():
    method = methods.get("imf")
    model = _GapOnly(_mlp(1))
    x0 = jax.random.normal(jax.random.key(2), (32, 3))
    batch = method.batch(jax.random.key(3), x0)
    assert int(jnp.sum(batch.s == batch.t)) == 16  # half the rows on the diagonal
    rows = (batch.x0, batch.eps, batch.s, batch.t)

    def theirs(model, both):
        main, head = jax.vmap(lambda *a: _imf_row(model, *a))(*rows)
        return jnp.mean(main + head) if both else jnp.mean(main)

    assert_same_loss_and_grads(
        lambda m: method.loss(m, batch)[0], lambda m: theirs(m, False), model
    )
    # Their second term trains the tangent's head by flow matching on every row:
    # with one head it is a flow-matching term on the same rows, at t = s.
    (term,) = method.terms
    head = fmcalc.Term("head", fmcalc.flow_matching(), term.times, term.loss)
    both = fmcalc.Method(
        "imf-with-head", "eulerian", "marginal-from-conditional", "V", (term, head),
        biased="the adaptive weight",
    )  # fmt: skip
    twice = lambda a, b: jnp.concatenate([a, b])  # noqa: E731
    paired = fmcalc.Batch(
        twice(batch.x0, batch.x0), twice(batch.eps, batch.eps),
        twice(batch.s, batch.s), twice(batch.t, batch.s),
    )  # fmt: skip
    assert_same_loss_and_grads(
        lambda m: both.loss(m, paired)[0], lambda m: theirs(m, True), model
    )


# ----------------------------------------------------------------- SplitMeanFlow


class _FromNoise(eqx.Module):
    """Their student `u(z, p, r)`, with time running from noise (0) to data (1) and
    `u ≈ x0 - eps`: fmcalc's `V(x, s, t) = -u(x, 1 - s, 1 - t)`."""

    phi: MLP

    def __call__(self, x, s, t, *, cond=None):
        return -self.phi(x, 1 - s, 1 - t)


@pytest.mark.slow
def test_splitmeanflow_on_every_row_with_mean_reduction_is_their_loss():
    """Their two terms on every row, each averaged over dimensions: the boundary
    `u(z, p, p) = teacher(z, p)`, and the split at their `s_th` (our `u`) with the
    target network equal to the student (their EMA, a listed difference)."""
    method = methods.get("splitmeanflow", preset="reference")
    model, teacher_net = _FromNoise(_mlp(1)), _mlp(7)

    def teacher(x, t, *, cond=None):
        return -teacher_net(x, 1 - t, 1 - t)

    n = 12
    x0 = jax.random.normal(jax.random.key(2), (n, 3))
    batch = method.batch(jax.random.key(3), x0)
    assert batch.u is not None
    s, t, u = batch.s[n:], batch.t[n:], batch.u[n:]
    assert bool(jnp.all(batch.s[:n] == batch.t[:n])) and bool(
        jnp.all((t < u) & (u < s))
    )

    def split_row(phi, x0, eps, s, t, u):
        p_t, p_r, p_s = 1 - s, 1 - t, 1 - u
        lam = (u - s) / (t - s)
        z = (1 - p_t) * eps + p_t * x0
        first = phi(z, p_t, p_s)
        second = phi(z + (p_s - p_t) * first, p_s, p_r)
        target = sg((1 - lam) * second + lam * first)
        return jnp.mean((phi(z, p_t, p_r) - target) ** 2)

    def boundary_row(phi, x0, eps, s):
        p = 1 - s
        z = (1 - p) * eps + p * x0
        return jnp.mean((phi(z, p, p) - teacher_net(z, p, p)) ** 2)

    def theirs(model):
        head = (batch.x0[:n], batch.eps[:n], batch.s[:n])
        tail = (batch.x0[n:], batch.eps[n:], s, t, u)
        boundary = jax.vmap(lambda *a: boundary_row(model.phi, *a))(*head)
        split = jax.vmap(lambda *a: split_row(model.phi, *a))(*tail)
        return (jnp.sum(boundary) + jnp.sum(split)) / n

    assert_same_loss_and_grads(
        lambda m: method.loss(m, batch, teacher=teacher)[0], theirs, model
    )


# ------------------------------------------------------------------------ AYF-EMD


@pytest.mark.slow
def test_ayf_emd_with_their_times_warmup_and_mean_is_the_flowwithme_loss():
    """No code from the authors is public; tec-works/FlowWithMe at 5a5cea5 (main.py
    `get_ayf_emd_loss`), unguided: gap-first times, the warm-up `min(0.99, k/2000)`,
    and the mean over dimensions of `‖V - sg[V - g/(‖g‖ + 0.1)]‖²`, with
    `g = V - v + r (s - t) dV/ds` along the teacher's `v`, all under stop-gradient."""
    method = methods.get("ayf-emd", preset="reference")
    model, teacher_net = _mlp(1), _mlp(7)

    def teacher(x, t, *, cond=None):
        return teacher_net(x, t, t)

    step = 700
    ratio = min(0.99, step / 2000)
    batch = method.batch(
        jax.random.key(3), jax.random.normal(jax.random.key(2), (32, 3))
    )

    def row(model, x0, eps, s, t):
        x = (1 - s) * x0 + s * eps
        v = teacher(x, s)
        value, d_s = jax.jvp(lambda z, a: model(z, a, t), (x, s), (v, jnp.ones_like(s)))
        g = sg(value - v + ratio * (s - t) * d_s)
        target = sg(value) - g / (jnp.linalg.norm(g) + 0.1)
        return jnp.mean((model(x, s, t) - target) ** 2)

    assert_same_loss_and_grads(
        lambda m: method.loss(m, batch, teacher=teacher, step=step)[0],
        lambda m: jnp.mean(
            jax.vmap(lambda *a: row(m, *a))(batch.x0, batch.eps, batch.s, batch.t)
        ),
        model,
    )


# --------------------------------------------------------------------------- FACM


class _OneTime(eqx.Module):
    """FACM's network takes one time, `τ = 1 - s` for the map to data and `2 - τ`
    for the velocity, and predicts `x0 - eps`: `V(x, s, t) = -φ(x, 1 + s)` on the
    diagonal and `-φ(x, 1 - s)` to data."""

    phi: MLP

    def net(self, x, time):
        return self.phi(x, time, jnp.zeros_like(time))

    def __call__(self, x, s, t, *, cond=None):
        return -self.net(x, jnp.where(t == s, 1 + s, 1 - s))


@pytest.mark.slow
@pytest.mark.parametrize("teacher_scale", [1.0, 5.0])  # the clamp idle, then active
def test_facm_with_mean_losses_on_shared_rows_is_their_loss(teacher_scale):
    """ali-vilab/FACM at 9be03f7 (losses.py `FACMLoss`), in their time `τ = 1 - s`:
    the anchor `mean((P - v)²) + 1 - cos(P, v)` of the velocity branch, plus
    `cos(πτ/2) e / sg(√(e + 1e-3))` with `e` the mean square of the map branch
    against `sg[N] - (1 - √τ) clip(sg[N] - v - (1 - τ) sg[dN/dτ], ±1)`, both on the
    same rows, noise, time and teacher velocity `v`."""
    method = methods.get("facm", preset="reference")
    model, teacher_net = (
        _OneTime(_mlp(1)),
        MLP(3, width=16, depth=1, key=jax.random.key(4)),
    )

    def teacher(x, s, *, cond=None):
        return teacher_scale * teacher_net(x, s, s)

    n = 24
    x0 = jax.random.normal(jax.random.key(2), (n, 3))
    drawn = method.batch(jax.random.key(3), x0)
    eps, s = drawn.eps[n:], drawn.s[n:]
    twice = lambda a, b: jnp.concatenate([a, b])  # noqa: E731
    batch = fmcalc.Batch(twice(x0, x0), twice(eps, eps), twice(s, s), twice(s, 0 * s))

    def row(model, x0, eps, s):
        tau = 1 - s
        x = tau * x0 + (1 - tau) * eps
        v = -teacher(x, s)  # their velocity points to data
        p = model.net(x, 2 - tau)
        cosine = jnp.dot(p, v) / (jnp.linalg.norm(p) * jnp.linalg.norm(v))
        flow = jnp.mean((p - v) ** 2) + 1 - cosine
        value, d_tau = jax.jvp(model.net, (x, tau), (v, jnp.ones_like(tau)))
        gap = sg(value) - (v + (1 - tau) * sg(d_tau))
        target = sg(value) - (1 - jnp.sqrt(tau)) * jnp.clip(gap, -1, 1)
        e = jnp.mean((value - target) ** 2)
        return jnp.cos(tau * jnp.pi / 2) * e / sg(jnp.sqrt(e + 1e-3)), flow

    def theirs(model):
        mapped, flow = jax.vmap(lambda *a: row(model, *a))(x0, eps, s)
        return jnp.mean(mapped) + jnp.mean(flow)

    def clamped(x0, eps, s):
        tau = 1 - s
        x = tau * x0 + (1 - tau) * eps
        v = -teacher(x, s)
        value, d_tau = jax.jvp(model.net, (x, tau), (v, jnp.ones_like(tau)))
        return jnp.any(jnp.abs(value - v - (1 - tau) * d_tau) > 1)

    assert bool(jnp.any(jax.vmap(clamped)(x0, eps, s))) == (teacher_scale > 1)
    assert_same_loss_and_grads(
        lambda m: method.loss(m, batch, teacher=teacher)[0], theirs, model
    )


# ---------------------------------------------------------------------------- ECT

_ECT_C = 0.03  # their pseudo-Huber constant for this test (their default 0 is the norm)


def _ect_fraction(decay, s):
    """ECT's step as a fraction of σ = s / (1 - s): `d (1 + 8 sigmoid(-σ))`, at
    most 1 (then the target is the data itself)."""
    sigma = s / (1 - s)
    return jnp.clip(decay * (1 + 8 * jax.nn.sigmoid(-sigma)), 0.0, 1.0)


def _ect_spec(decay: float) -> fmcalc.Method:
    """ECT's loss at one stage, built from fmcalc's primitives: the target point
    `σ_u = (1 - f) σ` is `u = (1 - f) s / (1 - f s)` in fmcalc's time, and the
    weight `1 / (σ - σ_u)` is `(1 - s) / (f s)`."""
    V = fmcalc.Network()
    F = fmcalc.FlowMap(V)
    x, s, t = fmcalc.X, fmcalc.S, fmcalc.T
    sigmoid = fmcalc.TimeFunction("sigmoid", -s / (1 - s))
    fraction = fmcalc.Clip(fmcalc.Param("decay") * (1 + 8 * sigmoid), 0.0, 1.0)
    u = (1 - fraction) * s / (1 - fraction * s)
    v = fmcalc.ConditionalVelocity()(x, s)
    residual = F(x, s, t) - fmcalc.sg(F(x + (u - s) * v, u, t))

    def weight(s, t):
        return (1 - s) / (s * _ect_fraction(decay, s))

    loss = fmcalc.TimeWeighted(fmcalc.PseudoHuber(c=_ECT_C), weight)
    times = fmcalc.FixedTarget(fmcalc.LogitNormal(-1.1, 2.0))
    term = fmcalc.Term("consistency", residual, times, loss, biased="a finite step")
    return fmcalc.Method(
        "ect-stage", "eulerian", "self-distillation", "F", (term,),
        schedules={"decay": fmcalc.schedules.Constant(decay)},
    )  # fmt: skip


@pytest.mark.slow
def test_ect_at_a_stage_is_a_spec_of_fmcalc_primitives():
    """locuslab/ect at 4311059 (training/loss.py `ECMLoss`) at stage 1 (`d = 1/4`),
    in σ: the denoiser `D(x0 + σ eps, σ)` against the stop-gradient one at
    `σ_u = max(0, σ (1 - d n(σ)))` (the data where that is 0), pseudo-Huber over
    dimensions, weighed by `1 / (σ - σ_u)`. The registry's `ect` differs (its page
    lists how); this spec is what reproduces it."""
    decay = 0.25
    method = _ect_spec(decay)
    model = _mlp(1)
    batch = method.batch(
        jax.random.key(3), jax.random.normal(jax.random.key(2), (32, 3))
    )
    at_data = int(jnp.sum(_ect_fraction(decay, batch.s) >= 1))
    assert 0 < at_data < 32  # both branches of the clamp are met

    def denoiser(model, z, sigma):
        s = sigma / (1 + sigma)
        y = z / (1 + sigma)
        return y - s * model(y, s, jnp.zeros_like(s))

    def row(model, x0, eps, s):
        sigma = s / (1 - s)
        sigma_u = sigma * (1 - _ect_fraction(decay, s))
        online = denoiser(model, x0 + sigma * eps, sigma)
        target = sg(denoiser(model, x0 + sigma_u * eps, sigma_u))
        target = jnp.where(sigma_u > 0, target, x0)
        huber = jnp.sqrt(jnp.sum((online - target) ** 2) + _ECT_C**2) - _ECT_C
        return huber / (sigma - sigma_u)

    assert_same_loss_and_grads(
        lambda m: method.loss(m, batch)[0],
        lambda m: jnp.mean(
            jax.vmap(lambda *a: row(m, *a))(batch.x0, batch.eps, batch.s)
        ),
        model,
    )
    # The registry's spec, on the same rows, is another loss (its page says how).
    registry = methods.get("ect").loss(model, batch)[0]
    assert abs(registry / method.loss(model, batch)[0] - 1) > 0.1


# ---------------------------------------------------------------------------- sCT

_SIGMA_DATA = 0.5


def _sct_spec(ratio: float) -> fmcalc.Method:
    """sCT's loss in TrigFlow (`x_τ = cos τ x0 + sin τ σ_d eps`) written in fmcalc's
    time `s = σ / (1 + σ)`, `σ = σ_d tan τ`: with `ρ = √(σ_d² (1 - s)² + s²)`, the
    residual in TrigFlow's units is `(ρ / σ_d)(V - sg[V - κ g / (‖k g‖ + c)])`,
    `κ = σ_d / ρ`, `k = (1 - s) ρ`, and the warm-up weighs the tangent's parts as
    `g = (a + r (1 - a))(V - v) - r (t - s) dV/ds`, `a = σ_d² (1 - s) / ρ²`."""
    V = fmcalc.Network()
    x, s, t = fmcalc.X, fmcalc.S, fmcalc.T
    rho = fmcalc.TimeFunction("sqrt", _SIGMA_DATA**2 * (1 - s) * (1 - s) + s * s)
    kappa = fmcalc.Constant(_SIGMA_DATA) / rho
    a = _SIGMA_DATA**2 * (1 - s) / (rho * rho)
    r = fmcalc.Param("r")
    v = fmcalc.ConditionalVelocity()(x, s)
    dV = fmcalc.D(V, at=(x, s, t), along=(v, 1, 0), by=fmcalc.JVP())
    g = (a + r * (1 - a)) * (V(x, s, t) - v) - r * (t - s) * dV
    step = kappa * fmcalc.Normalize((1 - s) * rho * g, 0.1)
    residual = (rho / _SIGMA_DATA) * (V(x, s, t) - fmcalc.sg(V(x, s, t) - step))
    loss = fmcalc.LogVariance(reduction="mean", source="model")
    times = fmcalc.FixedTarget(fmcalc.LogitNormal(-1.0, 1.4))
    term = fmcalc.Term("consistency", residual, times, loss, biased="normalisation")
    return fmcalc.Method(
        "sct-trigflow", "eulerian", "self-distillation", "V", (term,),
        schedules={"r": fmcalc.schedules.Constant(ratio)},
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("ratio", [0.3, 1.0])  # during the warm-up and after it
def test_sct_in_trigflow_is_a_spec_of_fmcalc_primitives(ratio):
    """Lu & Song's loss as NVlabs/FastGen at 34f30e8 (sCM.py, not the authors', who
    published none) computes it without its own additions: in TrigFlow, `F_θ` from
    the same network, the tangent `-cos²τ (σ_d F⁻ - dx/dτ) - r (cos τ sin τ x_τ +
    σ_d dF⁻/dτ)` normalised by `‖·‖ + 0.1`, and
    `e^{-w} mean((F_θ - F⁻ - ĝ)²) + w` with a learned log-variance `w`."""
    from fmcalc.nn import LogVarianceMLP, WithLogVariance

    method = _sct_spec(ratio)
    weight = LogVarianceMLP(width=16, key=jax.random.key(5))
    last = jax.tree.map(
        lambda z: 0.3 * jax.random.normal(jax.random.key(6), z.shape), weight.layers[-1]
    )
    model = WithLogVariance(_mlp(1), eqx.tree_at(lambda w: w.layers[-1], weight, last))
    data = _SIGMA_DATA * jax.random.normal(jax.random.key(2), (32, 3))
    batch = method.batch(jax.random.key(3), data)

    def trigflow(model, z, tau):
        sigma = _SIGMA_DATA * jnp.tan(tau)
        s = sigma / (1 + sigma)
        y = z / (jnp.cos(tau) + _SIGMA_DATA * jnp.sin(tau))
        to_data = y - s * model(y, s, jnp.zeros_like(s))
        return (jnp.cos(tau) * z - to_data) / (_SIGMA_DATA * jnp.sin(tau))

    def row(model, x0, eps, s):
        tau = jnp.arctan(s / (1 - s) / _SIGMA_DATA)
        cos, sin = jnp.cos(tau), jnp.sin(tau)
        x_tau = cos * x0 + sin * _SIGMA_DATA * eps
        dx_dtau = cos * _SIGMA_DATA * eps - sin * x0
        value, d_tau = sg(
            jax.jvp(
                lambda z, a: trigflow(model, z, a), (x_tau, tau),
                (cos * sin * dx_dtau, cos * sin),
            )
        )  # fmt: skip
        g = -(cos**2) * (_SIGMA_DATA * value - dx_dtau) - ratio * (
            cos * sin * x_tau + _SIGMA_DATA * d_tau
        )
        g = g / (jnp.linalg.norm(g) + 0.1)
        w = model.log_variance(s, jnp.zeros_like(s))
        error = jnp.mean((trigflow(model, x_tau, tau) - value - g) ** 2)
        return jnp.exp(-w) * error + w

    assert_same_loss_and_grads(
        lambda m: method.loss(m, batch)[0],
        lambda m: jnp.mean(
            jax.vmap(lambda *a: row(m, *a))(batch.x0, batch.eps, batch.s)
        ),
        model,
    )
    # The registry's sct, on the same rows, is another loss (its page says how).
    registry = methods.get("sct").loss(model, batch, step=10**6)[0]
    assert abs(registry / method.loss(model, batch)[0] - 1) > 0.1


# ---------------------------------------------------------------------------- PID

_SIGMA_MAX, _PID_STEP = 80.0, 1e-3


def _sigma(time):
    return time / (1 - time)


class _Denoised(eqx.Module):
    """PID's student: a field `N(c_in z, ¼ log σ_t)` of the scaled source `z = 80 eps`
    and the target's noise level, with `y(σ) = (σ / 80) z + (1 - σ / 80) N` in the
    variance-exploding convention; in fmcalc's, `V(x, s, t) = (x - N) / s`."""

    phi: MLP

    def field(self, z, sigma):
        scale = 1 / jnp.sqrt(_SIGMA_DATA**2 + _SIGMA_MAX**2)
        return self.phi(scale * z, 0.25 * jnp.log(sigma), jnp.zeros_like(sigma))

    def __call__(self, x, s, t, *, cond=None):
        return (x - self.field((1 + _sigma(s)) * x, _sigma(t))) / s


class _EDMTeacher(eqx.Module):
    """An EDM-preconditioned denoiser `D(x_σ, σ)`; fmcalc's teacher velocity at
    `x_t = x_σ / (1 + σ)` is `(x_t - D) / t`."""

    phi: MLP

    def denoise(self, z, sigma):
        c = 1 / jnp.sqrt(sigma**2 + _SIGMA_DATA**2)
        out = self.phi(c * z, 0.25 * jnp.log(sigma), jnp.zeros_like(sigma))
        return _SIGMA_DATA**2 * c**2 * z + sigma * _SIGMA_DATA * c * out

    def __call__(self, x, t, *, cond=None):
        return (x - self.denoise((1 + _sigma(t)) * x, _sigma(t))) / t


@pytest.mark.slow
def test_pid_from_sigma_max_with_mean_reduction_is_their_l2_loss():
    """pantheon5100/pid_diffusion at b99605b (cm/karras_diffusion.py
    `OneShotDenoiser.ode_losses`), with its `l2` distance (the mean over
    dimensions) and its second point at σ(t + h) instead of the next grid point:
    the implied denoiser `(σ_i y_j - σ_j y_i) / (σ_i - σ_j)` against the teacher's
    denoiser at the student's output `y_i`, from the source `z = 80 eps`."""
    source = _SIGMA_MAX / (1 + _SIGMA_MAX)
    method = methods.get("pid", preset="reference")
    assert method.terms[0].times == fmcalc.FixedSource(
        fmcalc.Uniform(0.002, 0.999), source=source
    )
    model, teacher = _Denoised(_mlp(1)), _EDMTeacher(_mlp(7))
    batch = method.batch(jax.random.key(3), jnp.zeros((24, 3)))  # no data: from noise
    assert bool(jnp.all(batch.s == source))

    def row(model, eps, t):
        z = _SIGMA_MAX * eps

        def y(sigma):
            ratio = sigma / _SIGMA_MAX
            return ratio * z + (1 - ratio) * model.field(z, sigma)

        a, b = _sigma(t), _sigma(t + _PID_STEP)
        y_a, y_b = y(a), y(b)
        implied = (a * y_b - b * y_a) / (a - b)
        return jnp.mean((implied - sg(teacher.denoise(y_a, a))) ** 2)

    # The difference quotient divides round-off by the step: looser than elsewhere.
    assert_same_loss_and_grads(
        lambda m: method.loss(m, batch, teacher=teacher)[0],
        lambda m: jnp.mean(jax.vmap(lambda *r: row(m, *r))(batch.eps, batch.t)),
        model,
        rtol=1e-10,
        grad_rtol=1e-8,
        grad_atol=1e-13,
    )


# ------------------------------------------------------------------------- SoFlow


def _soflow_spec() -> fmcalc.Method:
    """SoFlow's loss at a fixed step ratio `r = 0.1` (their first step), from
    fmcalc's primitives: the difference quotient `(F(x, s, t) - F(x_u, u, t)) /
    (s - u)` back towards the target through the map, both terms weighed
    adaptively with the mean over dimensions, the consistency term at half
    weight."""
    V = fmcalc.Network()
    F = fmcalc.FlowMap(V)
    x, s, t, u = fmcalc.X, fmcalc.S, fmcalc.T, fmcalc.U
    v = fmcalc.ConditionalVelocity()(x, s)
    quotient = (F(x, s, t) - F(x + (u - s) * v, u, t)) / (s - u)
    residual = V(x, s, t) - fmcalc.sg(V(x, s, t) + quotient)
    adaptive = fmcalc.Adaptive(1.0, 0.01, reduction="mean")
    pairs = fmcalc.SortedPair(
        fmcalc.LogitNormal(0.2, 0.8), fmcalc.LogitNormal(-1.0, 0.8)
    )
    anchor_times = fmcalc.Equal(fmcalc.LogitNormal(-0.2, 1.0))
    consistency_times = fmcalc.WithIntermediate(pairs, fraction=0.1)
    terms = (
        fmcalc.Term("anchor", fmcalc.flow_matching(), anchor_times, adaptive),
        fmcalc.Term("consistency", residual, consistency_times, adaptive,
                    weight=0.5, biased="a finite step"),
    )  # fmt: skip
    return fmcalc.Method(
        "soflow-code", "eulerian", "self-distillation", "V", terms,
        split=(0.75, 0.25), biased="the adaptive weight",
    )  # fmt: skip


@pytest.mark.slow
def test_soflow_gradient_is_that_of_their_surrogate():
    """zlab-princeton/SoFlow at 3b60d60 (models.py `get_velocity_loss`,
    `get_consistency_loss`): flow matching weighed adaptively, and on the
    consistency rows the surrogate `-mean(V · sg[q / (mean(q²) + 0.01)])` of the
    quotient `q`; their times (the consistency pair clamped 1e-4 apart, `u` a tenth
    of the way to `t`) are passed as the batch. Their surrogate's value is not a
    squared error, so the values compare only through the adaptive form."""
    method = _soflow_spec()
    n, fm_rows = 16, 12
    keys = jax.random.split(jax.random.key(0), 6)
    x0 = jax.random.normal(keys[0], (n, 3))
    eps = jax.random.normal(keys[1], (n, 3))
    s_fm = jax.nn.sigmoid(-0.2 + jax.random.normal(keys[2], (fm_rows,)))
    s_cm = jax.nn.sigmoid(0.2 + 0.8 * jax.random.normal(keys[3], (n - fm_rows,)))
    s_cm = jnp.maximum(s_cm, 1e-4)
    t_cm = jax.nn.sigmoid(-1.0 + 0.8 * jax.random.normal(keys[4], (n - fm_rows,)))
    t_cm = jnp.minimum(t_cm, s_cm - 1e-4)
    u_cm = jnp.minimum(s_cm + 0.1 * (t_cm - s_cm), s_cm - 1e-4)
    batch = fmcalc.Batch(
        x0, eps, jnp.concatenate([s_fm, s_cm]), jnp.concatenate([s_fm, t_cm]),
        jnp.concatenate([s_fm, u_cm]),
    )  # fmt: skip
    model = _mlp(5)

    def flow(model, x0, eps, s):
        x, v = (1 - s) * x0 + s * eps, eps - x0
        d = model(x, s, s) - v
        return jnp.mean(d**2) / sg(jnp.mean(d**2) + 0.01)

    def quotient(model, x0, eps, s, t, u):
        x, v = (1 - s) * x0 + s * eps, eps - x0
        jump = lambda y, a: y + (t - a) * model(y, a, t)  # noqa: E731
        return x, (jump(x, s) - sg(jump(x + (u - s) * v, u))) / (s - u)

    def surrogate(model, *row):
        x, q = quotient(model, *row)
        s, t = row[2], row[3]
        return -jnp.mean(model(x, s, t) * sg(q / (jnp.mean(q**2) + 0.01)))

    def adaptive(model, *row):
        _, q = quotient(model, *row)
        return 0.5 * jnp.mean(q**2) / sg(jnp.mean(q**2) + 0.01)

    head = (x0[:fm_rows], eps[:fm_rows], s_fm)
    tail = (x0[fm_rows:], eps[fm_rows:], s_cm, t_cm, u_cm)

    def theirs(model, consistency):
        anchor = jnp.sum(jax.vmap(lambda *r: flow(model, *r))(*head))
        rest = jnp.sum(jax.vmap(lambda *r: consistency(model, *r))(*tail))
        return (anchor + rest) / n

    loss, grads = eqx.filter_value_and_grad(lambda m: method.loss(m, batch)[0])(model)
    expected_grads = eqx.filter_grad(lambda m: theirs(m, surrogate))(model)
    np.testing.assert_allclose(loss, theirs(model, adaptive), rtol=1e-12)
    for a, b in zip(
        jax.tree.leaves(grads), jax.tree.leaves(expected_grads), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
    # The registry's soflow, on the same rows, is another loss (its page says how).
    registry = methods.get("soflow").loss(model, batch)[0]
    assert abs(registry / loss - 1) > 0.1
