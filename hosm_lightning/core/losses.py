"""First-, second- and third-order denoising score matching (Lu et al. 2022, §4; docs/design.md §3).

Three steps, each a small function:

1. :func:`perturb` (core/dsm_terms.py): t ~ U(eps, T) (or the importance proposal), z ~ N(0, I), x_t = a(t) x_0 + σ(t) z.
2. :func:`score_derivatives`: s = s_θ(x_t, t) and what the order needs of J = ∂s/∂x: the exact
   J, tr J, ∇ tr J (a forward-mode JVP vmapped over the D basis vectors, D small), or one
   Rademacher probe v with J v (``torch.func.jvp``; or Jᵀv by one reverse pass, ``probe_product='vjp'``),
   vᵀJv and ∇ₓ(vᵀJv) (one reverse pass with ``create_graph=True``).
3. The terms, with c = z + σ ŝ (ŝ = stopgrad(s)) and D = number of data dimensions:

    dsm1 = mean_D (σ s + z)²                                                        (3.1)
    dsm2 = ||σ² J + I - c cᵀ||_F² / D²  +  ((σ² tr J + D - ||c||²) / D)²              (3.2)
    dsm3 = ||r||² / D³,  r = σ³ ∇ tr J + ||c||² c - (σ² tr J + D) c - 2 (σ² J + I) c     (3.3)

   and their Hutchinson estimates (3.4): ||A||_F² ≈ ||A v||², tr J ≈ vᵀJv, ||c||² ≈ (cᵀv)², ∇ tr J ≈ ∇(vᵀJv).

Only J (dsm2) and σ³ ∇ tr J (dsm3) carry gradient; c, J and tr J inside r are stop-gradient: the
paper's error-bounded objectives. :func:`dsm_losses` composes the steps. Derivatives are taken w.r.t.
the input only, so the losses are safe inside a DDP ``training_step`` when ``score_fn`` wraps the
unwrapped net. Every stop-gradient (``.detach()``) of the objective lives in this module.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .dsm_terms import Derivatives, DSMTerms, Perturbed, perturb
from .sde import SDE, bcast

__all__ = [
    "dsm_losses", "perturb", "score_derivatives", "Perturbed", "Derivatives", "DSMTerms",
    "c_vector", "dsm1", "dsm2_exact", "dsm2_hutchinson", "dsm3_residual_exact", "dsm3_residual_hutchinson",
    "dsm3", "ScoreFn", "check_score_output", "resolve_divergence", "rademacher", "DSM2_FORMS",
]

ScoreFn = Callable[[Tensor, Tensor], Tensor]
DSM2_FORMS = ("both", "frobenius", "trace")
PROBE_PRODUCTS = ("jvp", "vjp")


def resolve_divergence(divergence: str, dim: int) -> str:
    """'auto' → 'exact' for D ≤ 4, else 'hutchinson'."""
    if divergence not in ("auto", "exact", "hutchinson"):
        raise ValueError(f"divergence must be 'auto', 'exact' or 'hutchinson', got {divergence!r}")
    if divergence == "auto":
        return "exact" if dim <= 4 else "hutchinson"
    return divergence


def check_score_output(s: Tensor, x: Tensor) -> Tensor:
    """Return s if it is a tensor of the shape of the score's input x, else raise a ValueError."""
    if not isinstance(s, Tensor) or s.shape != x.shape:
        got = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
        raise ValueError(f"score_fn output must have the shape of its input {tuple(x.shape)}, got {got}")
    return s


def rademacher(shape, like: Tensor, generator) -> Tensor:
    """A probe v ∈ {±1}^shape (so vᵀv = D per sample) on the device and in the dtype of ``like``."""
    return torch.randint(0, 2, shape, generator=generator, device=like.device).to(like.dtype) * 2 - 1


# -- step 2: derivatives of the score ------------------------------------------------------------
def _working_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 at least (float64 stays float64): the precision of every order ≥ 2 computation."""
    return torch.promote_types(dtype, torch.float32)


def _jvp(score_fn: ScoreFn, x: Tensor, t: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """(s, J v) by forward-mode AD; both stay differentiable w.r.t. x and the parameters."""
    s, jv = torch.func.jvp(lambda y: score_fn(y, t), (x,), (v,))
    return check_score_output(s, x), jv


def _vjp(score_fn: ScoreFn, x: Tensor, t: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """(s, Jᵀ v) by one reverse pass with ``create_graph=True`` (x must require grad)."""
    s = check_score_output(score_fn(x, t), x)
    (jtv,) = torch.autograd.grad((s * v).sum(), x, create_graph=True)
    return s, jtv


def _exact_derivatives(score_fn: ScoreFn, x: Tensor, t: Tensor, order: int) -> Derivatives:
    """The D columns J e_j from one forward-mode JVP vmapped over the basis vectors, so the network's
    primal output is computed once (score_fn must be vmap-compatible, e.g. no dropout)."""
    d = x[0].numel()
    basis = torch.eye(d, dtype=x.dtype, device=x.device).reshape(d, 1, *x.shape[1:]).expand(d, *x.shape)
    s, cols = torch.func.vmap(lambda e: torch.func.jvp(lambda y: score_fn(y, t), (x,), (e,)), out_dims=(None, 0))(basis)
    s = check_score_output(s, x).flatten(1)
    jac = cols.flatten(2).permute(1, 2, 0)
    tr = jac.diagonal(dim1=1, dim2=2).sum(-1)
    grad_tr = torch.autograd.grad(tr.sum(), x, create_graph=True)[0].flatten(1) if order == 3 else None
    return Derivatives(s=s, mode="exact", jac=jac, tr_j=tr, grad_tr_j=grad_tr)


def score_derivatives(score_fn: ScoreFn, perturbed: Perturbed, order: int, mode: str = "auto",
                      probe_product: str = "jvp", v: Tensor | None = None,
                      generator: torch.Generator | None = None) -> Derivatives:
    """s = s_θ(x_t, t) and, for order ≥ 2, J, tr J, ∇ tr J (3.2)-(3.3) or their probe versions (3.4).

    Order ≥ 2 runs in float32 at least with autocast off; ``mode`` is 'exact', 'hutchinson' or 'auto'
    (exact if D ≤ 4); the probe v (shape of x_t) is drawn from ``generator`` unless given.
    """
    xt, t = perturbed.xt, perturbed.t
    if order == 1:
        return Derivatives(s=check_score_output(score_fn(xt, t), xt))
    mode = resolve_divergence(mode, xt[0].numel())
    if probe_product not in PROBE_PRODUCTS:
        raise ValueError(f"probe_product must be 'jvp' or 'vjp', got {probe_product!r}")
    ft = _working_dtype(xt.dtype)
    with torch.autocast(device_type=xt.device.type, enabled=False):
        x = xt.detach().to(ft).requires_grad_(order == 3 or (mode == "hutchinson" and probe_product == "vjp"))
        if mode == "exact":
            return _exact_derivatives(score_fn, x, t.to(ft), order)
        if v is None:
            v = rademacher(xt.shape, x, generator)
        if v.shape != xt.shape:
            raise ValueError(f"v must have the shape of x0 {tuple(xt.shape)}, got {tuple(v.shape)}")
        s, jv = (_jvp if probe_product == "jvp" else _vjp)(score_fn, x, t.to(ft), v.to(ft))
        s, jv, v = s.flatten(1), jv.flatten(1), v.to(ft).flatten(1)
        vjv = (v * jv).sum(1)
        grad_vjv = torch.autograd.grad(vjv.sum(), x, create_graph=True)[0].flatten(1) if order == 3 else None
    return Derivatives(s=s, mode="hutchinson", v=v, jv=jv, vjv=vjv, grad_vjv=grad_vjv)


# -- step 3: the terms ---------------------------------------------------------------------------
def c_vector(s: Tensor, z: Tensor, sigma: Tensor) -> Tensor:
    """c = z + σ ŝ [B, D] with ŝ = stopgrad(s): E[c cᵀ | x_t] = I + σ² ∇² log q_t at the true score."""
    return z + sigma[:, None] * s.detach()


def dsm1(s: Tensor, z: Tensor, sigma: Tensor) -> Tensor:
    """(3.1) dsm1 = mean_D (σ s + z)² [B]: first-order DSM, σ²-weighted (s, z of one shape [B, ...])."""
    return (bcast(sigma, s) * s + z).pow(2).flatten(1).mean(1)


def dsm2_exact(c: Tensor, jac: Tensor, tr_j: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """(3.2) Frobenius ||σ² J + I - c cᵀ||_F² / D² and trace ((σ² tr J + D - ||c||²) / D)², each [B]."""
    d = c.shape[1]
    eye = torch.eye(d, dtype=c.dtype, device=c.device)
    a_mat = (sigma**2)[:, None, None] * jac + eye - c[:, :, None] * c[:, None, :]
    fro = a_mat.pow(2).sum((1, 2)) / d**2
    tr = ((sigma**2 * tr_j + d - (c * c).sum(1)) / d) ** 2
    return fro, tr


def dsm2_hutchinson(c: Tensor, v: Tensor, jv: Tensor, vjv: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """(3.4) of (3.2) with one probe: ||(σ² J + I - c cᵀ) v||² / D² and ((σ² vᵀJv + D - (cᵀv)²) / D)²."""
    d = c.shape[1]
    sig2, cv = sigma**2, (c * v).sum(1)
    fro = (sig2[:, None] * jv + v - cv[:, None] * c).pow(2).sum(1) / d**2
    tr = ((sig2 * vjv + d - cv**2) / d) ** 2
    return fro, tr


def dsm3_residual_exact(c: Tensor, jac: Tensor, tr_j: Tensor, grad_tr_j: Tensor, sigma: Tensor) -> Tensor:
    """(3.3) r = σ³ ∇ tr J + ||c||² c - (σ² tr Ĵ + D) c - 2 (σ² Ĵ + I) c [B, D], Ĵ = stopgrad(J):
    only σ³ ∇ tr J carries gradient."""
    d = c.shape[1]
    jc = torch.einsum("bij,bj->bi", jac.detach(), c)
    return (
        (sigma**3)[:, None] * grad_tr_j
        + (c * c).sum(1)[:, None] * c
        - (sigma**2 * tr_j.detach() + d)[:, None] * c
        - 2 * ((sigma**2)[:, None] * jc + c)
    )


def dsm3_residual_hutchinson(c: Tensor, v: Tensor, jv: Tensor, vjv: Tensor, grad_vjv: Tensor, sigma: Tensor) -> Tensor:
    """(3.4) of (3.3): r = σ³ ∇(vᵀJv) + (cᵀv)² c - (σ² vᵀĴv + D) c - 2 (cᵀv)(σ² Ĵv + v) [B, D]."""
    d = c.shape[1]
    sig2, cv = sigma**2, (c * v).sum(1)
    return (
        (sigma**3)[:, None] * grad_vjv
        + (cv**2)[:, None] * c
        - (sig2 * vjv.detach() + d)[:, None] * c
        - 2 * cv[:, None] * (sig2[:, None] * jv.detach() + v)
    )


def dsm3(r: Tensor) -> Tensor:
    """(3.3) dsm3 = ||r||² / D³ [B]."""
    return r.pow(2).sum(1) / r.shape[1] ** 3


# -- composition ---------------------------------------------------------------------------------
def _check_inputs(x0: Tensor, sde: SDE, order: int, eps: float, divergence: str, dsm2_form: str,
                  probe_product: str, finite: bool) -> None:
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    if not (0.0 < eps < sde.T):
        raise ValueError(f"eps must lie in (0, T={sde.T}), got {eps!r}")
    resolve_divergence(divergence, 1)
    if dsm2_form not in DSM2_FORMS:
        raise ValueError(f"dsm2_form must be one of {DSM2_FORMS}, got {dsm2_form!r}")
    if probe_product not in PROBE_PRODUCTS:
        raise ValueError(f"probe_product must be 'jvp' or 'vjp', got {probe_product!r}")
    if not isinstance(x0, Tensor) or x0.dim() < 2 or x0.shape[0] == 0:
        shape = tuple(x0.shape) if isinstance(x0, Tensor) else type(x0).__name__
        raise ValueError(f"x0 must be a batch tensor [B, ...] with B >= 1, got {shape}")
    if finite and not torch.isfinite(x0).all():  # a host-device sync: skippable in hot loops
        raise ValueError("x0 contains NaN or Inf values")


def dsm_losses(
    score_fn: ScoreFn,
    x0: Tensor,
    sde: SDE,
    *,
    order: int,
    eps: float = 1e-5,
    generator: torch.Generator | None = None,
    divergence: str = "auto",
    dsm2_form: str = "both",
    importance: bool = False,
    t: Tensor | None = None,
    z: Tensor | None = None,
    v: Tensor | None = None,
    probe_product: str = "jvp",
    check_finite: bool = True,
) -> DSMTerms:
    """Per-sample DSM terms (3.1)-(3.3) of order 1..``order``: perturb → score_derivatives → terms.

    Args:
        score_fn: ``score_fn(x, t) -> ∇_x log p_t(x)`` (shape of x), differentiable in x and θ.
        x0: clean data [B, ...].
        sde: the forward SDE (gives a(t), σ(t)).
        order: highest order, 1, 2 or 3.
        eps: smallest training time, in (0, T).
        generator: RNG for t, z, v (draw order: t, z, v), e.g. seeded from (seed, rank).
        divergence: 'exact' (full Jacobian), 'hutchinson' (Rademacher probe) or 'auto' (exact if D ≤ 4).
        dsm2_form: 'both' (Frobenius + trace, as the reference image code), 'frobenius' or 'trace'.
        importance: draw t from p(t) ∝ g²/σ² (VP/subVP) instead of U(eps, T).
        t, z, v: optional pre-drawn times [B], noise (shape of x0), probe (shape of x0).
        probe_product: Hutchinson only. 'jvp' (J v by forward mode, as the reference code) or 'vjp'
            (Jᵀ v by one reverse pass: about 1.9× cheaper on CPU for order 3; dsm2 has the same
            expectation and vᵀJᵀv = vᵀJv, but the stop-gradient term of r becomes (σ²Jᵀ + I)c in
            expectation, which equals (σ²J + I)c only for a symmetric J, e.g. at the true score).
        check_finite: raise a ValueError if x0 has NaN/Inf (costs one host-device sync).

    Returns:
        :class:`DSMTerms`: a mapping ``{'dsm1': [B], 'dsm2': [B], 'dsm3': [B]}`` up to ``order``
        (dimensionless, per sample) with ``.info`` (t, sigma; dsm2_fro, dsm2_tr; r for order 3).
    """
    _check_inputs(x0, sde, order, eps, divergence, dsm2_form, probe_product, check_finite)
    p = perturb(x0, sde, eps, generator, t=t, z=z, importance=importance)
    info = {"t": p.t, "sigma": p.sigma}
    der = score_derivatives(score_fn, p, order, divergence, probe_product, v, generator)
    if order == 1:
        return DSMTerms({"dsm1": dsm1(der.s, p.z, p.sigma)}, info)
    ft = _working_dtype(x0.dtype)
    with torch.autocast(device_type=x0.device.type, enabled=False):
        z, sigma = p.z.to(ft).flatten(1), p.sigma.to(ft)
        c = c_vector(der.s, z, sigma)
        if der.mode == "exact":
            fro, tr = dsm2_exact(c, der.jac, der.tr_j, sigma)
            r = dsm3_residual_exact(c, der.jac, der.tr_j, der.grad_tr_j, sigma) if order == 3 else None
        else:
            fro, tr = dsm2_hutchinson(c, der.v, der.jv, der.vjv, sigma)
            r = dsm3_residual_hutchinson(c, der.v, der.jv, der.vjv, der.grad_vjv, sigma) if order == 3 else None
        terms = {"dsm1": dsm1(der.s, z, sigma), "dsm2": {"both": fro + tr, "frobenius": fro, "trace": tr}[dsm2_form]}
        if r is not None:
            terms["dsm3"] = dsm3(r)
    info.update(dsm2_fro=fro.detach(), dsm2_tr=tr.detach())
    if r is not None:
        info["r"] = r.detach()
    return DSMTerms(terms, info)
