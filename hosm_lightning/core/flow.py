"""Error-bounded second- and third-order flow matching: the DSM terms in velocity space
(i-DODE, Zheng et al. 2023; docs/design.md §3.2).

With x_t = a x₀ + σ ε, m = a² + σ², the velocity v = a ε − σ x₀ and the model's v̂ (of any
parameterisation: v̂ = −(m σ s + σ x_t)/a), u = sg(v − v̂) and ∂v̂ = ∂v̂/∂x_t = −(σ/a)(m J + I):

    fm2 (trace)  = (σ div v̂ − a (D − ||u||²/m))² / D                                      (3.9)
    fm2 (full)   = ||σ ∂v̂ − a (I − u uᵀ/m)||_F² / D                                        (3.10)
    fm3          = ||r_v||² / D³,  r_v = −σ² ∇ div v̂ + (a/m)² ||u||² u
                                        − (a/m)(a D − σ div v̂) u − 2 (a/m)(a I − σ ∂v̂) u  (3.11)

with div v̂ and ∂v̂ stop-gradient in r_v after its first term. For VP (m = 1) (3.9) is i-DODE's
second-order flow matching. Each is the DSM term of the same order times a positive function of t:
fm2 = D (m/a)² dsm2 part by part, fm3 = (m/a)² dsm3, so the optimum is the same and only the time
weighting differs. With one Rademacher probe p the estimates are those of the DSM terms
(tr → pᵀ∂v̂p, ||u||² → (uᵀp)², ∂v̂ u → (uᵀp) ∂v̂ p): stationary at the true velocity. (i-DODE keeps
the exact ||u||² next to a probed divergence; that pairing is not stationary unless J is diagonal.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .dsm import ExactJacobian, ProbeProducts

__all__ = ["FlowTerms", "flow_terms"]


@dataclass(frozen=True, eq=False)
class FlowTerms:
    """Per-sample fm2 parts [B] (full, trace), fm3 [B] (None below order 3) and r_v [B, D] (detached)."""

    full: Tensor
    trace: Tensor
    fm3: Tensor | None = None
    r: Tensor | None = None


def flow_terms(der: ExactJacobian | ProbeProducts, x0: Tensor, z: Tensor, xt: Tensor, a: Tensor, sigma: Tensor,
               order: int) -> FlowTerms:
    """(3.9)-(3.11) from the score derivatives of one batch; x0, z, xt flat [B, D], a and σ [B]."""
    d = x0.shape[1]
    m = a * a + sigma * sigma
    col = lambda c: c[:, None]  # noqa: E731 - [B] against [B, D]
    v_hat = -(col(m * sigma) * der.s + col(sigma) * xt) / col(a)
    u = (col(a) * z - col(sigma) * x0 - v_hat).detach()
    u2 = (u * u).sum(1)
    if isinstance(der, ExactJacobian):
        eye = torch.eye(d, dtype=x0.dtype, device=x0.device)
        dv = -(sigma / a)[:, None, None] * (m[:, None, None] * der.jac + eye)
        div = dv.diagonal(dim1=1, dim2=2).sum(-1)
        full = ((sigma[:, None, None] * dv - a[:, None, None] * (eye - u[:, :, None] * u[:, None, :] / m[:, None, None]))
                .pow(2).sum((1, 2)) / d)
        trace = (sigma * div - a * (d - u2 / m)) ** 2 / d
        if order < 3:
            return FlowTerms(full, trace)
        grad_div = -col(sigma * m / a) * der.grad_tr_j
        dv_u = torch.einsum("bij,bj->bi", dv.detach(), u)
        r = (-col(sigma**2) * grad_div + col((a / m) ** 2 * u2) * u - col(a / m * (a * d - sigma * div.detach())) * u
             - 2 * col(a / m) * (col(a) * u - col(sigma) * dv_u))
    else:
        p, up = der.v, (u * der.v).sum(1)
        dvp = -col(sigma / a) * (col(m) * der.jv + p)
        pdvp = -(sigma / a) * (m * der.vjv + d)
        full = (col(sigma) * dvp - col(a) * (p - u * col(up / m))).pow(2).sum(1) / d
        trace = (sigma * pdvp - a * (d - up**2 / m)) ** 2 / d
        if order < 3:
            return FlowTerms(full, trace)
        grad_pdvp = -col(sigma * m / a) * der.grad_vjv
        r = (-col(sigma**2) * grad_pdvp + col((a / m) ** 2 * up**2) * u
             - col(a / m * (a * d - sigma * pdvp.detach())) * u
             - 2 * col(a / m * up) * (col(a) * p - col(sigma) * dvp.detach()))
    return FlowTerms(full, trace, r.pow(2).sum(1) / d**3, r.detach())
