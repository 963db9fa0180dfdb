"""The one reference implementation of the DSM equations (docs/design.md §3) that tests compare with.

Written independently of hosm_lightning/core/dsm.py: the full Jacobian J = ∂s/∂x is built row by row
with reverse-mode ``autograd.grad`` loops (the package uses a vmapped forward-mode JVP), and every term
is spelled out with explicit stop-gradients (``.detach()``) exactly where the paper puts them: only J
(dsm2) and σ³ ∇ tr J (dsm3) carry gradient; c = z + σ stopgrad(s).
"""

from __future__ import annotations

import torch


def dsm_terms(score_fn, x0, sde, t, z, v=None, *, transpose: bool = False) -> dict:
    """Per-sample dsm1, dsm2, dsm3 [B] for data x0 [B, D] at times t [B] with noise z [B, D].

    ``v`` None: the exact forms (3.1)-(3.3); a probe v [B, D]: the Hutchinson forms (3.4).
    ``transpose`` uses Jᵀ in place of J (what ``probe_product='vjp'`` estimates with).
    """
    a, sigma = sde.marginal(t)
    xt = (a[:, None] * x0 + sigma[:, None] * z).detach().requires_grad_(True)
    s = score_fn(xt, t)
    d = x0.shape[1]
    rows = [torch.autograd.grad(s[:, i].sum(), xt, create_graph=True)[0] for i in range(d)]
    jac = torch.stack(rows, 1)  # jac[b, i, j] = ∂s_i/∂x_j
    if transpose:
        jac = jac.transpose(1, 2)
    sg, sg2, sg3 = sigma[:, None], sigma[:, None] ** 2, sigma[:, None] ** 3
    c = z + sg * s.detach()
    out = {"dsm1": ((sg * s + z) ** 2).mean(1)}
    if v is None:
        trj = jac.diagonal(dim1=1, dim2=2).sum(-1)
        grad_trj = torch.autograd.grad(trj.sum(), xt, create_graph=True)[0]
        amat = sg2[..., None] * jac + torch.eye(d, dtype=x0.dtype) - c[:, :, None] * c[:, None, :]
        out["dsm2"] = (amat**2).sum((1, 2)) / d**2 + ((sg2[:, 0] * trj + d - (c**2).sum(1)) / d) ** 2
        jc = torch.einsum("bij,bj->bi", jac.detach(), c)
        r = sg3 * grad_trj + (c**2).sum(1, keepdim=True) * c - (sg2 * trj.detach()[:, None] + d) * c - 2 * (sg2 * jc + c)
    else:
        jv = torch.einsum("bij,bj->bi", jac, v)
        vjv = (v * jv).sum(1)
        grad_vjv = torch.autograd.grad(vjv.sum(), xt, create_graph=True)[0]
        cv = (c * v).sum(1, keepdim=True)
        out["dsm2"] = ((sg2 * jv + v - cv * c) ** 2).sum(1) / d**2 + ((sg2[:, 0] * vjv + d - cv[:, 0] ** 2) / d) ** 2
        r = sg3 * grad_vjv + cv**2 * c - (sg2 * vjv.detach()[:, None] + d) * c - 2 * cv * (sg2 * jv.detach() + v)
    out["dsm3"] = (r**2).sum(1) / d**3
    return out
