"""The ODE model's own score, and where in t an ODE likelihood is lost (docs/design.md §8).

A score network s_θ defines the probability-flow ODE dx/dt = h(x,t) = f(x,t) − ½ g(t)² s_θ(x,t),
started from the prior π at T. Its marginals p_t^ODE have a score ∇log p_t^ODE of their own, which
equals s_θ only when s_θ is an exact score. Along a trajectory x_τ of the ODE it obeys the
*backward score ODE* (differentiate log p_t(x_t) = log π(x_T) + ∫_t^T ∇·h dτ with respect to x_t):

    d/dτ ∇log p_τ(x_τ) = −(∂h/∂x)ᵀ ∇log p_τ(x_τ) − ∇_x(∇·h)(x_τ, τ),   ∇log p_T = ∇log π(x_T)   (eq. 8.2)

We integrate x forward from (x, t) to T, then (x, s) backward from (x_T, ∇log π(x_T)) to t. This is
the continuous adjoint of the log-likelihood solve: memory does not grow with the number of solver
steps (backprop through the solve would keep ~150 evaluations' graphs, each with a second
derivative), and it differentiates the ODE itself rather than one discretisation of it.

The KL identity (docs/design.md eq. 8.1, from d/dt KL(q_t‖p_t) of two continuity equations):

    KL(q_eps ‖ p_eps^ODE) = KL(q_T ‖ π) + ½ ∫_eps^T g² E_{q_t}[(s_θ − ∇log q_t)ᵀ(∇log p_t^ODE − ∇log q_t)] dt

First-order DSM controls only E‖s_θ − ∇log q_t‖²; the second factor is what orders 2 and 3 close.
:func:`score_report` measures the four curves on a grid of t for data with an exact density
(a :class:`GaussianMixture`); :func:`kl_decomposition` estimates both sides of the identity.
All quantities are in nats (per sample, not per dimension); g² in units of x² per unit time.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchdiffeq import odeint

from .likelihood import _ADAPTIVE_RK, _divergence, ode_log_likelihood
from .losses import ScoreFn, check_score_output, rademacher, resolve_divergence
from .mixtures import GaussianMixture
from .sde import SDE, bcast

__all__ = ["ode_score", "score_report", "kl_decomposition", "sigma_grid", "time_proposal", "REPORT_KEYS"]

#: per-time curves of :func:`score_report` (each also with ``_se``)
REPORT_KEYS = ("first_order", "self_gap", "fisher", "kl_integrand")


def _times(t, x: Tensor, sde: SDE) -> Tensor:
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    t = t.expand(x.shape[0]).clone() if t.dim() == 0 else t
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must be a float or have shape [{x.shape[0]}], got {tuple(t.shape)}")
    if not bool(((t > 0) & (t <= sde.T)).all()):
        raise ValueError(f"t must lie in (0, T={sde.T}]")
    return t


def _div_and_drift(score_fn, sde, x, t, mode, v):
    """h(x,t) and ∇·h (exact trace, or vᵀ(∂h/∂x)v), both differentiable in x (create_graph)."""
    h = sde.pf_drift(x, t, check_score_output(score_fn(x, t), x))
    return h, _divergence(h, x, mode, v, create_graph=True)


def ode_score(
    score_fn: ScoreFn,
    sde: SDE,
    x: Tensor,
    t,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    divergence: str = "exact",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict]:
    """∇_x log p_t^ODE(x): the score of the probability-flow ODE model's marginal at time t.

    Args:
        score_fn: ``score_fn(x, t)`` with per-sample times [B] (the unwrapped network or an exact score).
        sde: forward SDE; its prior π closes the ODE at T.
        x: points [B, ...] at time t.
        t: a float or per-sample times [B] in (0, T]. Different times are solved in one batch by
            the change of variable t_i(u) = t_i + u (T − t_i), u ∈ [0, 1].
        rtol, atol, method: torchdiffeq options of both solves.
        divergence: 'exact' (D reverse passes, low D) or 'hutchinson' (one fixed Rademacher probe).
        generator: RNG of the Hutchinson probe.

    Returns:
        ``(score [B, ...], info)`` with ``nfe`` (forward + backward solves) and ``x_T``.
    """
    t = _times(t, x, sde)
    mode = resolve_divergence(divergence, x[0].numel())
    v = rademacher(x.shape, x, generator) if mode == "hutchinson" else None
    span = sde.T - t
    nfe = [0]

    def t_of(u: Tensor) -> Tensor:
        return t + u.to(x.dtype).clamp(0.0, 1.0) * span

    def forward(u, xs):
        nfe[0] += 1
        with torch.no_grad():
            tt = t_of(u)
            return bcast(span, xs) * sde.pf_drift(xs, tt, check_score_output(score_fn(xs, tt), xs))

    def backward(u, state):
        nfe[0] += 1
        xs, s = state
        with torch.enable_grad():
            xs = xs.detach().requires_grad_(True)
            h, div = _div_and_drift(score_fn, sde, xs, t_of(u), mode, v)
            (g,) = torch.autograd.grad((h * s.detach()).sum() + div.sum(), xs)
        return bcast(span, xs) * h.detach(), -bcast(span, xs) * g

    grid = torch.tensor([0.0, 1.0], dtype=torch.float64, device=x.device)
    opts = lambda end: {"step_t": end.reshape(1)} if method in _ADAPTIVE_RK else None  # noqa: E731
    with torch.no_grad():
        x_T = odeint(forward, x.detach(), grid, rtol=rtol, atol=atol, method=method, options=opts(grid[-1]))[-1]
    with torch.enable_grad():
        xp = x_T.detach().requires_grad_(True)
        (s_T,) = torch.autograd.grad(sde.prior_logp(xp).sum(), xp)
    back = grid.flip(0)
    with torch.no_grad():
        _, s = odeint(backward, (x_T, s_T), back, rtol=rtol, atol=atol, method=method, options=opts(back[-1]))
    return s[-1].detach(), {"nfe": nfe[0], "x_T": x_T}


def _chunks(n: int, size: int):
    for lo in range(0, n, size):
        yield slice(lo, min(lo + size, n))


def _mean_se(v: Tensor) -> tuple[float, float]:
    v = v.double()
    return float(v.mean()), float(v.std() / math.sqrt(v.numel())) if v.numel() > 1 else float("nan")


def _draw_xt(mixture: GaussianMixture, sde: SDE, t: Tensor, generator, dtype) -> Tensor:
    """x_t = a(t) x_0 + σ(t) z with x_0 ~ q_0: exact draws from q_t at per-sample times t."""
    x0 = mixture.sample(t.shape[0], generator, dtype=torch.float64)
    z = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    a, sigma = sde.marginal(t.double())
    return (a[:, None] * x0 + sigma[:, None] * z).to(dtype)


def _pointwise(score_fn, sde, mixture, x, t, chunk, **ode_kw) -> dict[str, Tensor]:
    """Per point: g² ‖s_θ − ∇log q‖², g² ‖s_θ − s_ODE‖², g² ‖s_ODE − ∇log q‖², g² (s_θ−∇q)ᵀ(s_ODE−∇q)."""
    parts = []
    for sl in _chunks(x.shape[0], chunk):
        xs, ts = x[sl], t[sl]
        with torch.no_grad():
            s_theta = score_fn(xs, ts).double()
        s_ode = ode_score(score_fn, sde, xs, ts, **ode_kw)[0].double()
        s_q = mixture.score(xs.double(), ts.double(), sde)
        g2 = sde.g2(ts.double())[:, None]
        e, f = s_theta - s_q, s_ode - s_q
        parts.append(torch.stack([
            (g2 * e * e).sum(1), (g2 * (s_theta - s_ode) ** 2).sum(1), (g2 * f * f).sum(1), (g2 * e * f).sum(1),
        ], 1))
    vals = torch.cat(parts)
    return dict(zip(REPORT_KEYS, vals.unbind(1)))


def score_report(
    score_fn: ScoreFn,
    sde: SDE,
    mixture: GaussianMixture,
    *,
    times,
    n: int = 500,
    generator: torch.Generator | None = None,
    dtype=torch.float32,
    chunk: int = 4096,
    **ode_kw,
) -> dict:
    """Per-time score diagnostics on x_t ~ q_t drawn exactly from ``mixture`` (n points per time).

    For each t in ``times``: ``first_order`` = E g²‖s_θ − ∇log q_t‖² (what first-order DSM
    minimises), ``self_gap`` = E g²‖s_θ − ∇log p_t^ODE‖² (the network against its own ODE),
    ``fisher`` = E g²‖∇log p_t^ODE − ∇log q_t‖² (Fisher divergence of the ODE model) and
    ``kl_integrand`` = E g² (s_θ − ∇log q_t)ᵀ(∇log p_t^ODE − ∇log q_t) (eq. 8.1), each with ``_se``.

    Returns a dict of lists (one entry per time) plus ``t``, ``sigma``, ``g2`` and ``n``.
    """
    times = torch.as_tensor(times, dtype=torch.float64).flatten()
    t = times.repeat_interleave(n)
    x = _draw_xt(mixture, sde, t, generator, dtype)
    vals = _pointwise(score_fn, sde, mixture, x, t.to(dtype), chunk, **ode_kw)
    out = {"t": times.tolist(), "sigma": sde.marginal(times)[1].tolist(), "g2": sde.g2(times).tolist(), "n": n}
    for key, v in vals.items():
        stats = [_mean_se(row) for row in v.reshape(len(times), n)]
        out[key] = [m for m, _ in stats]
        out[key + "_se"] = [s for _, s in stats]
    return out


def sigma_grid(sde: SDE, eps: float, num: int) -> Tensor:
    """``num`` times in [eps, T] equally spaced in log σ(t) (equally spaced in t for VE).

    σ(t) is increasing; t(log σ) is found by linear interpolation on a fine grid of t."""
    import numpy as np

    ts = np.linspace(eps, sde.T, 100_001)
    log_sigma = sde.marginal(torch.from_numpy(ts))[1].log().numpy()
    targets = np.linspace(log_sigma[0], log_sigma[-1], num)
    return torch.from_numpy(np.interp(targets, log_sigma, ts))


def kl_decomposition(
    score_fn: ScoreFn,
    sde: SDE,
    mixture: GaussianMixture,
    *,
    n: int = 2000,
    eps: float = 1e-5,
    generator: torch.Generator | None = None,
    dtype=torch.float32,
    chunk: int = 4096,
    **ode_kw,
) -> dict:
    """Both sides of eq. 8.1, as Monte-Carlo estimates with standard errors (nats).

    * ``kl_ode`` = E_{x∼q_eps}[log q_eps(x) − log p_eps^ODE(x)] (ODE likelihood, paired on the same x);
    * ``kl_prior`` = KL(q_T‖π) = E_{q_T}[log q_T − log π];
    * ``kl_scores`` = kl_prior + ½ E_{t∼p, x∼q_t}[g² (s_θ−∇q)ᵀ(∇log p^ODE − ∇q) / p(t)], with t drawn
      from :func:`time_proposal` and stratified over n strata (one point per stratum; the i.i.d.
      standard error is reported, which is conservative for stratified draws).
    ``diff`` = kl_ode − kl_scores and ``diff_se`` (independent draws: errors add in quadrature).
    """
    g = generator
    # left side: the ODE likelihood at eps
    t_eps = torch.full((n,), eps, dtype=torch.float64)
    x = _draw_xt(mixture, sde, t_eps, g, dtype)
    logp = torch.cat([ode_log_likelihood(score_fn, sde, x[sl], eps=eps, **_ll_kw(ode_kw))[0].double()
                      for sl in _chunks(n, chunk)])
    kl_ode = mixture.log_prob(x.double(), t_eps, sde) - logp
    # KL(q_T || pi)
    t_T = torch.full((n,), sde.T, dtype=torch.float64)
    xT = _draw_xt(mixture, sde, t_T, g, torch.float64)
    kl_T = mixture.log_prob(xT, t_T, sde) - sde.prior_logp(xT)
    # right side: the time integral of the KL integrand, t stratified from the proposal p(t)
    u = (torch.arange(n, dtype=torch.float64) + torch.rand(n, generator=g, dtype=torch.float64)) / n
    t, inv_p = time_proposal(sde, u, eps)
    xt = _draw_xt(mixture, sde, t, g, dtype)
    integrand = _pointwise(score_fn, sde, mixture, xt, t.to(dtype), chunk, **ode_kw)["kl_integrand"]
    (m_ode, se_ode), (m_T, se_T) = _mean_se(kl_ode), _mean_se(kl_T)
    m_int, se_int = _mean_se(0.5 * inv_p * integrand)
    kl_scores, se_scores = m_T + m_int, math.hypot(se_T, se_int)
    return {"kl_ode": m_ode, "kl_ode_se": se_ode, "kl_prior": m_T, "kl_prior_se": se_T,
            "kl_integral": m_int, "kl_integral_se": se_int, "kl_scores": kl_scores, "kl_scores_se": se_scores,
            "diff": m_ode - kl_scores, "diff_se": math.hypot(se_ode, se_scores), "n": n}


def time_proposal(sde: SDE, u: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Times t(u) in [eps, T] for u in [0, 1] and 1/p(t): p(t) ∝ g²/σ² where the SDE has that
    importance sampler (VP, subVP: it flattens integrands that scale like g²/σ²), else uniform (VE,
    where g²/σ² is constant anyway)."""
    try:
        lo, hi = sde._cum_weight(torch.tensor([eps, sde.T], dtype=torch.float64))
    except ValueError:
        return eps + u * (sde.T - eps), torch.full_like(u, sde.T - eps)
    t = sde._importance_t(u, eps)
    a, sigma = sde.marginal(t)
    return t, (hi - lo) * sigma**2 / sde.g2(t)


def _ll_kw(ode_kw: dict) -> dict:
    return {k: v for k, v in ode_kw.items() if k in ("rtol", "atol", "method", "divergence", "generator")}
