"""Forward SDEs dx = f(x,t) dt + g(t) dw on t in [0, T], T = 1 (Song et al. 2021, Lu et al. 2022 §2).

Every SDE here has a Gaussian perturbation kernel x_t = a(t) x_0 + sigma(t) z, z ~ N(0, I), a linear
drift f(x,t) = -1/2 beta(t) x (or 0), and a Gaussian prior pi at T. Time tensors have shape [B]; the
coefficients they return have shape [B] too and are broadcast against x with :func:`bcast`.

Probability-flow ODE (paper eq. 3): dx/dt = h(x,t) = f(x,t) - 1/2 g(t)^2 s(x,t).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["SDE", "VPSDE", "SubVPSDE", "VESDE", "bcast", "make_sde"]


def bcast(coef: Tensor, x: Tensor) -> Tensor:
    """View a per-sample coefficient [B] as [B, 1, ..., 1] so it broadcasts against x [B, ...]."""
    return coef.reshape(coef.shape + (1,) * (x.dim() - coef.dim()))


class SDE:
    """Common interface. Subclasses define ``marginal``, ``g2`` and ``beta`` (drift rate, 0 for VE)."""

    T: float = 1.0
    #: smallest time for training and likelihood (docs/design.md §2); see :meth:`resolve_eps`
    default_eps: float = 1e-5
    #: smallest time at which the sampler stops; see :meth:`resolve_eps`
    default_sample_eps: float = 1e-5
    #: std of the isotropic Gaussian prior pi = N(0, prior_std^2 I)
    prior_std: float = 1.0

    def resolve_eps(self, eps: float | None = None, *, sampling: bool = False) -> float:
        """The smallest time of a training step, a likelihood solve or (``sampling``) a sample.

        This is the one place where eps is chosen: ``eps`` as configured, or when None this SDE's
        ``default_eps`` (training, likelihood) or ``default_sample_eps`` (the sampler's end time).
        ValueError unless it lies in (0, T).
        """
        value = (self.default_sample_eps if sampling else self.default_eps) if eps is None else eps
        if not 0.0 < value < self.T:
            raise ValueError(f"eps must lie in (0, T={self.T}) for {type(self).__name__}, got {value!r}")
        return float(value)

    # -- schedule -------------------------------------------------------------------------------
    def marginal(self, t: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        """Return (a(t), sigma(t)) of the kernel q(x_t | x_0) = N(a x_0, sigma^2 I)."""
        raise NotImplementedError

    def g2(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Squared diffusion coefficient g(t)^2."""
        raise NotImplementedError

    def beta(self, t: Tensor) -> Tensor:
        """Drift rate: f(x,t) = -1/2 beta(t) x. Zero for VE."""
        return torch.zeros_like(t)

    # -- drift ----------------------------------------------------------------------------------
    def f(self, x: Tensor, t: Tensor) -> Tensor:
        """Drift f(x,t) = -1/2 beta(t) x (units of x per unit time)."""
        return -0.5 * bcast(self.beta(t), x) * x

    def pf_drift(self, x: Tensor, t: Tensor, score: Tensor) -> Tensor:
        """Probability-flow ODE drift h = f - 1/2 g^2 s (paper eq. 3)."""
        return self.f(x, t) - 0.5 * bcast(self.g2(t), x) * score

    # -- prior ----------------------------------------------------------------------------------
    def prior_sample(self, shape, generator: torch.Generator | None = None, device=None, dtype=None) -> Tensor:
        """Draw x_T ~ pi = N(0, prior_std^2 I)."""
        z = torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
        return self.prior_std * z

    def prior_logp(self, z: Tensor) -> Tensor:
        """log pi(z) in nats per sample, shape [B]."""
        d = z[0].numel()
        s2 = self.prior_std**2
        sq = z.flatten(1).pow(2).sum(1)
        return -0.5 * d * math.log(2 * math.pi * s2) - 0.5 * sq / s2


class _LinearBeta(SDE):
    """Shared schedule of VP and subVP: beta(t) = beta_min + t (beta_max - beta_min)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        if not (0 <= beta_min < beta_max):
            raise ValueError(f"need 0 <= beta_min < beta_max, got beta_min={beta_min}, beta_max={beta_max}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def beta(self, t: Tensor) -> Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def int_beta(self, t: Tensor) -> Tensor:
        """B(t) = ∫_0^t beta = beta_min t + 1/2 (beta_max - beta_min) t^2."""
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t

    def log_mean_coef(self, t: Tensor) -> Tensor:
        """log a(t) = -1/2 B(t)."""
        return -0.5 * self.int_beta(t)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(beta_min={self.beta_min}, beta_max={self.beta_max})"


class VPSDE(_LinearBeta):
    """Variance preserving: f = -1/2 beta x, g^2 = beta, sigma^2 = 1 - a^2, prior N(0, I)."""

    default_sample_eps = 1e-3

    def marginal(self, t: Tensor) -> tuple[Tensor, Tensor]:
        lmc = self.log_mean_coef(t)
        # sigma^2 = 1 - exp(2 lmc) computed with expm1: exact to float32 ulp at t = 1e-5.
        return torch.exp(lmc), torch.sqrt(-torch.expm1(2 * lmc))

    def g2(self, t: Tensor) -> Tensor:
        return self.beta(t)


class SubVPSDE(_LinearBeta):
    """sub-VP: f = -1/2 beta x, g^2 = beta (1 - e^{-2B}), sigma = 1 - a^2 (no square root), prior N(0, I)."""

    default_eps = 1e-2
    default_sample_eps = 1e-2

    def marginal(self, t: Tensor) -> tuple[Tensor, Tensor]:
        lmc = self.log_mean_coef(t)
        return torch.exp(lmc), -torch.expm1(2 * lmc)

    def g2(self, t: Tensor) -> Tensor:
        return self.beta(t) * -torch.expm1(-2 * self.int_beta(t))


class VESDE(SDE):
    """Variance exploding: f = 0, sigma(t) = sigma_min (sigma_max/sigma_min)^t,
    g^2 = sigma(t)^2 2 log(sigma_max/sigma_min), a = 1, prior N(0, sigma_max^2 I)."""

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        if not (0 < sigma_min < sigma_max):
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.prior_std = self.sigma_max
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def sigma(self, t: Tensor) -> Tensor:
        return self.sigma_min * torch.exp(t * self._log_ratio)

    def marginal(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return torch.ones_like(t), self.sigma(t)

    def g2(self, t: Tensor) -> Tensor:
        return self.sigma(t) ** 2 * (2 * self._log_ratio)

    def f(self, x: Tensor, t: Tensor) -> Tensor:
        return torch.zeros_like(x)

    def __repr__(self) -> str:
        return f"VESDE(sigma_min={self.sigma_min}, sigma_max={self.sigma_max})"


_SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}


def make_sde(name: str, **kwargs) -> SDE:
    """Build an SDE by short name: 'vp', 'subvp' or 've'."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in _SDES:
        raise ValueError(f"unknown SDE {name!r}; choose one of {sorted(_SDES)}")
    return _SDES[key](**kwargs)
