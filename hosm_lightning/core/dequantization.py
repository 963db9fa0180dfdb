"""Bits/dim of quantised data under a continuous model: uniform and truncated-normal dequantization.

Data have L grey levels k ∈ {0..L−1} (L = 256 for 8-bit images; core/data_range.py). Both protocols
are variational lower bounds on the log-probability of the levels k ∈ {0..L−1}^D
under the discrete model P(k) = ∫_bin(k) p(y) dy that the continuous density p defines:

    log P(k) ≥ E_{y ~ q(·|k)}[log p(y) − log q(y | k)],           q supported in bin(k)

and, with K independent draws y_1..y_K (importance weighting, Burda et al.),

    log P(k) ≥ E[log (1/K) Σ_j exp(log p(y_j) − log q(y_j | k))]        (tighter as K grows)

bits/dim = −bound / (D ln 2). Units: log-densities in nats, results in bits per dimension.

* ``uniform`` (the high-order DSM paper's protocol): y = (k + u)/L, u ~ U[0,1)^D, bins of
  width 1/L in [0, 1] (2/L in [−1, 1]); log q = D log L (D log(L/2)). With K = 1 this is
  bpd = −log p(y)/(D ln 2) + log₂ L (or + log₂ L − 1): + 8 (+ 7) for 8-bit data. A model uniform
  on [0, 1] has exactly log₂ L bits/dim.
* ``truncated_normal`` (training-free, i-DODE, Zheng et al. 2023): the model density p_eps at time
  eps is evaluated at x_eps = a(eps)·x̄ + σ(eps)·n, with x̄ the bin centre k/(L−1) in [0, 1]
  (2k/(L−1) − 1 in [−1, 1]: the points the model was trained on) and n ~ N(0, 1) truncated to [−τ, τ]
  per dimension, τ = a(eps)·h/σ(eps) with h the half bin width (0.5/(L−1), or 1/(L−1) in [−1, 1]), so that
  x_eps/a stays in the bin. The bound is taken in x_eps space, where the bin is a·bin(k) and

      log q(x_eps | k) = Σ_d [−n_d²/2 − ½ log 2π − log σ − log Z],   Z = Φ(τ) − Φ(−τ) = erf(τ/√2).

  It works for VP/subVP (a < 1) and VE (a = 1). No offset: log q already carries the bin width.

Noise: ``generator`` is one torch.Generator for the batch, or one per sample (the test loop's
per-sample seeds, so results do not depend on the batch composition or the world size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .data_range import bytes_to_model, check_levels
from .score import check_batch
from .sde import SDE

__all__ = [
    "PROTOCOLS", "TAGS", "resolve_protocol", "truncnorm_log_prob", "dequantization_draws", "importance_bound",
    "bits_per_dim", "DequantizedBound",
]

PROTOCOLS = ("uniform", "truncated_normal")
#: short names used in TensorBoard tags (test/bpd_uniform, test/bpd_tn)
TAGS = {"uniform": "uniform", "truncated_normal": "tn"}
_ALIASES = {"uniform": "uniform", "truncated_normal": "truncated_normal", "tn": "truncated_normal",
            "truncnorm": "truncated_normal", "truncated-normal": "truncated_normal"}


def resolve_protocol(name: str) -> str:
    """Canonical protocol name ('uniform' | 'truncated_normal'; 'tn' is an alias); ValueError otherwise."""
    key = str(name).strip().lower()
    if key not in _ALIASES:
        raise ValueError(f"dequantization must be one of {list(PROTOCOLS)} (or 'tn'), got {name!r}")
    return _ALIASES[key]


def _bytes(x: Tensor, levels: int) -> Tensor:
    """The level values k (float64) of uint8 data k ∈ {0..L−1} or of floats k/(L−1) in [0, 1]."""
    if x.dtype == torch.uint8:
        if len(x) and int(x.max()) >= levels:
            raise ValueError(f"data value {int(x.max())} is outside the {levels} grey levels 0..{levels - 1}: "
                             "set the data's levels to the number of grey levels it has")
        return x.double()
    if not x.is_floating_point():
        raise ValueError(f"x must be uint8 or float k/(L-1) in [0, 1], got dtype {x.dtype}")
    if x.min() < 0 or x.max() > 1:
        raise ValueError(f"float images must lie in [0, 1] (k/(L-1)); got range [{float(x.min()):.3g}, {float(x.max()):.3g}]"
                         " -- pass uint8 levels or k/(L-1)")
    return torch.round(x.double() * (levels - 1))


def truncnorm_log_prob(n: Tensor, tau: float, sigma: float) -> Tensor:
    """log q(x_eps | k) in nats, [B], for x_eps = a x̄ + σ n, n ~ N(0,1) truncated to [−τ, τ]^D:
    Σ_d [−n_d²/2 − ½ log 2π − log σ − log(Φ(τ) − Φ(−τ))]. −inf outside the box."""
    log_z = math.log(math.erf(tau / math.sqrt(2))) if tau < 5 else math.log1p(-math.erfc(tau / math.sqrt(2)))
    nf = n.flatten(1).double()
    per = -0.5 * nf * nf - 0.5 * math.log(2 * math.pi) - math.log(sigma) - log_z
    out = per.sum(1)
    return torch.where((nf.abs() <= tau * (1 + 1e-9)).all(1), out, torch.full_like(out, -math.inf))


def _per_sample(shape, gens, draw: Callable) -> Tensor:
    """Noise [K, B, ...]: one generator for all, or generator j for sample j (K draws each)."""
    k, b, rest = shape[0], shape[1], shape[2:]
    if gens is None or isinstance(gens, torch.Generator):
        return draw((k, b, *rest), gens)
    gens = list(gens)
    if len(gens) != b:
        raise ValueError(f"generator: need one generator per sample ({b}), got {len(gens)}")
    return torch.cat([draw((k, 1, *rest), g) for g in gens], 1)


def _check_k(num_importance) -> int:
    if int(num_importance) != num_importance or int(num_importance) < 1:
        raise ValueError(f"num_importance must be an integer K >= 1 (importance samples per datum), got {num_importance!r}")
    return int(num_importance)


def dequantization_draws(x: Tensor, *, centered: bool, dequantization: str = "uniform", num_importance: int = 1,
                         sde: SDE | None = None, eps: float | None = None, generator=None,
                         levels: int = 256) -> tuple[Tensor, Tensor]:
    """K dequantized copies of the levels in model space and their log q, without the model.

    Args:
        x: uint8 [B, ...] levels in 0..L−1 (or floats k/(L−1) in [0, 1]).
        centered: model space [−1, 1] (True) or [0, 1] (False).
        dequantization: 'uniform' or 'truncated_normal'.
        num_importance: K draws per datum.
        sde, eps: for 'truncated_normal' (the model density is p_eps of this SDE; eps None: the SDE's default).
        generator: one generator, or a list with one per sample (per-sample seeds).
        levels: L, the number of grey levels (256 for 8-bit data).

    Returns:
        ``(y [K, B, ...] float32, log_q [K, B] float64)``: points at which to evaluate the model's
        log-density (nats) and log q(y | k) in the same coordinates.
    """
    protocol, k_imp, levels = resolve_protocol(dequantization), _check_k(num_importance), check_levels(levels)
    k = _bytes(x, levels)
    b, dim, dev = x.shape[0], x[0].numel(), x.device
    if protocol == "uniform":
        u = _per_sample((k_imp, *x.shape), generator,
                        lambda s, g: torch.rand(s, generator=g, device=dev))
        y = (k.float() + u) / levels
        y = torch.minimum(y, torch.nextafter((k.float() + 1) / levels, torch.zeros_like(y)))
        y = 2 * y - 1 if centered else y
        log_q = torch.full((k_imp, b), dim * math.log(levels / 2 if centered else levels), dtype=torch.float64,
                           device=dev)
        return y, log_q
    if sde is None:
        raise ValueError("dequantization='truncated_normal' needs sde= (the model density is p_eps of that SDE at t = eps)")
    eps = sde.resolve_eps(eps)
    a, sigma = (float(c) for c in sde.marginal(torch.tensor([float(eps)], dtype=torch.float64)))
    half = (1.0 if centered else 0.5) / (levels - 1)
    tau = a * half / sigma
    centre = bytes_to_model(k, centered, torch.float64, levels)
    # inverse-CDF sampling in float64: n = Φ⁻¹(Φ(−τ) + u (Φ(τ) − Φ(−τ)))
    lo = torch.special.ndtr(torch.tensor(-tau, dtype=torch.float64))
    width = 1 - 2 * lo
    u = _per_sample((k_imp, *x.shape), generator,
                    lambda s, g: torch.rand(s, generator=g, device=dev, dtype=torch.float64))
    n = torch.special.ndtri(lo + u * width).clamp(-tau, tau)
    y = (a * centre + sigma * n).float()
    n = ((y.double() - a * centre) / sigma).clamp(-tau, tau)  # log q at the float32 point actually evaluated
    log_q = truncnorm_log_prob(n.reshape(k_imp * b, *x.shape[1:]), tau, sigma).reshape(k_imp, b)
    return y, log_q


def importance_bound(log_p: Tensor, log_q: Tensor) -> Tensor:
    """log (1/K) Σ_j exp(log p_j − log q_j), [B] float64, from [K, B] log-densities (nats).

    K = 1 is the plain bound; by Jensen it is ≥ the mean over j of (log p_j − log q_j)."""
    log_w = log_p.double() - log_q.double()
    return torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])


@dataclass(frozen=True, eq=False)
class DequantizedBound:
    """Bits/dim [B] of quantised data and the bound it comes from: ``bound`` [B] (nats, float64) on log P(k),
    ``log_w`` [K, B] = log p − log q per draw, the ``protocol`` and K = ``num_importance``."""

    bpd: Tensor
    bound: Tensor
    log_w: Tensor
    protocol: str
    num_importance: int


def bits_per_dim(log_prob_fn: Callable[[Tensor], Tensor], x: Tensor, *, centered: bool, generator=None,
                 dequantization: str = "uniform", num_importance: int = 1, sde: SDE | None = None,
                 eps: float | None = None, levels: int = 256) -> DequantizedBound:
    """Bits per dimension of data with L grey levels under a continuous model: bpd = −bound / (D ln 2).

    Args:
        log_prob_fn: maps model-space points [N, ...] to log p [N] in nats (e.g. the ODE likelihood).
            For 'truncated_normal' it must be the density at time ``eps`` of the same ``sde``.
        x: uint8 levels 0..L−1, or floats k/(L−1) in [0, 1], [B, ...].
        centered: the model sees data in [-1, 1] (True, VP/subVP) or [0, 1] (False, VE).
        generator: RNG for the dequantization noise (one, or one per sample).
        dequantization: 'uniform' (paper protocol) or 'truncated_normal' (i-DODE).
        num_importance: K; the model is evaluated on K·B points in one call (draw-major order).
        sde, eps: for 'truncated_normal'.
        levels: L, the number of grey levels (256: 8-bit data).
    """
    check_batch(x)
    y, log_q = dequantization_draws(x, centered=centered, dequantization=dequantization,
                                    num_importance=num_importance, sde=sde, eps=eps, generator=generator,
                                    levels=levels)
    k_imp, b = log_q.shape
    logp = log_prob_fn(y.reshape(k_imp * b, *x.shape[1:])).reshape(k_imp, b)
    log_w = logp.double() - log_q
    bound = importance_bound(logp, log_q)
    return DequantizedBound(bpd=-bound / (x[0].numel() * math.log(2)), bound=bound, log_w=log_w,
                            protocol=resolve_protocol(dequantization), num_importance=k_imp)
