"""First-, second- and third-order denoising score matching (Lu et al. 2022, §4; docs/design.md §3).

Per sample: t ~ U(eps, T) (or the importance proposal), z ~ N(0, I), x_t = a x_0 + sigma z,
s = s_theta(x_t, t), J = ∂s/∂x, ŝ = stopgrad(s), c = z + sigma ŝ, D = number of data dimensions.

    dsm1 = mean_D (sigma s + z)^2                                              (sigma²-weighted DSM)
    dsm2 = ||sigma² J + I - c cᵀ||_F² / D²  +  ((sigma² tr J + D - ||c||²) / D)²   (Frobenius + trace)
    dsm3 = ||r||² / D³,  r = sigma³ ∇ tr J + ||c||² c - (sigma² tr J + D) c - 2 (sigma² J + I) c

The second-order minimiser satisfies E[c cᵀ | x_t] = I + sigma² ∇² log q_t (exact ŝ), the
third-order one E[r | x_t] = 0 (third cumulant of z given x_t); only J (dsm2) and sigma³ ∇ tr J (dsm3)
carry gradient, c, J and tr J inside r are stop-gradient: the paper's error-bounded objectives.

Derivatives: ``exact`` builds the full Jacobian by one forward-mode JVP vmapped over the D basis
vectors (D small); ``hutchinson`` uses one Rademacher probe v per sample, J v by forward-mode JVP
(``torch.func.jvp``, exact J·v as in the reference), tr J ≈ vᵀ J v, ||c||² ≈ (cᵀv)², and
∇ tr J ≈ ∇_x (vᵀ J v) by one reverse pass with ``create_graph=True``. Both differentiate w.r.t. the
input only, so they are safe inside a DDP ``training_step`` when ``score_fn`` wraps the unwrapped net.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .sde import SDE, bcast

__all__ = ["dsm_losses", "ScoreFn", "check_score_output", "resolve_divergence", "rademacher"]

ScoreFn = Callable[[Tensor, Tensor], Tensor]
DSM2_FORMS = ("both", "frobenius", "trace")


def resolve_divergence(divergence: str, dim: int) -> str:
    """'auto' → 'exact' for D ≤ 4, else 'hutchinson'."""
    if divergence not in ("auto", "exact", "hutchinson"):
        raise ValueError(f"divergence must be 'auto', 'exact' or 'hutchinson', got {divergence!r}")
    if divergence == "auto":
        return "exact" if dim <= 4 else "hutchinson"
    return divergence


def check_score_output(s: Tensor, x: Tensor) -> Tensor:
    if not isinstance(s, Tensor) or s.shape != x.shape:
        got = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
        raise ValueError(f"score_fn output must have the shape of its input {tuple(x.shape)}, got {got}")
    return s


def _check_inputs(x0: Tensor, sde: SDE, order: int, eps: float, dsm2_form: str, finite: bool) -> None:
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    if not (0.0 < eps < sde.T):
        raise ValueError(f"eps must lie in (0, T={sde.T}), got {eps!r}")
    if dsm2_form not in DSM2_FORMS:
        raise ValueError(f"dsm2_form must be one of {DSM2_FORMS}, got {dsm2_form!r}")
    if not isinstance(x0, Tensor) or x0.dim() < 2 or x0.shape[0] == 0:
        shape = tuple(x0.shape) if isinstance(x0, Tensor) else type(x0).__name__
        raise ValueError(f"x0 must be a batch tensor [B, ...] with B >= 1, got {shape}")
    if finite and not torch.isfinite(x0).all():  # a host-device sync: skippable in hot loops
        raise ValueError("x0 contains NaN or Inf values")


def _draw(x0, sde, eps, generator, t, z, importance):
    b = x0.shape[0]
    if t is None:
        t = sde.sample_t(b, eps, generator=generator, device=x0.device, importance=importance)
    if t.shape != (b,):
        raise ValueError(f"t must have shape [{b}], got {tuple(t.shape)}")
    t = t.to(x0.dtype)
    if z is None:
        z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    if z.shape != x0.shape:
        raise ValueError(f"z must have the shape of x0 {tuple(x0.shape)}, got {tuple(z.shape)}")
    return t, z


def rademacher(shape, like: Tensor, generator) -> Tensor:
    return torch.randint(0, 2, shape, generator=generator, device=like.device).to(like.dtype) * 2 - 1


def _jvp(score_fn: ScoreFn, x: Tensor, t: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """(s, J v) by forward-mode AD; both stay differentiable w.r.t. x and the parameters."""
    s, jv = torch.func.jvp(lambda y: score_fn(y, t), (x,), (v,))
    return check_score_output(s, x), jv


def _vjp(score_fn: ScoreFn, x: Tensor, t: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """(s, Jᵀ v) by one reverse pass with ``create_graph=True`` (x must require grad)."""
    s = check_score_output(score_fn(x, t), x)
    (jtv,) = torch.autograd.grad((s * v).sum(), x, create_graph=True)
    return s, jtv


def _exact_derivs(score_fn, x, t, need_grad_tr):
    """s [B,D], J [B,D,D] (J[b,i,j] = ∂s_i/∂x_j), tr J [B], ∇ tr J [B,D] or None.

    The D columns J e_j come from one forward-mode JVP vmapped over the basis vectors, so the
    network's primal output is computed once (the score_fn must be vmap-compatible, e.g. no dropout).
    """
    d = x[0].numel()
    basis = torch.eye(d, dtype=x.dtype, device=x.device).reshape(d, 1, *x.shape[1:]).expand(d, *x.shape)
    s, cols = torch.func.vmap(lambda e: torch.func.jvp(lambda y: score_fn(y, t), (x,), (e,)), out_dims=(None, 0))(basis)
    s = check_score_output(s, x).flatten(1)
    jac = cols.flatten(2).permute(1, 2, 0)
    tr = jac.diagonal(dim1=1, dim2=2).sum(-1)
    grad_tr = torch.autograd.grad(tr.sum(), x, create_graph=True)[0].flatten(1) if need_grad_tr else None
    return s, jac, tr, grad_tr


def _exact_terms(s, jac, tr, grad_tr, z, sigma, d, order):
    c = z + sigma[:, None] * s.detach()
    sig2 = (sigma**2)[:, None, None]
    eye = torch.eye(d, dtype=z.dtype, device=z.device)
    cc = (c * c).sum(1)
    out = {}
    a_mat = sig2 * jac + eye - c[:, :, None] * c[:, None, :]
    out["dsm2_fro"] = a_mat.pow(2).sum((1, 2)) / d**2
    out["dsm2_tr"] = ((sigma**2 * tr + d - cc) / d) ** 2
    if order == 3:
        jc = torch.einsum("bij,bj->bi", jac.detach(), c)
        r = (
            (sigma**3)[:, None] * grad_tr
            + cc[:, None] * c
            - (sigma**2 * tr.detach() + d)[:, None] * c
            - 2 * ((sigma**2)[:, None] * jc + c)
        )
        out["dsm3"], out["r"] = r.pow(2).sum(1) / d**3, r.detach()
    return out


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
    return_info: bool = False,
):
    """Per-sample DSM losses of order 1..``order``.

    Args:
        score_fn: ``score_fn(x, t) -> ∇_x log p_t(x)`` (shape of x), differentiable in x and θ.
        x0: clean data [B, ...].
        sde: the forward SDE (gives a(t), sigma(t)).
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
        return_info: also return a dict with t, sigma, the two dsm2 forms and (order 3) the residual r.

    Returns:
        ``{'dsm1': [B], 'dsm2': [B], 'dsm3': [B]}`` up to ``order`` (dimensionless, per sample),
        or ``(losses, info)`` if ``return_info``.
    """
    _check_inputs(x0, sde, order, eps, dsm2_form, check_finite)
    if probe_product not in ("jvp", "vjp"):
        raise ValueError(f"probe_product must be 'jvp' or 'vjp', got {probe_product!r}")
    t, z = _draw(x0, sde, eps, generator, t, z, importance)
    d = x0[0].numel()
    mean_coef, sigma = sde.marginal(t)
    xt = bcast(mean_coef, x0) * x0 + bcast(sigma, x0) * z
    info = {"t": t, "sigma": sigma}
    if order == 1:
        s = check_score_output(score_fn(xt, t), xt)
        losses = {"dsm1": (bcast(sigma, s) * s + z).pow(2).flatten(1).mean(1)}
        return (losses, info) if return_info else losses

    mode = resolve_divergence(divergence, d)
    ft = torch.promote_types(x0.dtype, torch.float32)  # float32 at least (float64 stays float64)
    with torch.autocast(device_type=x0.device.type, enabled=False):
        xt = xt.detach().to(ft).requires_grad_(order == 3 or (mode == "hutchinson" and probe_product == "vjp"))
        zf, sigf = z.to(ft).flatten(1), sigma.to(ft)
        if mode == "exact":
            s, jac, tr, grad_tr = _exact_derivs(score_fn, xt, t.to(ft), order == 3)
            terms = _exact_terms(s, jac, tr, grad_tr, zf, sigf, d, order)
        else:
            if v is None:
                v = rademacher(x0.shape, xt, generator)
            if v.shape != x0.shape:
                raise ValueError(f"v must have the shape of x0 {tuple(x0.shape)}, got {tuple(v.shape)}")
            s, jv = (_jvp if probe_product == "jvp" else _vjp)(score_fn, xt, t.to(ft), v.to(ft))
            s, jv, vf = s.flatten(1), jv.flatten(1), v.to(ft).flatten(1)
            terms = _probe_terms(s, jv, vf, xt, zf, sigf, d, order)
    losses = {"dsm1": (sigf[:, None] * s + zf).pow(2).mean(1)}
    fro, tr2, r = terms.pop("dsm2_fro"), terms.pop("dsm2_tr"), terms.pop("r", None)
    losses["dsm2"] = {"both": fro + tr2, "frobenius": fro, "trace": tr2}[dsm2_form]
    losses.update(terms)
    info.update(dsm2_fro=fro.detach(), dsm2_tr=tr2.detach())
    if r is not None:
        info["r"] = r  # third-order residual [B, D] (detached), E[r | x_t] = 0 at the truth
    return (losses, info) if return_info else losses


def _probe_terms(s, jv, v, x, z, sigma, d, order):
    """Hutchinson estimates of the dsm2/dsm3 terms with one Rademacher probe v (vᵀv = D)."""
    c = z + sigma[:, None] * s.detach()
    sig2 = sigma**2
    vjv = (v * jv).sum(1)
    cv = (c * v).sum(1)
    out = {
        "dsm2_fro": (sig2[:, None] * jv + v - cv[:, None] * c).pow(2).sum(1) / d**2,
        "dsm2_tr": ((sig2 * vjv + d - cv**2) / d) ** 2,
    }
    if order == 3:
        grad_vjv = torch.autograd.grad(vjv.sum(), x, create_graph=True)[0].flatten(1)
        vjv_sg, jv_sg = vjv.detach(), jv.detach()
        r = (
            (sigma**3)[:, None] * grad_vjv
            + (cv**2)[:, None] * c
            - (sig2 * vjv_sg + d)[:, None] * c
            - 2 * cv[:, None] * (sig2[:, None] * jv_sg + v)
        )
        out["dsm3"], out["r"] = r.pow(2).sum(1) / d**3, r.detach()
    return out
