"""Exact likelihood and sampling with the probability-flow ODE (docs/design.md §4).

Instantaneous change of variables along dx/dt = h(x,t) = f(x,t) - 1/2 g(t)² s(x,t):

    log p_eps(x) = log pi(x_T) + ∫_eps^T ∇·h(x_t, t) dt          (nats)

integrated forward from (x, 0) at t = eps with torchdiffeq on the augmented state (x, Δlogp).
The divergence is exact (D reverse passes) for small D, or Hutchinson's vᵀ(∂h/∂x)v with one
Rademacher probe per sample held fixed over the whole solve. Always call these functions with a
score_fn built on the *unwrapped* network: adaptive solvers take a different number of steps on
each rank and would hang inside a DDP wrapper.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor
from torchdiffeq import odeint

from .losses import ScoreFn, check_score_output, rademacher, resolve_divergence
from .sde import SDE
from .seeding import make_generator

# bits/dim and dequantization live in core/dequantization.py; re-exported here for existing imports
from .dequantization import bits_per_dim, dequantize, nats_to_bpd  # noqa: E402,F401

__all__ = ["ode_log_likelihood", "ode_sample", "seeded_prior", "bits_per_dim", "dequantize", "nats_to_bpd"]


def _check_batch(x: Tensor, name: str = "x") -> None:
    if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[0] == 0:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a batch tensor [B, ...] with B >= 1, got {shape}")
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf values")


def _check_solver(sde: SDE, eps: float, rtol: float, atol: float) -> None:
    if not (0.0 < eps < sde.T):
        raise ValueError(f"eps must lie in (0, T={sde.T}), got {eps!r}")
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"rtol and atol must be positive, got rtol={rtol}, atol={atol}")


#: torchdiffeq's adaptive Runge-Kutta solvers (they accept the ``step_t`` option)
_ADAPTIVE_RK = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")


def _solver_options(method: str, options: dict | None, end: Tensor) -> dict | None:
    """Keep the solver from stepping past the last time in ``times``.

    torchdiffeq's adaptive RK solvers step beyond the final output time and interpolate back, so
    the drift would be evaluated outside [eps, T] -- at t < 0 when sampling down to eps, where the
    VP/subVP sigma(t)^2 is negative (NaN score, 'underflow in dt'). A forced step boundary at the
    end time (``step_t``) keeps every evaluation inside the interval.
    """
    if method not in _ADAPTIVE_RK or (options is not None and "step_t" in options):
        return options
    return {**(options or {}), "step_t": end.reshape(1)}


def _clamp_time(t: Tensor, lo: float, hi: float) -> Tensor:
    """Keep evaluation times inside [eps, T]: torchdiffeq's initial step-size heuristic probes
    f(t0 + h0) with an h0 that can lie far outside the interval (t = 6.4 was seen with an
    untrained VE net, where sigma(t) overflows)."""
    return t.clamp(lo, hi)


def _divergence(h: Tensor, x: Tensor, mode: str, v: Tensor | None, create_graph: bool = False) -> Tensor:
    """∇·h per sample [B]: exact trace of ∂h/∂x, or vᵀ (∂h/∂x) v. ``create_graph`` keeps it
    differentiable in x (the ODE-score solve of core/diagnostics.py needs ∇ₓ(∇·h))."""
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


def ode_log_likelihood(
    score_fn: ScoreFn,
    sde: SDE,
    x: Tensor,
    *,
    eps: float = 1e-5,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    divergence: str = "auto",
    generator: torch.Generator | None = None,
    v: Tensor | None = None,
    options: dict | None = None,
) -> tuple[Tensor, dict]:
    """log p_eps(x) of the probability-flow ODE model, in nats, shape [B].

    Args:
        score_fn: ``score_fn(x, t)`` of the unwrapped network (or an exact score).
        sde: forward SDE; its prior pi closes the integral at T.
        x: points at time eps, [B, ...] (for images: dequantized and scaled data).
        eps: start time of the integration, in (0, T).
        rtol, atol: torchdiffeq tolerances (reference: RK45 with 1e-5 / 1e-5).
        method: torchdiffeq solver ('dopri5', 'rk4', 'euler', 'scipy_solver', ...).
        divergence: 'exact', 'hutchinson' or 'auto' (exact if D ≤ 4).
        generator: RNG for the Hutchinson probe.
        v: optional fixed probe (shape of x).
        options: extra torchdiffeq options (e.g. ``{'step_size': 0.01}`` for fixed-step methods).

    Returns:
        ``(logp, info)``; info has ``nfe`` (score evaluations), ``x_T`` (end state),
        ``delta_logp`` (∫ ∇·h dt, [B]), ``prior_logp`` ([B]) and ``seconds``.
    """
    _check_batch(x)
    _check_solver(sde, eps, rtol, atol)
    mode = resolve_divergence(divergence, x[0].numel())
    if mode == "hutchinson" and v is None:
        v = rademacher(x.shape, x, generator)
    b, nfe = x.shape[0], [0]

    def func(t: Tensor, state):
        nfe[0] += 1
        xs = state[0]
        tt = _clamp_time(t, eps, sde.T).to(xs.dtype).expand(b)
        with torch.enable_grad():
            xs = xs.detach().requires_grad_(True)
            s = check_score_output(score_fn(xs, tt), xs)
            h = sde.pf_drift(xs, tt, s)
            div = _divergence(h, xs, mode, v)
        return h.detach(), div.detach()

    start = time.perf_counter()
    times = torch.tensor([eps, sde.T], dtype=torch.float64, device=x.device)
    with torch.no_grad():
        state0 = (x.detach(), torch.zeros(b, dtype=x.dtype, device=x.device))
        opts = _solver_options(method, options, times[-1])
        xs, delta = odeint(func, state0, times, rtol=rtol, atol=atol, method=method, options=opts)
    x_T, delta = xs[-1], delta[-1]
    prior = sde.prior_logp(x_T)
    info = {"nfe": nfe[0], "x_T": x_T, "delta_logp": delta, "prior_logp": prior, "seconds": time.perf_counter() - start}
    return prior + delta, info


def ode_sample(
    score_fn: ScoreFn,
    sde: SDE,
    shape=None,
    *,
    x_T: Tensor | None = None,
    eps: float | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    generator: torch.Generator | None = None,
    denoise: bool = False,
    device=None,
    options: dict | None = None,
) -> tuple[Tensor, dict]:
    """Samples by integrating the probability-flow ODE from x_T ~ pi at T back to ``eps``.

    Args:
        shape: [B, ...] of the samples (or give ``x_T``).
        eps: end time (default: the SDE's ``default_sample_eps``, 1e-3 VP, 1e-5 VE).
        denoise: finish with the Tweedie step x ← (x + sigma² s(x, eps)) / a(eps).

    Returns:
        ``(x, info)`` with ``info['nfe']`` and ``info['seconds']``.
    """
    eps = sde.default_sample_eps if eps is None else eps
    _check_solver(sde, eps, rtol, atol)
    if x_T is None:
        if shape is None:
            raise ValueError("give either shape or x_T")
        x_T = sde.prior_sample(shape, generator=generator, device=device)
    _check_batch(x_T, "x_T")
    b, nfe = x_T.shape[0], [0]

    def func(t: Tensor, xs: Tensor) -> Tensor:
        nfe[0] += 1
        tt = _clamp_time(t, eps, sde.T).to(xs.dtype).expand(b)
        return sde.pf_drift(xs, tt, check_score_output(score_fn(xs, tt), xs))

    start = time.perf_counter()
    times = torch.tensor([sde.T, eps], dtype=torch.float64, device=x_T.device)
    with torch.no_grad():
        opts = _solver_options(method, options, times[-1])
        x = odeint(func, x_T, times, rtol=rtol, atol=atol, method=method, options=opts)[-1]
        if denoise:
            tt = torch.full((b,), eps, dtype=x.dtype, device=x.device)
            a, sigma = sde.marginal(tt)
            s = score_fn(x, tt)
            x = (x + (sigma**2).view(-1, *[1] * (x.dim() - 1)) * s) / a.view(-1, *[1] * (x.dim() - 1))
            nfe[0] += 1
    return x, {"nfe": nfe[0], "seconds": time.perf_counter() - start}


def seeded_prior(sde: SDE, indices, shape, *key, device=None) -> Tensor:
    """x_T ~ pi for the sample indices ``indices``, sample i drawn with a generator seeded by (*key, i):
    a sample set that does not depend on the batch size or on how indices are split across ranks."""
    return torch.cat([
        sde.prior_sample((1, *shape), generator=make_generator(*key, i, device=device), device=device) for i in indices
    ])
