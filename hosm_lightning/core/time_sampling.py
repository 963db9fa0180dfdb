"""Time weightings of the first-order loss and the proposals t is drawn from (docs/design.md §3.1).

Every first-order loss here is a time-weighted noise-prediction error. With ε̂ = −σ s and
dsm1 = mean_D (σ s + z)² = mean_D (ε̂ − z)², the objective is ∫ w(t) E[dsm1] dt for a weighting

    'sigma2'      w(t) = 1          λ(t) = σ² on ‖s − ∇ log q‖²  (the paper's, uniform in t)
    'likelihood'  w(t) = g²/σ²      λ(t) = g²  (ScoreFlow): the NLL bound's weighting       (3.6)

estimated with t drawn from a proposal p(t) on [eps, T] and the per-sample factor w(t)/p̃(t), where
p̃ is the proposal's unnormalised density (the constant Z = ∫ p̃ is dropped, as the anchors do):

    'uniform'     p̃ = 1
    'importance'  p̃ = g²/σ²                       factor 1: the loss is ‖σ s + z‖²            (3.7)
    'velocity'    p̃ = (g²/σ²) a² / (a² + σ²)²     factor ((a² + σ²)/a)²: the loss is ‖v − v̂‖²  (3.8)

(3.8) is i-DODE's proposal: v = a ε − σ x₀ has v − v̂ = ((a² + σ²)/a)(ε − ε̂), and for VP in log-SNR
time it is p(γ) ∝ a². The two proposals belong to the likelihood weighting; the 'sigma2' weighting
is uniform in t already. Each proposal is sampled by inverting its cumulative ∫ p̃ dt, known in
closed form for every SDE (:data:`CUMULATIVES`), by bisection in float64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .sde import SDE, VESDE, VPSDE, SubVPSDE

__all__ = ["WEIGHTINGS", "TIME_PROPOSALS", "pairing_error", "proposal_density", "cumulative", "invert_cumulative",
           "sample_t", "loss_factor", "velocity_factor"]

WEIGHTINGS = ("sigma2", "likelihood")
TIME_PROPOSALS = ("uniform", "importance", "velocity")


def pairing_error(weighting: str, proposal: str) -> str | None:
    """Why a (weighting, proposal) pair is not offered, or None when it is."""
    if weighting == "sigma2" and proposal != "uniform":
        return (f"the {proposal!r} proposal belongs to the likelihood weighting; set weighting: likelihood, "
                "or time_proposal: uniform for the sigma2 weighting")
    return None


def likelihood_weight(sde: SDE, t: Tensor) -> Tensor:
    """g(t)²/σ(t)² (per unit time): the likelihood weighting of the noise-prediction error."""
    return sde.g2(t) / sde.marginal(t)[1] ** 2


def velocity_factor(sde: SDE, t: Tensor) -> Tensor:
    """((a² + σ²)/a)²: ‖v − v̂‖² = velocity_factor · ‖ε − ε̂‖² for v = a ε − σ x₀."""
    a, sigma = sde.marginal(t)
    return ((a * a + sigma * sigma) / a) ** 2


def proposal_density(sde: SDE, proposal: str, t: Tensor) -> Tensor:
    """The unnormalised density p̃(t) of a proposal (3.7, 3.8)."""
    if proposal == "uniform":
        return torch.ones_like(t)
    if proposal == "importance":
        return likelihood_weight(sde, t)
    if proposal == "velocity":
        return likelihood_weight(sde, t) / velocity_factor(sde, t)
    raise ValueError(f"unknown time proposal {proposal!r}; choose one of {TIME_PROPOSALS}")


def loss_factor(sde: SDE, weighting: str, proposal: str, t: Tensor) -> Tensor:
    """w(t)/p̃(t) per sample: the factor of dsm1 that makes the proposal's average the weighting's."""
    if weighting == "likelihood" and proposal == "importance":
        return torch.ones_like(t)
    if weighting == "likelihood" and proposal == "velocity":
        return velocity_factor(sde, t)
    w = torch.ones_like(t) if weighting == "sigma2" else likelihood_weight(sde, t)
    return w / proposal_density(sde, proposal, t)


# -- closed-form cumulatives ∫ p̃ dt (up to a constant), B = ∫β, u = σ² ---------------------------------
def _vp_importance(sde, t):  # g²/σ² = β/(1 − e^{−B}) = d/dt log(e^B − 1)
    return torch.log(torch.expm1(sde.int_beta(t)))


def _vp_velocity(sde, t):  # β e^{−B}/(1 − e^{−B}) = d/dt log(1 − e^{−B}) = d/dt log σ²
    return torch.log(-torch.expm1(-sde.int_beta(t)))


def _subvp_importance(sde, t):  # β(1 + e^{−B})/(1 − e^{−B}) = d/dt [2 log(e^B − 1) − B]
    b = sde.int_beta(t)
    return 2 * torch.log(torch.expm1(b)) - b


def _subvp_velocity(sde, t):
    """With w = e^{−B}: p̃ dt = −(1 + w) / ((1 − w)(1 − w + w²)²) dw, whose antiderivative is
    2 log(1 − w) − log(1 − w + w²) − (2/√3) atan((2w − 1)/√3) + 1/(1 − w + w²)."""
    w = torch.exp(-sde.int_beta(t))
    q = 1 - w + w * w
    return (2 * torch.log(-torch.expm1(-sde.int_beta(t))) - torch.log(q)
            - 2 / math.sqrt(3) * torch.atan((2 * w - 1) / math.sqrt(3)) + 1 / q)


def _ve_importance(sde, t):  # g²/σ² = 2 log(σ_max/σ_min), a constant
    return 2 * math.log(sde.sigma_max / sde.sigma_min) * t


def _ve_velocity(sde, t):  # 2k/(1 + u)² dt = du/(u (1 + u)²) = d[log(u/(1 + u)) + 1/(1 + u)]
    u = sde.sigma(t) ** 2
    return torch.log(u / (1 + u)) + 1 / (1 + u)


#: (SDE class, proposal) → its cumulative ∫ p̃ dt, float64 in and out
CUMULATIVES = {
    (VPSDE, "importance"): _vp_importance, (VPSDE, "velocity"): _vp_velocity,
    (SubVPSDE, "importance"): _subvp_importance, (SubVPSDE, "velocity"): _subvp_velocity,
    (VESDE, "importance"): _ve_importance, (VESDE, "velocity"): _ve_velocity,
}


def cumulative(sde: SDE, proposal: str, t: Tensor) -> Tensor:
    """∫ p̃ dt up to a constant (float64); ValueError for an SDE without a closed form."""
    if proposal == "uniform":
        return t
    for cls in type(sde).__mro__:
        if (cls, proposal) in CUMULATIVES:
            return CUMULATIVES[(cls, proposal)](sde, t)
    raise ValueError(f"no {proposal!r} time proposal for {type(sde).__name__}; use time_proposal: uniform")


def invert_cumulative(sde: SDE, proposal: str, u: Tensor, eps: float) -> Tensor:
    """t in [eps, T] at quantiles u ∈ [0, 1] of the proposal (float64): the cumulative inverted by
    bisection (60 halvings: exact to 1e-18)."""
    if proposal == "uniform":
        return eps + u * (sde.T - eps)
    lo, hi = torch.full_like(u, eps), torch.full_like(u, sde.T)
    w_lo, w_hi = cumulative(sde, proposal, lo[:1]), cumulative(sde, proposal, hi[:1])
    target = w_lo + u * (w_hi - w_lo)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        below = cumulative(sde, proposal, mid) < target
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return 0.5 * (lo + hi)


def sample_t(sde: SDE, proposal: str, n: int, eps: float, generator: torch.Generator | None = None,
             device=None) -> Tensor:
    """n training times t [n] (float32) in [eps, T] from the proposal: one float64 uniform draw each."""
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    return invert_cumulative(sde, proposal, u, eps).float()
