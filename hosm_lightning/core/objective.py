"""The training objective, one object: settings validated once, ``__call__`` gives the per-sample loss.

    loss = dsm1 + λ₂ dsm2 + λ₃ w(σ) dsm3                                    (3.5)

per sample, over the orders trained (order 1: dsm1 only; order 2: + dsm2; order 3: + dsm3), with the
terms of core/dsm.py and w(σ) = 1 (the paper) or min(1, (σ_c/σ)²) with ``dsm3_sigma_cap`` σ_c.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from .dsm import PROBE_PRODUCTS, c_vector, dsm1, dsm3, perturb, score_derivatives
from .score import DIVERGENCES, ScoreFn, check_score_output, resolve_divergence, working_dtype
from .sde import SDE
from .settings import SettingsError, choice, flag, number, time_or_none

__all__ = ["HOSMObjective", "DSMTerms", "DSM2_FORMS"]

#: which parts of (3.2) make dsm2: both (the reference image code), the Frobenius or the trace part
DSM2_FORMS = ("both", "frobenius", "trace")


@dataclass(frozen=True, eq=False)
class DSMTerms:
    """The per-sample terms [B] of one batch (``dsm2`` / ``dsm3`` None below their order) and what
    produced them: t and σ [B]; for order >= 2 the detached Frobenius and trace parts of dsm2; for
    order 3 the detached residual r [B, D] of (3.3) (E[r | x_t] = 0 at the true score)."""

    dsm1: Tensor
    t: Tensor
    sigma: Tensor
    dsm2: Tensor | None = None
    dsm3: Tensor | None = None
    dsm2_fro: Tensor | None = None
    dsm2_tr: Tensor | None = None
    r: Tensor | None = None

    def terms(self) -> dict[str, Tensor]:
        """``{'dsm1': [B], 'dsm2': [B], 'dsm3': [B]}`` up to the order."""
        return {k: v for k, v in (("dsm1", self.dsm1), ("dsm2", self.dsm2), ("dsm3", self.dsm3)) if v is not None}


@dataclass(frozen=True)
class HOSMObjective:
    """High-order DSM objective (docs/design.md §3): which terms are weighted how, and how they are estimated.

    Args:
        lambda2: weight of the second-order term dsm2, >= 0 (reference image code 1; toy code 0.5).
        lambda3: weight of the third-order term dsm3, >= 0 (reference image code 1; toy code 0.1).
        eps: smallest training time, in (0, 1); None uses the SDE's default (``SDE.resolve_eps``:
            1e-5 for VP and VE, 1e-2 for subVP).
        divergence: how J = ∂s/∂x enters dsm2/dsm3: 'exact' (full Jacobian, D small),
            'hutchinson' (one Rademacher probe per sample, for images) or 'auto' (exact if D <= 4).
        dsm2_form: 'both' (Frobenius + trace parts of eq. 3.2, as the reference image code),
            'frobenius' or 'trace'.
        probe_product: Hutchinson only: 'jvp' (J v by forward mode, as the reference code) or 'vjp'
            (Jᵀ v by one reverse pass: cheaper on CPU; dsm2 has the same expectation, and the
            stop-gradient part of r becomes (σ²Jᵀ + I)c, equal to (σ²J + I)c for a symmetric J, e.g.
            at the true score: the same optimum).
        importance_sampling: draw t from p(t) ∝ g²/σ² instead of U(eps, 1) (VP and subVP only).
        dsm3_sigma_cap: None (the paper's objective) or σ_c > 0: dsm3 of a sample at noise level σ is
            weighted by w(σ) = min(1, (σ_c/σ)²). A positive weight that depends on t only leaves the
            minimiser at every t unchanged (E[r | x_t] = 0), but it tames the gradient of σ³∇ tr J,
            which grows like σ⁴ at large σ (docs/design.md §9).
    """

    lambda2: float = 1.0
    lambda3: float = 1.0
    eps: float | None = None
    divergence: str = "auto"
    dsm2_form: str = "both"
    probe_product: str = "jvp"
    importance_sampling: bool = False
    dsm3_sigma_cap: float | None = None

    def __post_init__(self) -> None:
        name, set_ = type(self).__name__, lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen)
        set_("lambda2", number(name, "lambda2", self.lambda2))
        set_("lambda3", number(name, "lambda3", self.lambda3))
        set_("eps", time_or_none(name, "eps", self.eps, "default_eps"))
        choice(name, "divergence", self.divergence, DIVERGENCES)
        choice(name, "dsm2_form", self.dsm2_form, DSM2_FORMS)
        choice(name, "probe_product", self.probe_product, PROBE_PRODUCTS)
        flag(name, "importance_sampling", self.importance_sampling)
        if self.dsm3_sigma_cap is not None:
            set_("dsm3_sigma_cap", number(name, "dsm3_sigma_cap", self.dsm3_sigma_cap, positive=True))

    def check_sde(self, sde: SDE) -> None:
        """Settings that depend on the SDE: eps below its T, importance sampling where it exists."""
        sde.resolve_eps(self.eps)
        if self.importance_sampling and not sde.has_importance_sampler:
            raise SettingsError(type(self).__name__, "importance_sampling",
                                f"is not available for {type(sde).__name__} (VPSDE and SubVPSDE only); set it to false")

    def __call__(self, score_fn: ScoreFn, sde: SDE, x0: Tensor, order: int, generator: torch.Generator | None = None,
                 *, t: Tensor | None = None, z: Tensor | None = None, v: Tensor | None = None) -> tuple[Tensor, DSMTerms]:
        """The per-sample loss (3.5) [B] and the terms of one batch of clean data x0 [B, ...].

        Draws t (uniform on [eps, 1] or the importance proposal), then z, then the probe v from
        ``generator``; pre-drawn ``t`` [B], ``z`` and ``v`` (shape of x0) skip their draw. ``score_fn``
        must be differentiable in its input (and in θ for training).
        """
        if order not in (1, 2, 3):
            raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
        if not isinstance(x0, Tensor) or x0.dim() < 2 or x0.shape[0] == 0:
            raise ValueError(f"x0 must be a batch tensor [B, ...] with B >= 1, got "
                             f"{tuple(x0.shape) if isinstance(x0, Tensor) else type(x0).__name__}")
        b = x0.shape[0]
        if t is None:
            t = sde.sample_t(b, sde.resolve_eps(self.eps), generator, x0.device, self.importance_sampling)
        if z is None:
            z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        if t.shape != (b,) or z.shape != x0.shape:
            raise ValueError(f"t must have shape [{b}] and z the shape of x0 {tuple(x0.shape)}, "
                             f"got {tuple(t.shape)} and {tuple(z.shape)}")
        p = perturb(x0, sde, t, z)
        if order == 1:
            s = check_score_output(score_fn(p.xt, p.t), p.xt)
            terms = DSMTerms(dsm1=dsm1(s, p.z, p.sigma), t=p.t, sigma=p.sigma)
            return terms.dsm1, terms
        divergence = resolve_divergence(self.divergence, x0[0].numel())
        der = score_derivatives(score_fn, p, order, divergence, self.probe_product, v, generator)
        with torch.autocast(device_type=x0.device.type, enabled=False):
            zf, sigma = p.z.to(working_dtype(x0.dtype)).flatten(1), p.sigma.to(working_dtype(x0.dtype))
            c = c_vector(der.s, zf, sigma)
            fro, tr = der.dsm2(c, sigma)
            r = der.residual(c, sigma) if order == 3 else None
            terms = DSMTerms(dsm1=dsm1(der.s, zf, sigma), t=p.t, sigma=p.sigma,
                             dsm2={"both": fro + tr, "frobenius": fro, "trace": tr}[self.dsm2_form],
                             dsm3=dsm3(r) if r is not None else None, dsm2_fro=fro.detach(), dsm2_tr=tr.detach(),
                             r=r.detach() if r is not None else None)
            loss = terms.dsm1 + self.lambda2 * terms.dsm2
            if terms.dsm3 is not None:
                loss = loss + self.lambda3 * self.dsm3_weight(sigma) * terms.dsm3
        return loss, terms

    def dsm3_weight(self, sigma: Tensor) -> Tensor:
        """w(σ) = min(1, (σ_c/σ)²) per sample (all ones without ``dsm3_sigma_cap``)."""
        if self.dsm3_sigma_cap is None:
            return torch.ones_like(sigma)
        return ((self.dsm3_sigma_cap / sigma) ** 2).clamp(max=1.0)

    def as_dict(self) -> dict:
        """The fields as a plain dict (safe for ``weights_only=True`` checkpoints' hyperparameters)."""
        return dataclasses.asdict(self)
