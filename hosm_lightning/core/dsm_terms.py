"""The objects passed between the steps of the DSM objective (docs/design.md §3), and step 1.

:func:`perturb` draws x_t = a(t) x_0 + σ(t) z (Lu et al. 2022, §4); :class:`Derivatives` carries s and
the parts of J = ∂s/∂x that core/losses.py's :func:`~hosm_lightning.core.losses.score_derivatives`
computes; :class:`DSMTerms` is what :func:`~hosm_lightning.core.losses.dsm_losses` returns. Nothing
here is stop-gradient: every ``.detach()`` of the objective lives in core/losses.py (the
finite-difference test in tests/test_unets.py freezes them by module name).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .sde import SDE, bcast

__all__ = ["Perturbed", "Derivatives", "DSMTerms", "perturb"]


# -- the objects passed between the steps ------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Perturbed:
    """One draw of the perturbation kernel: x_t = a(t) x_0 + σ(t) z (docs/design.md §2-3).

    t, sigma = σ(t), mean_coef = a(t) are [B]; z and xt have the shape of x_0 (all in x_0's dtype).
    """

    t: Tensor
    z: Tensor
    sigma: Tensor
    mean_coef: Tensor
    xt: Tensor


@dataclass(frozen=True, eq=False)
class Derivatives:
    """s = s_θ(x_t, t) and, for order ≥ 2, the parts of J = ∂s/∂x the objective needs.

    Order 1: ``s`` has the shape of x_t, in the network's precision. Order ≥ 2: every tensor is
    flattened to [B, D] (scalars [B]) in float32 at least, and ``mode`` says which group is set:
    'exact': ``jac`` J [B, D, D] (J[b, i, j] = ∂s_i/∂x_j), ``tr_j`` tr J, ``grad_tr_j`` ∇ₓ tr J (order 3);
    'hutchinson': ``v`` the probe, ``jv`` J v (Jᵀv with probe_product='vjp'), ``vjv`` vᵀJv,
    ``grad_vjv`` ∇ₓ(vᵀJv) (order 3).
    """

    s: Tensor
    mode: str | None = None
    jac: Tensor | None = None
    tr_j: Tensor | None = None
    grad_tr_j: Tensor | None = None
    v: Tensor | None = None
    jv: Tensor | None = None
    vjv: Tensor | None = None
    grad_vjv: Tensor | None = None


@dataclass(frozen=True, eq=False)
class DSMTerms(Mapping):
    """Per-sample DSM terms ``{'dsm1': [B], 'dsm2': [B], 'dsm3': [B]}`` up to the order, as a read-only
    mapping (``out['dsm1']``, ``out.items()``, ``set(out)``), and ``info``: t and σ [B]; for order ≥ 2
    the detached Frobenius and trace parts of dsm2 (``dsm2_fro``, ``dsm2_tr``); for order 3 the
    detached residual ``r`` [B, D] of (3.3) (E[r | x_t] = 0 at the true score).
    """

    terms: dict[str, Tensor]
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "terms", dict(self.terms))

    def __getitem__(self, key: str) -> Tensor:
        return self.terms[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.terms)

    def __len__(self) -> int:
        return len(self.terms)


# -- step 1: perturbation ----------------------------------------------------------------------
def perturb(x0: Tensor, sde: SDE, eps: float, generator: torch.Generator | None = None, *,
            t: Tensor | None = None, z: Tensor | None = None, importance: bool = False) -> Perturbed:
    """x_t = a(t) x_0 + σ(t) z with t ~ U(eps, T) (or p(t) ∝ g²/σ² if ``importance``) and z ~ N(0, I).

    Draws t first, then z, from ``generator`` (pre-drawn ``t`` [B] / ``z`` (shape of x0) skip a draw).
    """
    b = x0.shape[0]
    if t is None:
        if not (0.0 < eps < sde.T):
            raise ValueError(f"eps must lie in (0, T={sde.T}), got {eps!r}")
        t = sde.sample_t(b, eps, generator=generator, device=x0.device, importance=importance)
    if t.shape != (b,):
        raise ValueError(f"t must have shape [{b}], got {tuple(t.shape)}")
    t = t.to(x0.dtype)
    if z is None:
        z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    if z.shape != x0.shape:
        raise ValueError(f"z must have the shape of x0 {tuple(x0.shape)}, got {tuple(z.shape)}")
    mean_coef, sigma = sde.marginal(t)
    xt = bcast(mean_coef, x0) * x0 + bcast(sigma, x0) * z
    return Perturbed(t=t, z=z, sigma=sigma, mean_coef=mean_coef, xt=xt)
