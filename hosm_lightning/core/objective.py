"""The training objective, one object: settings validated once, ``__call__`` gives the per-sample loss.

    loss = w₁(t) dsm1 + λ₂ dsm2 + λ₃ w(σ) dsm3                              (3.5)

per sample, over the orders trained (order 1: dsm1 only; order 2: + dsm2; order 3: + dsm3), with the
terms of core/dsm.py, w₁ = w(t)/p̃(t) of the time weighting and proposal (core/time_sampling.py: 1 for
the paper's σ² weighting with uniform t) and w(σ) = 1 (the paper) or min(1, (σ_c/σ)²) with
``dsm3_sigma_cap`` σ_c. With ``higher_order: flow`` the terms of orders 2 and 3 are fm2 and fm3, the
same terms in velocity space (core/flow.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from . import time_sampling
from .dsm import PROBE_PRODUCTS, c_vector, dsm1, dsm3, perturb, score_derivatives
from .flow import flow_terms
from .score import DIVERGENCES, ScoreFn, check_score_output, resolve_divergence, working_dtype
from .sde import SDE
from .settings import SettingsError, choice, number, time_or_none

__all__ = ["HOSMObjective", "DSMTerms", "ORDER2_FORMS", "HIGHER_ORDERS"]

#: which parts of (3.2) / (3.9-3.10) make the second-order term: both (the reference image code), the
#: Frobenius (full) or the trace part
ORDER2_FORMS = ("both", "frobenius", "trace")
#: the terms of orders 2 and 3: the paper's score-space DSM or velocity-space flow matching
HIGHER_ORDERS = ("dsm", "flow")


@dataclass(frozen=True, eq=False)
class DSMTerms:
    """The per-sample terms [B] of one batch that enter the loss (``dsm2`` / ``dsm3`` with
    ``higher_order: dsm``, ``fm2`` / ``fm3`` with ``flow``; None below their order) and what produced
    them: t and σ [B], the factor w₁ [B] of dsm1; for order >= 2 the detached Frobenius and trace parts
    of dsm2; for order 3 the detached residual r [B, D] of (3.3) (E[r | x_t] = 0 at the true score)."""

    dsm1: Tensor
    t: Tensor
    sigma: Tensor
    weight1: Tensor | None = None
    dsm2: Tensor | None = None
    dsm3: Tensor | None = None
    fm2: Tensor | None = None
    fm3: Tensor | None = None
    dsm2_fro: Tensor | None = None
    dsm2_tr: Tensor | None = None
    r: Tensor | None = None

    def terms(self) -> dict[str, Tensor]:
        """``{'dsm1': [B], 'dsm2' or 'fm2': [B], 'dsm3' or 'fm3': [B]}`` up to the order."""
        pairs = (("dsm1", self.dsm1), ("dsm2", self.dsm2), ("fm2", self.fm2), ("dsm3", self.dsm3), ("fm3", self.fm3))
        return {k: v for k, v in pairs if v is not None}


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
        order2_form: the second-order term: 'both' (Frobenius + trace parts of eq. 3.2 or 3.9-3.10,
            as the reference image code), 'frobenius' (full) or 'trace' (i-DODE's flow matching).
        probe_product: Hutchinson only: 'jvp' (J v by forward mode, as the reference code) or 'vjp'
            (Jᵀ v by one reverse pass: cheaper on CPU; dsm2 has the same expectation, and the
            stop-gradient part of r becomes (σ²Jᵀ + I)c, equal to (σ²J + I)c for a symmetric J, e.g.
            at the true score: the same optimum).
        weighting: the time weighting of dsm1: 'sigma2' (λ = σ², the paper's) or 'likelihood'
            (λ = g², ScoreFlow's bound on the NLL) (eq. 3.6).
        time_proposal: where t is drawn: 'uniform' on [eps, 1], 'importance' (p ∝ g²/σ², eq. 3.7) or
            'velocity' (p ∝ g² a²/(σ² (a² + σ²)²), i-DODE's, eq. 3.8; with it the first-order loss is
            ||v − v̂||²). The two proposals go with ``weighting: likelihood``.
        higher_order: the terms of orders 2 and 3: 'dsm' (dsm2, dsm3 of the paper) or 'flow'
            (fm2, fm3: the same terms in velocity space, i-DODE's error-bounded flow matching, eqs. 3.9-3.11;
            fm2 = D ((a² + σ²)/a)² dsm2 part by part, so λ₂ of 'flow' is on another scale).
        dsm3_sigma_cap: None (the paper's objective) or σ_c > 0: dsm3 of a sample at noise level σ is
            weighted by w(σ) = min(1, (σ_c/σ)²). A positive weight that depends on t only leaves the
            minimiser at every t unchanged (E[r | x_t] = 0), but it tames the gradient of σ³∇ tr J,
            which grows like σ⁴ at large σ (docs/design.md §9).
    """

    lambda2: float = 1.0
    lambda3: float = 1.0
    eps: float | None = None
    divergence: str = "auto"
    order2_form: str = "both"
    probe_product: str = "jvp"
    weighting: str = "sigma2"
    time_proposal: str = "uniform"
    higher_order: str = "dsm"
    dsm3_sigma_cap: float | None = None

    def __post_init__(self) -> None:
        name, set_ = type(self).__name__, lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen)
        set_("lambda2", number(name, "lambda2", self.lambda2))
        set_("lambda3", number(name, "lambda3", self.lambda3))
        set_("eps", time_or_none(name, "eps", self.eps, "default_eps"))
        choice(name, "divergence", self.divergence, DIVERGENCES)
        choice(name, "order2_form", self.order2_form, ORDER2_FORMS)
        choice(name, "probe_product", self.probe_product, PROBE_PRODUCTS)
        choice(name, "weighting", self.weighting, time_sampling.WEIGHTINGS)
        choice(name, "time_proposal", self.time_proposal, time_sampling.TIME_PROPOSALS)
        choice(name, "higher_order", self.higher_order, HIGHER_ORDERS)
        problem = time_sampling.pairing_error(self.weighting, self.time_proposal)
        if problem:
            raise SettingsError(name, "time_proposal", f"{self.time_proposal!r} does not go with weighting "
                                f"{self.weighting!r}: {problem}")
        if self.dsm3_sigma_cap is not None:
            set_("dsm3_sigma_cap", number(name, "dsm3_sigma_cap", self.dsm3_sigma_cap, positive=True))

    def check_sde(self, sde: SDE) -> None:
        """Settings that depend on the SDE: eps below its T, a closed-form cumulative for the proposal."""
        sde.resolve_eps(self.eps)
        try:
            time_sampling.cumulative(sde, self.time_proposal, torch.tensor([0.5], dtype=torch.float64))
        except ValueError as err:
            raise SettingsError(type(self).__name__, "time_proposal", str(err)) from None

    def __call__(self, score_fn: ScoreFn, sde: SDE, x0: Tensor, order: int, generator: torch.Generator | None = None,
                 *, t: Tensor | None = None, z: Tensor | None = None, v: Tensor | None = None) -> tuple[Tensor, DSMTerms]:
        """The per-sample loss (3.5) [B] and the terms of one batch of clean data x0 [B, ...].

        Draws t (from ``time_proposal`` on [eps, 1]), then z, then the probe v from
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
            t = time_sampling.sample_t(sde, self.time_proposal, b, sde.resolve_eps(self.eps), generator, x0.device)
        if z is None:
            z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        if t.shape != (b,) or z.shape != x0.shape:
            raise ValueError(f"t must have shape [{b}] and z the shape of x0 {tuple(x0.shape)}, "
                             f"got {tuple(t.shape)} and {tuple(z.shape)}")
        p = perturb(x0, sde, t, z)
        weight1 = time_sampling.loss_factor(sde, self.weighting, self.time_proposal, p.t.double()).to(p.t.dtype)
        if order == 1:
            s = check_score_output(score_fn(p.xt, p.t), p.xt)
            terms = DSMTerms(dsm1=dsm1(s, p.z, p.sigma), t=p.t, sigma=p.sigma, weight1=weight1)
            return weight1 * terms.dsm1, terms
        divergence = resolve_divergence(self.divergence, x0[0].numel())
        der = score_derivatives(score_fn, p, order, divergence, self.probe_product, v, generator)
        with torch.autocast(device_type=x0.device.type, enabled=False):
            ft = working_dtype(x0.dtype)
            zf, sigma = p.z.to(ft).flatten(1), p.sigma.to(ft)
            c = c_vector(der.s, zf, sigma)
            fro, tr = der.dsm2(c, sigma)
            r = der.residual(c, sigma) if order == 3 else None
            if self.higher_order == "flow":
                flow = flow_terms(der, x0.to(ft).flatten(1), zf, p.xt.to(ft).flatten(1), p.mean_coef.to(ft), sigma, order)
                second, third = self._order2(flow.full, flow.trace), flow.fm3
                high = {"fm2": second, "fm3": third}
            else:
                second, third = self._order2(fro, tr), dsm3(r) if r is not None else None
                high = {"dsm2": second, "dsm3": third}
            terms = DSMTerms(dsm1=dsm1(der.s, zf, sigma), t=p.t, sigma=p.sigma, weight1=weight1.to(ft), **high,
                             dsm2_fro=fro.detach(), dsm2_tr=tr.detach(), r=r.detach() if r is not None else None)
            loss = terms.weight1 * terms.dsm1 + self.lambda2 * second
            if third is not None:
                loss = loss + self.lambda3 * self.dsm3_weight(sigma) * third
        return loss, terms

    def _order2(self, full: Tensor, trace: Tensor) -> Tensor:
        """The second-order term of ``order2_form`` from its full (Frobenius) and trace parts."""
        return {"both": full + trace, "frobenius": full, "trace": trace}[self.order2_form]

    def dsm3_weight(self, sigma: Tensor) -> Tensor:
        """w(σ) = min(1, (σ_c/σ)²) per sample (all ones without ``dsm3_sigma_cap``)."""
        if self.dsm3_sigma_cap is None:
            return torch.ones_like(sigma)
        return ((self.dsm3_sigma_cap / sigma) ** 2).clamp(max=1.0)

    def as_dict(self) -> dict:
        """The fields as a plain dict (safe for ``weights_only=True`` checkpoints' hyperparameters)."""
        return dataclasses.asdict(self)
