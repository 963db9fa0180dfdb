"""Gaussian mixtures with closed-form marginals q_t under any of our SDEs.

A mixture q_0 = sum_k pi_k N(mu_k, diag(var_k)) diffused by x_t = a x_0 + sigma z stays a mixture:
q_t = sum_k pi_k N(a mu_k, diag(a^2 var_k + sigma^2)). With v_k = a^2 var_k + sigma^2,
u_k(x) = -(x - a mu_k) / v_k and posterior responsibilities w_k(x) = pi_k N_k(x) / q_t(x):

    score      s   = ∇ log q_t        = sum_k w_k u_k
    Jacobian   H   = ∇² log q_t       = sum_k w_k u_k u_kᵀ - s sᵀ - diag(sum_k w_k / v_k)
    third      ∇ tr H                 = sum_k w_k [(u_k - s) A_k - 2 u_k / v_k] - 2 H s,
               with A_k = |u_k|² - sum_d 1/v_kd.

These anchor every test of the losses and the likelihood (docs/design.md §4 "Exactness anchor").
Points are flat, shape [B, D]; times t have shape [B] (or are a float).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .sde import SDE

__all__ = ["GaussianMixture", "paper_mog1d"]


class GaussianMixture:
    """Diagonal-covariance Gaussian mixture in D dimensions.

    Args:
        means: [K, D] component means.
        variances: [K, D] per-dimension variances (or [K] / scalar, broadcast).
        weights: [K] mixture weights (normalised here).
    """

    def __init__(self, means, variances, weights=None):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.dim() == 1:
            means = means[:, None]
        k, d = means.shape
        variances = torch.as_tensor(variances, dtype=torch.float64)
        if variances.dim() == 1 and variances.numel() == k:
            variances = variances[:, None]
        variances = variances.expand(k, d)
        weights = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (k,) or (weights < 0).any() or not weights.sum() > 0:
            raise ValueError(f"weights must be {k} non-negative numbers, got {weights.tolist()}")
        if (variances <= 0).any():
            raise ValueError("variances must be positive")
        self.means, self.variances = means.contiguous(), variances.contiguous()
        self.weights = weights / weights.sum()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def to(self, *args, **kwargs) -> "GaussianMixture":
        """Return a copy with parameters moved/cast like ``Tensor.to``."""
        out = object.__new__(GaussianMixture)
        out.means, out.variances, out.weights = (p.to(*args, **kwargs) for p in (self.means, self.variances, self.weights))
        return out

    # -- marginal at time t ---------------------------------------------------------------------
    def _params(self, x: Tensor, t, sde: SDE | None):
        """Component means [B,K,D] and variances [B,K,D] of q_t (q_0 itself when sde is None)."""
        mu, var, w = (p.to(x) for p in (self.means, self.variances, self.weights))
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape [B, {self.dim}], got {tuple(x.shape)}")
        if sde is None:
            return mu[None], var[None], w
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        a, sigma = sde.marginal(t)
        a, sigma = a[:, None, None], sigma[:, None, None]
        return a * mu[None], a * a * var[None] + sigma * sigma, w

    def _terms(self, x: Tensor, t, sde: SDE | None):
        m, v, w = self._params(x, t, sde)
        diff = x[:, None, :] - m
        log_nk = -0.5 * (torch.log(2 * math.pi * v) + diff * diff / v).sum(-1)  # [B,K]
        log_joint = torch.log(w)[None] + log_nk
        log_q = torch.logsumexp(log_joint, dim=1)
        resp = torch.softmax(log_joint, dim=1)  # w_k(x), [B,K]
        return log_q, resp, -diff / v, v

    def log_prob(self, x: Tensor, t=None, sde: SDE | None = None) -> Tensor:
        """log q_t(x) in nats, shape [B] (log q_0 when ``sde`` is None)."""
        return self._terms(x, t, sde)[0]

    def score(self, x: Tensor, t=None, sde: SDE | None = None) -> Tensor:
        """∇_x log q_t(x), shape [B, D]."""
        _, resp, u, _ = self._terms(x, t, sde)
        return (resp[..., None] * u).sum(1)

    def score_jacobian(self, x: Tensor, t=None, sde: SDE | None = None) -> Tensor:
        """∇²_x log q_t(x) (symmetric), shape [B, D, D]."""
        _, resp, u, v = self._terms(x, t, sde)
        return self._hessian(resp, u, v)

    @staticmethod
    def _hessian(resp, u, v):
        s = (resp[..., None] * u).sum(1)
        outer = torch.einsum("bk,bki,bkj->bij", resp, u, u)
        diag = (resp[..., None] / v).sum(1)
        return outer - s[:, :, None] * s[:, None, :] - torch.diag_embed(diag)

    def grad_laplacian(self, x: Tensor, t=None, sde: SDE | None = None) -> Tensor:
        """∇_x tr ∇²_x log q_t(x) (third derivatives of log q_t), shape [B, D]."""
        _, resp, u, v = self._terms(x, t, sde)
        s = (resp[..., None] * u).sum(1)
        hess = self._hessian(resp, u, v)
        a_k = (u * u).sum(-1) - (1 / v).sum(-1)  # [B,K]
        per_k = (u - s[:, None, :]) * a_k[..., None] - 2 * u / v
        return (resp[..., None] * per_k).sum(1) - 2 * torch.einsum("bij,bj->bi", hess, s)

    def posterior_mean(self, x: Tensor, t, sde: SDE) -> Tensor:
        """E[x_0 | x_t = x], shape [B, D]: sum_k w_k (mu_k + a var_k (x - a mu_k) / v_k)."""
        _, resp, _, v = self._terms(x, t, sde)
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        a = sde.marginal(t)[0][:, None, None]
        mu, var = self.means.to(x)[None], self.variances.to(x)[None]
        return (resp[..., None] * (mu + a * var * (x[:, None, :] - a * mu) / v)).sum(1)

    def velocity(self, x: Tensor, t, sde: SDE) -> Tensor:
        """The exact velocity E[a ε − σ x_0 | x_t = x] (ε = (x − a x_0)/σ), shape [B, D], from the
        posterior mean alone (no score): a (x − a E[x_0])/σ − σ E[x_0]."""
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        a, sigma = (c[:, None] for c in sde.marginal(t))
        mean_x0 = self.posterior_mean(x, t, sde)
        return a * (x - a * mean_x0) / sigma - sigma * mean_x0

    def score_fn(self, sde: SDE):
        """Exact score as a ``score_fn(x, t)`` for losses / likelihood; x may be [B, D] or [B, ...]."""

        def fn(x: Tensor, t: Tensor) -> Tensor:
            return self.score(x.reshape(x.shape[0], -1), t, sde).reshape(x.shape)

        return fn

    # -- sampling -------------------------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator | None = None, dtype=torch.float32, device=None) -> Tensor:
        """n i.i.d. draws from q_0, shape [n, D]."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[k] + self.variances[k].sqrt() * z
        return x.to(dtype=dtype, device=device)

    def posterior_sample(self, xt: Tensor, t, sde: SDE, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw x_0 ~ q(x_0 | x_t), shape [n, B, D] (for checking conditional-moment identities).

        Given component k: x_0 | x_t ~ N(mu_k + a var_k (x_t - a mu_k) / v_k, var_k sigma^2 / v_k).
        """
        _, resp, _, v = self._terms(xt, t, sde)
        t = torch.as_tensor(t, dtype=xt.dtype, device=xt.device).expand(xt.shape[0])
        a, sigma = (c[:, None, None] for c in sde.marginal(t))
        mu, var = self.means.to(xt)[None], self.variances.to(xt)[None]
        post_mean = mu + a * var * (xt[:, None, :] - a * mu) / v  # [B,K,D]
        post_var = var * sigma**2 / v
        b = xt.shape[0]
        k = torch.multinomial(resp.double().cpu(), n, replacement=True, generator=generator).T  # [n,B]
        idx = torch.arange(b)[None].expand(n, b)
        z = torch.randn(n, b, self.dim, generator=generator, dtype=torch.float64).to(xt)
        return post_mean[idx, k.to(xt.device)] + post_var[idx, k.to(xt.device)].sqrt() * z

    def entropy(self, n_grid: int = 200_001) -> float:
        """Differential entropy -E log q_0 in nats (1-D: trapezoid quadrature in float64)."""
        if self.dim != 1:
            raise ValueError("closed-form entropy is implemented for 1-D mixtures only")
        sd = self.variances.sqrt().squeeze(1)
        lo = float((self.means.squeeze(1) - 12 * sd).min())
        hi = float((self.means.squeeze(1) + 12 * sd).max())
        x = torch.linspace(lo, hi, n_grid, dtype=torch.float64)[:, None]
        logq = self.log_prob(x)
        return float(-torch.trapezoid(logq.exp() * logq, x.squeeze(1)))


def paper_mog1d() -> GaussianMixture:
    """The paper's 1-D mixture (Fig. 1): means [-2,-6,4]/7, variances [0.1,0.1,1]/49, weights [.3,.3,.4]."""
    return GaussianMixture(
        means=torch.tensor([-2.0, -6.0, 4.0], dtype=torch.float64) / 7,
        variances=torch.tensor([0.1, 0.1, 1.0], dtype=torch.float64) / 49,
        weights=[0.3, 0.3, 0.4],
    )
