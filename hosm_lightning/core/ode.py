"""The probability-flow ODE: solver settings, likelihood, sampler and the ODE model's own score.

dx/dt = h(x, t) = f(x, t) − ½ g(t)² s(x, t) (eq. 2.1), solved with torchdiffeq. Three uses:

* :func:`ode_log_likelihood`: log p_eps(x) = log π(x_T) + ∫_eps^T ∇·h dt (eq. 4.1, nats), forward from
  (x, 0) at t = eps on the augmented state (x, Δlogp); ∇·h exact (D reverse passes) or Hutchinson's
  vᵀ(∂h/∂x)v with one Rademacher probe per sample held over the solve (docs/design.md §4).
* :func:`ode_sample`: x_T ~ π integrated back from T to the sampler's end time.
* :func:`ode_score`: ∇ₓ log p_t^ODE(x) by the backward score ODE (eq. 8.2, docs/design.md §8).

Every solve takes its settings from one :class:`ODEOptions` (eps, rtol, atol, method, divergence,
step size) and returns a small result object. Call these with a score function built on the
*unwrapped* network: adaptive solvers take a different number of steps on each rank and would hang
inside a DDP wrapper.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
from torch import Tensor
from torchdiffeq import odeint

from .score import DIVERGENCES, ScoreFn, check_batch, check_score_output, rademacher, resolve_divergence
from .sde import SDE, bcast
from .seeding import make_generator
from .settings import SettingsError, choice, number, time_or_none

__all__ = ["ODEOptions", "Likelihood", "Samples", "ODEScore", "ode_log_likelihood", "ode_sample", "ode_score",
           "divergence", "seeded_prior", "ADAPTIVE_METHODS", "FIXED_STEP_METHODS", "METHODS"]

#: torchdiffeq's adaptive Runge-Kutta solvers (they take a forced step boundary ``step_t``)
_RK_ADAPTIVE = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
#: every adaptive solver (error control by rtol/atol)
ADAPTIVE_METHODS = _RK_ADAPTIVE + ("scipy_solver",)
#: torchdiffeq's fixed-grid solvers (they need a step_size: otherwise one step over [eps, T])
FIXED_STEP_METHODS = ("euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams", "fixed_adams")
METHODS = ADAPTIVE_METHODS + FIXED_STEP_METHODS


@dataclass(frozen=True)
class ODEOptions:
    """Solver settings of the probability-flow ODE, for the likelihood, sampling and the ODE score.

    Args:
        eps: likelihood: the time at which the solve starts (log p_eps is evaluated), in (0, 1);
            None uses the SDE's default (``SDE.resolve_eps``: 1e-5 VP and VE, 1e-2 subVP).
        sample_eps: sampling: the time at which the solve from T stops, in (0, 1); None uses the
            SDE's default (1e-3 VP, 1e-5 VE, 1e-2 subVP).
        rtol: relative tolerance of adaptive solvers, > 0 (reference: 1e-5).
        atol: absolute tolerance of adaptive solvers, > 0 (reference: 1e-5).
        method: torchdiffeq solver: adaptive 'dopri5' (reference RK45), 'dopri8', 'bosh3',
            'fehlberg2', 'adaptive_heun', 'scipy_solver', or fixed-step 'euler', 'midpoint',
            'heun2', 'heun3', 'rk4', 'explicit_adams', 'implicit_adams', 'fixed_adams'.
        divergence: ∇·h by the 'exact' trace (D reverse passes), 'hutchinson' (one Rademacher
            probe per sample, held over the solve) or 'auto' (exact if D <= 4).
        step_size: time step of the fixed-step methods, > 0 (required by them; adaptive methods ignore it).
    """

    eps: float | None = None
    sample_eps: float | None = None
    rtol: float = 1e-5
    atol: float = 1e-5
    method: str = "dopri5"
    divergence: str = "auto"
    step_size: float | None = None

    def __post_init__(self) -> None:
        name, set_ = type(self).__name__, lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen)
        set_("eps", time_or_none(name, "eps", self.eps, "default_eps"))
        set_("sample_eps", time_or_none(name, "sample_eps", self.sample_eps, "default_sample_eps"))
        set_("rtol", number(name, "rtol", self.rtol, positive=True))
        set_("atol", number(name, "atol", self.atol, positive=True))
        choice(name, "method", self.method, METHODS)
        choice(name, "divergence", self.divergence, DIVERGENCES)
        if self.step_size is not None:
            set_("step_size", number(name, "step_size", self.step_size, positive=True))
        elif self.method in FIXED_STEP_METHODS:
            raise SettingsError(name, "step_size", f"must be set (> 0, e.g. 0.01) for the fixed-step method {self.method!r}")

    def replace(self, **changes) -> ODEOptions:
        """A copy with ``changes`` applied (validated again); None values are ignored, so optional
        overrides pass through as they come."""
        names = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(changes) - set(names))
        if unknown:
            raise ValueError(f"unknown ODE option(s) {unknown}; valid: {names}")
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def as_dict(self) -> dict:
        """The fields as a plain dict (safe for ``weights_only=True`` checkpoints' hyperparameters)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True, eq=False)
class Likelihood:
    """log p_eps(x) [B] in nats = ``prior_logp`` + ``delta_logp``; score evaluations ``nfe``, end state ``x_T``."""

    logp: Tensor
    nfe: int
    x_T: Tensor
    delta_logp: Tensor
    prior_logp: Tensor
    seconds: float


@dataclass(frozen=True, eq=False)
class Samples:
    """ODE samples ``x`` and the number of score evaluations ``nfe``."""

    x: Tensor
    nfe: int
    seconds: float


@dataclass(frozen=True, eq=False)
class ODEScore:
    """∇ₓ log p_t^ODE(x) (``score``, shape of x), ``nfe`` of both solves and the forward end state ``x_T``."""

    score: Tensor
    nfe: int
    x_T: Tensor


def _solve(func, y0, t0: float, t1, ode: ODEOptions, device):
    """torchdiffeq from t0 to t1 with ``ode``'s settings; returns the state at t1.

    Adaptive RK solvers step beyond the final time and interpolate back, so the drift would be
    evaluated outside the interval — at t < 0 when sampling down to eps, where the VP σ(t)² is
    negative. A forced step boundary at the end time (``step_t``) keeps every evaluation inside.
    """
    times = torch.tensor([float(t0), float(t1)], dtype=torch.float64, device=device)
    options = {"step_size": ode.step_size} if ode.method in FIXED_STEP_METHODS else None
    if ode.method in _RK_ADAPTIVE:
        options = {"step_t": times[-1].reshape(1)}
    out = odeint(func, y0, times, rtol=ode.rtol, atol=ode.atol, method=ode.method, options=options)
    return tuple(o[-1] for o in out) if isinstance(out, tuple) else out[-1]


def _clamp_time(t: Tensor, lo: float, hi: float) -> Tensor:
    """Times inside [eps, T]: torchdiffeq's initial step-size heuristic probes f(t0 + h0) with an h0
    that can lie far outside the interval (t = 6.4 was seen with an untrained VE net)."""
    return t.clamp(lo, hi)


def divergence(h: Tensor, x: Tensor, mode: str, v: Tensor | None, create_graph: bool = False) -> Tensor:
    """∇·h per sample [B]: the exact trace of ∂h/∂x ('exact'), or vᵀ (∂h/∂x) v ('hutchinson').
    ``create_graph`` keeps it differentiable in x (the ODE score needs ∇ₓ(∇·h))."""
    if not h.requires_grad:  # h does not depend on x (e.g. a constant score under VE): ∇·h = 0
        return torch.zeros(h.shape[0], dtype=h.dtype, device=h.device)
    if mode == "hutchinson":
        (g,) = torch.autograd.grad((h * v).sum(), x, create_graph=create_graph)
        return (g * v).flatten(1).sum(1)
    hf = h.flatten(1)
    div = torch.zeros(h.shape[0], dtype=h.dtype, device=h.device)
    for i in range(hf.shape[1]):
        (g,) = torch.autograd.grad(hf[:, i].sum(), x, retain_graph=create_graph or i + 1 < hf.shape[1],
                                   create_graph=create_graph)
        div = div + g.flatten(1)[:, i]
    return div


def _probe(x: Tensor, ode: ODEOptions, generator, v: Tensor | None) -> tuple[str, Tensor | None]:
    mode = resolve_divergence(ode.divergence, x[0].numel())
    return mode, (rademacher(x.shape, x, generator) if mode == "hutchinson" and v is None else v)


def ode_log_likelihood(score_fn: ScoreFn, sde: SDE, x: Tensor, ode: ODEOptions | None = None, *,
                       generator=None, v: Tensor | None = None) -> Likelihood:
    """log p_eps(x) of the probability-flow ODE model (eq. 4.1), in nats, for points x [B, ...] at
    t = eps (``ode.eps``). ``generator`` (one, or one per sample) draws the Hutchinson probe unless
    ``v`` is given."""
    ode = ode or ODEOptions()
    check_batch(x)
    eps = sde.resolve_eps(ode.eps)
    mode, v = _probe(x, ode, generator, v)
    b, nfe = x.shape[0], [0]

    def func(t: Tensor, state):
        nfe[0] += 1
        xs = state[0]
        tt = _clamp_time(t, eps, sde.T).to(xs.dtype).expand(b)
        with torch.enable_grad():
            xs = xs.detach().requires_grad_(True)
            h = sde.pf_drift(xs, tt, check_score_output(score_fn(xs, tt), xs))
            div = divergence(h, xs, mode, v)
        return h.detach(), div.detach()

    start = time.perf_counter()
    with torch.no_grad():
        x_T, delta = _solve(func, (x.detach(), torch.zeros(b, dtype=x.dtype, device=x.device)), eps, sde.T, ode,
                            x.device)
    prior = sde.prior_logp(x_T)
    return Likelihood(logp=prior + delta, nfe=nfe[0], x_T=x_T, delta_logp=delta, prior_logp=prior,
                      seconds=time.perf_counter() - start)


def ode_sample(score_fn: ScoreFn, sde: SDE, x_T: Tensor, ode: ODEOptions | None = None, *,
               denoise: bool = False) -> Samples:
    """Samples: prior draws x_T [B, ...] integrated from T back to ``ode.sample_eps``; with ``denoise``
    a final Tweedie step x ← (x + σ² s(x, eps)) / a."""
    ode = ode or ODEOptions()
    check_batch(x_T, "x_T")
    eps = sde.resolve_eps(ode.sample_eps, sampling=True)
    b, nfe = x_T.shape[0], [0]

    def func(t: Tensor, xs: Tensor) -> Tensor:
        nfe[0] += 1
        tt = _clamp_time(t, eps, sde.T).to(xs.dtype).expand(b)
        return sde.pf_drift(xs, tt, check_score_output(score_fn(xs, tt), xs))

    start = time.perf_counter()
    with torch.no_grad():
        x = _solve(func, x_T, sde.T, eps, ode, x_T.device)
        if denoise:
            tt = torch.full((b,), eps, dtype=x.dtype, device=x.device)
            a, sigma = sde.marginal(tt)
            x = (x + bcast(sigma**2, x) * score_fn(x, tt)) / bcast(a, x)
            nfe[0] += 1
    return Samples(x=x, nfe=nfe[0], seconds=time.perf_counter() - start)


def seeded_prior(sde: SDE, indices, shape, *key, device=None) -> Tensor:
    """x_T ~ π for the sample indices ``indices``, sample i drawn with a generator seeded by (*key, i):
    a sample set that does not depend on the batch size or on how indices are split across ranks."""
    return torch.cat([
        sde.prior_sample((1, *shape), generator=make_generator(*key, i, device=device), device=device) for i in indices
    ])


def ode_score(score_fn: ScoreFn, sde: SDE, x: Tensor, t, ode: ODEOptions | None = None, *, generator=None) -> ODEScore:
    """∇ₓ log p_t^ODE(x): the score of the ODE model's marginal at time t (eq. 8.2).

    x [B, ...] at times t (a float or [B] in (0, T]); ``score_fn`` takes per-sample times. Integrates x
    forward from (x, t) to T, then (x, a) backward from (x_T, ∇log π(x_T)) with
    da/dτ = −(∂h/∂x)ᵀ a − ∇ₓ(∇·h): the continuous adjoint of the likelihood solve, whose memory does
    not grow with the solver steps. Different times share one solve by t_i(u) = t_i + u (T − t_i).
    """
    ode = ode or ODEOptions()
    t = _times(t, x, sde)
    mode, v = _probe(x, ode, generator, None)
    span, nfe = sde.T - t, [0]

    def t_of(u: Tensor) -> Tensor:
        return t + u.to(x.dtype).clamp(0.0, 1.0) * span

    def forward(u, xs):
        nfe[0] += 1
        tt = t_of(u)
        return bcast(span, xs) * sde.pf_drift(xs, tt, check_score_output(score_fn(xs, tt), xs))

    def backward(u, state):
        nfe[0] += 1
        xs, a = state
        with torch.enable_grad():
            xs = xs.detach().requires_grad_(True)
            tt = t_of(u)
            h = sde.pf_drift(xs, tt, check_score_output(score_fn(xs, tt), xs))
            (g,) = torch.autograd.grad((h * a.detach()).sum() + divergence(h, xs, mode, v, create_graph=True).sum(), xs)
        return bcast(span, xs) * h.detach(), -bcast(span, xs) * g

    with torch.no_grad():
        x_T = _solve(forward, x.detach(), 0.0, 1.0, ode, x.device)
    with torch.enable_grad():
        xp = x_T.detach().requires_grad_(True)
        (a_T,) = torch.autograd.grad(sde.prior_logp(xp).sum(), xp)
    with torch.no_grad():
        _, a = _solve(backward, (x_T, a_T), 1.0, 0.0, ode, x.device)
    return ODEScore(score=a.detach(), nfe=nfe[0], x_T=x_T)


def _times(t, x: Tensor, sde: SDE) -> Tensor:
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    t = t.expand(x.shape[0]).clone() if t.dim() == 0 else t
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must be a float or have shape [{x.shape[0]}], got {tuple(t.shape)}")
    if not bool(((t > 0) & (t <= sde.T)).all()):
        raise ValueError(f"t must lie in (0, T={sde.T}]")
    return t
