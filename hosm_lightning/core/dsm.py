"""The equations of first-, second- and third-order DSM (Lu et al. 2022, §4; docs/design.md §3).

Per sample, with D the number of data dimensions, s = s_θ(x_t, t), J = ∂s/∂x, ŝ = stopgrad(s) and
c = z + σ ŝ:

    dsm1 = mean_D (σ s + z)²                                                        (3.1)
    dsm2 = ||σ² J + I - c cᵀ||_F² / D²  +  ((σ² tr J + D - ||c||²) / D)²              (3.2)
    dsm3 = ||r||² / D³,  r = σ³ ∇ tr J + ||c||² c - (σ² tr J + D) c - 2 (σ² J + I) c     (3.3)

and their Hutchinson estimates with one Rademacher probe v (3.4): ||A||_F² ≈ ||A v||²,
tr J ≈ vᵀJv, ||c||² ≈ (cᵀv)², ∇ tr J ≈ ∇(vᵀJv).

:func:`perturb` draws x_t = a(t) x_0 + σ(t) z; :func:`score_derivatives` returns s and what the order
needs of J as one of two types, :class:`ExactJacobian` (the full J, for small D) or
:class:`ProbeProducts` (Jv, vᵀJv, ∇(vᵀJv)); each type evaluates (3.2) and the residual of (3.3) itself,
so the exact/probe branch is taken once. Only J (dsm2) and σ³ ∇ tr J (dsm3) carry gradient: every
stop-gradient (``.detach()``) of the objective is in this module. Derivatives are taken with respect
to the input only, so the terms are safe inside a DDP ``training_step`` when the score function wraps
the unwrapped network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .score import ScoreFn, check_score_output, rademacher, working_dtype
from .sde import SDE, bcast

__all__ = ["Perturbed", "ExactJacobian", "ProbeProducts", "perturb", "score_derivatives", "c_vector", "dsm1",
           "dsm3", "PROBE_PRODUCTS"]

#: how the probe's product with J is formed: J v (forward mode) or Jᵀ v (one reverse pass)
PROBE_PRODUCTS = ("jvp", "vjp")


@dataclass(frozen=True, eq=False)
class Perturbed:
    """x_t = a(t) x_0 + σ(t) z: t, sigma = σ(t), mean_coef = a(t) are [B]; z, xt the shape of x_0."""

    t: Tensor
    z: Tensor
    sigma: Tensor
    mean_coef: Tensor
    xt: Tensor


def perturb(x0: Tensor, sde: SDE, t: Tensor, z: Tensor) -> Perturbed:
    """x_t = a(t) x_0 + σ(t) z for times t [B] and noise z (shape of x_0), in x_0's dtype."""
    t = t.to(x0.dtype)
    mean_coef, sigma = sde.marginal(t)
    xt = bcast(mean_coef, x0) * x0 + bcast(sigma, x0) * z
    return Perturbed(t=t, z=z, sigma=sigma, mean_coef=mean_coef, xt=xt)


def c_vector(s: Tensor, z: Tensor, sigma: Tensor) -> Tensor:
    """c = z + σ ŝ [B, D], ŝ = stopgrad(s): E[c cᵀ | x_t] = I + σ² ∇² log q_t at the true score."""
    return z + sigma[:, None] * s.detach()


def dsm1(s: Tensor, z: Tensor, sigma: Tensor) -> Tensor:
    """(3.1) mean_D (σ s + z)² [B]: first-order DSM, σ²-weighted (s, z of one shape [B, ...])."""
    return (bcast(sigma, s) * s + z).pow(2).flatten(1).mean(1)


def dsm3(r: Tensor) -> Tensor:
    """(3.3) ||r||² / D³ [B]."""
    return r.pow(2).sum(1) / r.shape[1] ** 3


@dataclass(frozen=True, eq=False)
class ExactJacobian:
    """s [B, D], the full J [B, D, D] (J[b, i, j] = ∂s_i/∂x_j), tr J [B] and, for order 3, ∇ₓ tr J [B, D]."""

    s: Tensor
    jac: Tensor
    tr_j: Tensor
    grad_tr_j: Tensor | None = None

    def dsm2(self, c: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """(3.2) Frobenius ||σ² J + I - c cᵀ||_F² / D² and trace ((σ² tr J + D - ||c||²) / D)², each [B]."""
        d = c.shape[1]
        eye = torch.eye(d, dtype=c.dtype, device=c.device)
        a_mat = (sigma**2)[:, None, None] * self.jac + eye - c[:, :, None] * c[:, None, :]
        fro = a_mat.pow(2).sum((1, 2)) / d**2
        tr = ((sigma**2 * self.tr_j + d - (c * c).sum(1)) / d) ** 2
        return fro, tr

    def residual(self, c: Tensor, sigma: Tensor) -> Tensor:
        """(3.3) r = σ³ ∇ tr J + ||c||² c - (σ² tr Ĵ + D) c - 2 (σ² Ĵ + I) c [B, D], Ĵ = stopgrad(J)."""
        d = c.shape[1]
        jc = torch.einsum("bij,bj->bi", self.jac.detach(), c)
        return ((sigma**3)[:, None] * self.grad_tr_j + (c * c).sum(1)[:, None] * c
                - (sigma**2 * self.tr_j.detach() + d)[:, None] * c - 2 * ((sigma**2)[:, None] * jc + c))


@dataclass(frozen=True, eq=False)
class ProbeProducts:
    """s [B, D], the probe v [B, D], J v (Jᵀv with probe_product 'vjp') [B, D], vᵀJv [B] and, for
    order 3, ∇ₓ(vᵀJv) [B, D]."""

    s: Tensor
    v: Tensor
    jv: Tensor
    vjv: Tensor
    grad_vjv: Tensor | None = None

    def dsm2(self, c: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """(3.4) of (3.2): ||(σ² J + I - c cᵀ) v||² / D² and ((σ² vᵀJv + D - (cᵀv)²) / D)²."""
        d = c.shape[1]
        sig2, cv = sigma**2, (c * self.v).sum(1)
        fro = (sig2[:, None] * self.jv + self.v - cv[:, None] * c).pow(2).sum(1) / d**2
        tr = ((sig2 * self.vjv + d - cv**2) / d) ** 2
        return fro, tr

    def residual(self, c: Tensor, sigma: Tensor) -> Tensor:
        """(3.4) of (3.3): r = σ³ ∇(vᵀJv) + (cᵀv)² c - (σ² vᵀĴv + D) c - 2 (cᵀv)(σ² Ĵv + v) [B, D]."""
        d = c.shape[1]
        sig2, cv = sigma**2, (c * self.v).sum(1)
        return ((sigma**3)[:, None] * self.grad_vjv + (cv**2)[:, None] * c
                - (sig2 * self.vjv.detach() + d)[:, None] * c
                - 2 * cv[:, None] * (sig2[:, None] * self.jv.detach() + self.v))


def _exact(score_fn: ScoreFn, x: Tensor, t: Tensor, order: int) -> ExactJacobian:
    """The D columns J e_j from one forward-mode JVP vmapped over the basis vectors, so the network's
    primal output is computed once (score_fn must be vmap-compatible, e.g. no dropout)."""
    d = x[0].numel()
    basis = torch.eye(d, dtype=x.dtype, device=x.device).reshape(d, 1, *x.shape[1:]).expand(d, *x.shape)
    s, cols = torch.func.vmap(lambda e: torch.func.jvp(lambda y: score_fn(y, t), (x,), (e,)), out_dims=(None, 0))(basis)
    s = check_score_output(s, x).flatten(1)
    jac = cols.flatten(2).permute(1, 2, 0)
    tr = jac.diagonal(dim1=1, dim2=2).sum(-1)
    grad_tr = torch.autograd.grad(tr.sum(), x, create_graph=True)[0].flatten(1) if order == 3 else None
    return ExactJacobian(s=s, jac=jac, tr_j=tr, grad_tr_j=grad_tr)


def _probe(score_fn: ScoreFn, x: Tensor, t: Tensor, v: Tensor, order: int, probe_product: str) -> ProbeProducts:
    """(s, J v) by forward-mode AD, or (s, Jᵀ v) by one reverse pass with ``create_graph``; then vᵀJv
    and, for order 3, ∇ₓ(vᵀJv) by one more reverse pass."""
    if probe_product == "jvp":
        s, jv = torch.func.jvp(lambda y: score_fn(y, t), (x,), (v,))
        check_score_output(s, x)
    else:
        s = check_score_output(score_fn(x, t), x)
        (jv,) = torch.autograd.grad((s * v).sum(), x, create_graph=True)
    s, jv, v = s.flatten(1), jv.flatten(1), v.flatten(1)
    vjv = (v * jv).sum(1)
    grad_vjv = torch.autograd.grad(vjv.sum(), x, create_graph=True)[0].flatten(1) if order == 3 else None
    return ProbeProducts(s=s, v=v, jv=jv, vjv=vjv, grad_vjv=grad_vjv)


def score_derivatives(score_fn: ScoreFn, p: Perturbed, order: int, divergence: str, probe_product: str = "jvp",
                      v: Tensor | None = None, generator=None) -> ExactJacobian | ProbeProducts:
    """s = s_θ(x_t, t) and what order 2 or 3 needs of J: ``divergence`` 'exact' or 'hutchinson'
    (already resolved). Runs in float32 at least with autocast off; the probe v (shape of x_t) is
    drawn from ``generator`` unless given. Order 1 needs only ``score_fn`` itself."""
    ft = working_dtype(p.xt.dtype)
    with torch.autocast(device_type=p.xt.device.type, enabled=False):
        need_grad = order == 3 or (divergence == "hutchinson" and probe_product == "vjp")
        x = p.xt.detach().to(ft).requires_grad_(need_grad)
        if divergence == "exact":
            return _exact(score_fn, x, p.t.to(ft), order)
        if v is None:
            v = rademacher(p.xt.shape, x, generator)
        if v.shape != p.xt.shape:
            raise ValueError(f"v must have the shape of x0 {tuple(p.xt.shape)}, got {tuple(v.shape)}")
        return _probe(score_fn, x, p.t.to(ft), v.to(ft), order, probe_product)
