"""The training objective as one validated settings object (Lu et al. 2022, §4; docs/design.md §3).

:class:`HOSMObjective` holds the weights λ₂, λ₃ of (3.5) and the estimator settings of (3.1)-(3.4);
calling it gives the per-sample terms of :func:`~hosm_lightning.core.losses.dsm_losses`, and
:meth:`HOSMObjective.weighted` combines them: total = dsm1 + λ₂ dsm2 + λ₃ dsm3.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .dsm_terms import DSMTerms
from .losses import DSM2_FORMS, PROBE_PRODUCTS, ScoreFn, dsm_losses
from .sde import SDE

__all__ = ["HOSMObjective"]

DIVERGENCES = ("auto", "exact", "hutchinson")


def check_choice(key: str, value, allowed: tuple) -> None:
    """Raise a one-line ValueError naming the config ``key`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{key} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def check_time(key: str, value, default: str) -> float | None:
    """None, or a float in (0, 1) (T = 1), returned as float; else a one-line ValueError naming ``key``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < value < 1.0:
        raise ValueError(f"{key} must be None (the SDE's {default}) or a number in (0, 1), got {value!r}")
    return float(value)


def _weight(key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number >= 0, got {value!r}")
    if value < 0:
        raise ValueError(f"{key} must be >= 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class HOSMObjective:
    """High-order DSM objective: which terms are weighted how, and how they are estimated.

    total = dsm1 + lambda2·dsm2 + lambda3·dsm3 over the orders trained (docs/design.md eq. 3.5),
    with dsm1, dsm2, dsm3 the first-, second- and third-order DSM terms (3.1)-(3.3).

    Args:
        lambda2: weight of the second-order term dsm2, >= 0 (reference image code 1; toy code 0.5).
        lambda3: weight of the third-order term dsm3, >= 0 (reference image code 1; toy code 0.1).
        eps: smallest training time, in (0, 1); None uses the SDE's ``default_eps``
            (1e-5 for VP and VE, 1e-2 for subVP).
        divergence: how J = ∂s/∂x enters dsm2/dsm3: 'exact' (full Jacobian, D small),
            'hutchinson' (one Rademacher probe per sample, for images) or 'auto' (exact if D <= 4).
        dsm2_form: 'both' (Frobenius + trace parts of eq. 3.2, as the reference image code),
            'frobenius' or 'trace'.
        probe_product: Hutchinson only: 'jvp' (J v by forward mode, as the reference code) or 'vjp'
            (Jᵀ v by one reverse pass: cheaper on CPU, same optimum).
        importance_sampling: draw t from p(t) ∝ g²/σ² instead of U(eps, 1) (VP and subVP only).
        dsm3_sigma_cap: None (the paper's objective) or σ_c > 0: dsm3 of a sample at noise level σ is
            weighted by w(σ) = min(1, (σ_c/σ)²) in the loss. A positive weight that depends on t only
            leaves the minimiser at every t unchanged (E[r | x_t] = 0), but it tames the gradient of
            σ³∇ tr J, which grows like σ⁴ at large σ (README, "Why order 3 lags").
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
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        set_("lambda2", _weight("model.objective.lambda2", self.lambda2))
        set_("lambda3", _weight("model.objective.lambda3", self.lambda3))
        set_("eps", check_time("model.objective.eps", self.eps, "default_eps"))
        check_choice("model.objective.divergence", self.divergence, DIVERGENCES)
        check_choice("model.objective.dsm2_form", self.dsm2_form, DSM2_FORMS)
        check_choice("model.objective.probe_product", self.probe_product, PROBE_PRODUCTS)
        if not isinstance(self.importance_sampling, bool):
            raise ValueError(f"model.objective.importance_sampling must be true or false, got {self.importance_sampling!r}")
        if self.dsm3_sigma_cap is not None:
            cap = _weight("model.objective.dsm3_sigma_cap", self.dsm3_sigma_cap)
            if cap == 0:
                raise ValueError("model.objective.dsm3_sigma_cap must be > 0 or null (no weighting), got 0")
            set_("dsm3_sigma_cap", cap)

    def eps_for(self, sde: SDE) -> float:
        """The smallest training time for ``sde``: ``eps``, or the SDE's ``default_eps`` if None."""
        eps = sde.default_eps if self.eps is None else self.eps
        if not eps < sde.T:
            raise ValueError(f"model.objective.eps must be < T={sde.T} of {type(sde).__name__}, got {eps!r}")
        return eps

    def __call__(self, score_fn: ScoreFn, sde: SDE, x0: Tensor, order: int,
                 generator: torch.Generator | None = None, *, t: Tensor | None = None, z: Tensor | None = None,
                 v: Tensor | None = None, check_finite: bool = True) -> DSMTerms:
        """Per-sample terms (3.1)-(3.3) up to ``order`` with these settings (see ``dsm_losses``)."""
        return dsm_losses(
            score_fn, x0, sde, order=order, eps=self.eps_for(sde), generator=generator,
            divergence=self.divergence, dsm2_form=self.dsm2_form, importance=self.importance_sampling,
            t=t, z=z, v=v, probe_product=self.probe_product, check_finite=check_finite,
        )

    def weighted(self, terms: Mapping[str, Tensor]) -> Tensor:
        """(3.5) dsm1 + λ₂ dsm2 + λ₃ dsm3 over the terms present (per-sample [B] or batch means);
        other keys (e.g. a logged 'loss') are ignored."""
        if "dsm1" not in terms:
            raise ValueError(f"terms must contain 'dsm1', got keys {sorted(terms)}")
        total = terms["dsm1"]
        for key, weight in (("dsm2", self.lambda2), ("dsm3", self.lambda3)):
            if key in terms:
                total = total + weight * terms[key]
        return total

    def dsm3_weight(self, sigma: Tensor) -> Tensor:
        """w(σ) = min(1, (σ_c/σ)²) per sample (all ones without ``dsm3_sigma_cap``)."""
        if self.dsm3_sigma_cap is None:
            return torch.ones_like(sigma)
        return ((self.dsm3_sigma_cap / sigma) ** 2).clamp(max=1.0)

    def loss(self, terms: DSMTerms) -> Tensor:
        """The batch loss: (3.5) of the batch means; with ``dsm3_sigma_cap`` the mean over the batch of
        (3.5) with each sample's dsm3 weighted by w(σ) (``terms.info['sigma']``)."""
        if self.dsm3_sigma_cap is None or "dsm3" not in terms:
            return self.weighted({k: v.mean() for k, v in terms.items()})
        per_sample = {**dict(terms.items()), "dsm3": self.dsm3_weight(terms.info["sigma"]) * terms["dsm3"]}
        return self.weighted(per_sample).mean()

    def as_dict(self) -> dict:
        """The fields as a plain dict (safe for ``weights_only=True`` checkpoints' hyperparameters)."""
        return dataclasses.asdict(self)
