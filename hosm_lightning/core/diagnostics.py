"""Where in t an ODE likelihood is lost: per-noise-level score diagnostics (docs/design.md §8).

A score network s_θ defines the probability-flow ODE dx/dt = h(x,t) = f(x,t) − ½ g(t)² s_θ(x,t),
started from the prior π at T. Its marginals p_t^ODE have a score ∇log p_t^ODE of their own
(core/ode.py ``ode_score``, eq. 8.2), which equals s_θ only when s_θ is an exact score.

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

from . import time_sampling
from .mixtures import GaussianMixture
from .ode import ODEOptions, ode_log_likelihood, ode_score
from .score import ScoreFn
from .sde import SDE
from .stats import mean_se

__all__ = ["score_report", "kl_decomposition", "sigma_grid", "time_proposal", "REPORT_KEYS"]

#: per-time curves of :func:`score_report` (each also with ``_se``)
REPORT_KEYS = ("first_order", "self_gap", "fisher", "kl_integrand")


def _chunks(n: int, size: int):
    for lo in range(0, n, size):
        yield slice(lo, min(lo + size, n))


def _draw_xt(mixture: GaussianMixture, sde: SDE, t: Tensor, generator, dtype) -> Tensor:
    """x_t = a(t) x_0 + σ(t) z with x_0 ~ q_0: exact draws from q_t at per-sample times t."""
    x0 = mixture.sample(t.shape[0], generator, dtype=torch.float64)
    z = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    a, sigma = sde.marginal(t.double())
    return (a[:, None] * x0 + sigma[:, None] * z).to(dtype)


def _pointwise(score_fn, sde, mixture, x, t, chunk, ode: ODEOptions) -> dict[str, Tensor]:
    """Per point: g² ‖s_θ − ∇log q‖², g² ‖s_θ − s_ODE‖², g² ‖s_ODE − ∇log q‖², g² (s_θ−∇q)ᵀ(s_ODE−∇q)."""
    parts = []
    for sl in _chunks(x.shape[0], chunk):
        xs, ts = x[sl], t[sl]
        with torch.no_grad():
            s_theta = score_fn(xs, ts).double()
        s_ode = ode_score(score_fn, sde, xs, ts, ode).score.double()
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
    ode: ODEOptions | None = None,
) -> dict:
    """Per-time score diagnostics on x_t ~ q_t drawn exactly from ``mixture`` (n points per time).

    For each t in ``times``: ``first_order`` = E g²‖s_θ − ∇log q_t‖² (what first-order DSM
    minimises), ``self_gap`` = E g²‖s_θ − ∇log p_t^ODE‖² (the network against its own ODE),
    ``fisher`` = E g²‖∇log p_t^ODE − ∇log q_t‖² (Fisher divergence of the ODE model) and
    ``kl_integrand`` = E g² (s_θ − ∇log q_t)ᵀ(∇log p_t^ODE − ∇log q_t) (eq. 8.1), each with ``_se``.

    ``ode`` sets the solver of the ODE-score solves. Returns a dict of lists (one entry per time)
    plus ``t``, ``sigma``, ``g2`` and ``n``.
    """
    times = torch.as_tensor(times, dtype=torch.float64).flatten()
    t = times.repeat_interleave(n)
    x = _draw_xt(mixture, sde, t, generator, dtype)
    vals = _pointwise(score_fn, sde, mixture, x, t.to(dtype), chunk, ode or ODEOptions())
    out = {"t": times.tolist(), "sigma": sde.marginal(times)[1].tolist(), "g2": sde.g2(times).tolist(), "n": n}
    for key, v in vals.items():
        stats = [mean_se(row) for row in v.reshape(len(times), n)]
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
    generator: torch.Generator | None = None,
    dtype=torch.float32,
    chunk: int = 4096,
    ode: ODEOptions | None = None,
) -> dict:
    """Both sides of eq. 8.1, as Monte-Carlo estimates with standard errors (nats).

    * ``kl_ode`` = E_{x∼q_eps}[log q_eps(x) − log p_eps^ODE(x)] (ODE likelihood, paired on the same x);
    * ``kl_prior`` = KL(q_T‖π) = E_{q_T}[log q_T − log π];
    * ``kl_scores`` = kl_prior + ½ E_{t∼p, x∼q_t}[g² (s_θ−∇q)ᵀ(∇log p^ODE − ∇q) / p(t)], with t drawn
      from :func:`time_proposal` and stratified over n strata (one point per stratum; the i.i.d.
      standard error is reported, which is conservative for stratified draws).
    ``diff`` = kl_ode − kl_scores and ``diff_se`` (independent draws: errors add in quadrature).
    ``ode`` sets eps (the start time of the likelihood and of the time integral) and every solver.
    """
    g, ode = generator, ode or ODEOptions()
    eps = sde.resolve_eps(ode.eps)
    # left side: the ODE likelihood at eps
    t_eps = torch.full((n,), eps, dtype=torch.float64)
    x = _draw_xt(mixture, sde, t_eps, g, dtype)
    logp = torch.cat([ode_log_likelihood(score_fn, sde, x[sl], ode).logp.double() for sl in _chunks(n, chunk)])
    kl_ode = mixture.log_prob(x.double(), t_eps, sde) - logp
    # KL(q_T || pi)
    t_T = torch.full((n,), sde.T, dtype=torch.float64)
    xT = _draw_xt(mixture, sde, t_T, g, torch.float64)
    kl_T = mixture.log_prob(xT, t_T, sde) - sde.prior_logp(xT)
    # right side: the time integral of the KL integrand, t stratified from the proposal p(t)
    u = (torch.arange(n, dtype=torch.float64) + torch.rand(n, generator=g, dtype=torch.float64)) / n
    t, inv_p = time_proposal(sde, u, eps)
    xt = _draw_xt(mixture, sde, t, g, dtype)
    integrand = _pointwise(score_fn, sde, mixture, xt, t.to(dtype), chunk, ode)["kl_integrand"]
    (m_ode, se_ode), (m_T, se_T) = mean_se(kl_ode), mean_se(kl_T)
    m_int, se_int = mean_se(0.5 * inv_p * integrand)
    kl_scores, se_scores = m_T + m_int, math.hypot(se_T, se_int)
    return {"kl_ode": m_ode, "kl_ode_se": se_ode, "kl_prior": m_T, "kl_prior_se": se_T,
            "kl_integral": m_int, "kl_integral_se": se_int, "kl_scores": kl_scores, "kl_scores_se": se_scores,
            "diff": m_ode - kl_scores, "diff_se": math.hypot(se_ode, se_scores), "n": n}


def time_proposal(sde: SDE, u: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Times t(u) in [eps, T] for u in [0, 1] and 1/p(t), p(t) ∝ g²/σ² (core/time_sampling.py eq. 3.7):
    it flattens integrands that scale like g²/σ² (uniform for VE, where g²/σ² is constant)."""
    t = time_sampling.invert_cumulative(sde, "importance", u, eps)
    ends = time_sampling.cumulative(sde, "importance", torch.tensor([eps, sde.T], dtype=torch.float64))
    return t, (ends[1] - ends[0]) / time_sampling.proposal_density(sde, "importance", t)
