"""Error-bounded high-order DSM (docs/design.md §3): where the package's dsm2 and dsm3 (core/dsm.py
``ExactJacobian``) have their optimum at a fixed x_t, for the true first-order score and for a
deliberately wrong one ŝ = ∇log q_t + δ.

Conditional expectations over z | x_t come from exact posterior draws of the mixture (x₀ | x_t, then
z = (x_t − a x₀)/σ), many per point, and are compared with the closed forms:

* dsm2 is quadratic in J and E[c cᵀ | x_t] = I + σ²∇²log q_t + σ²δδᵀ, so its minimiser (Frobenius and
  trace parts alike) is J* = ∇²log q_t + δδᵀ: the second-order error is σ²‖δ‖² in Frobenius norm;
* dsm3 is quadratic in g = ∇ tr J, minimised where the residual r of (3.3) has E[r | x_t] = 0, i.e. at
  σ³g* = E[−‖c‖²c + (σ² tr J + D)c + 2(σ²J + I)c | x_t]. With δ = 0 and the exact J that is the true
  σ³∇ tr ∇²log q_t; otherwise it errs by −σ³‖δ‖²δ when J is exact and by 2σ³‖δ‖²δ when J is J*.
"""

import pytest
import torch

from hosm_lightning.core import VESDE, VPSDE, GaussianMixture
from hosm_lightning.core.dsm import ExactJacobian

MIX = GaussianMixture([[1.0, 0.5], [-1.0, -0.5], [0.0, 0.0]], [[0.05, 0.1], [0.1, 0.05], [0.3, 0.3]], [0.3, 0.3, 0.4])
N = 400_000
X = torch.tensor([[0.4, -0.2]], dtype=torch.float64)
DELTA = torch.tensor([0.6, -0.9], dtype=torch.float64)
CASES = [(VESDE(), 0.3), (VPSDE(), 0.2)]


def _posterior_c(sde, x, t, delta):
    """c = z + σ ŝ with ŝ = ∇log q_t(x) + δ, for N posterior draws of z | x_t = x (one point x [1, D])."""
    g = torch.Generator().manual_seed(0)
    x0 = MIX.posterior_sample(x, t, sde, N, generator=g)[:, 0]  # [N, D]
    a, sigma = (float(c) for c in sde.marginal(torch.tensor([t], dtype=torch.float64)))
    z = (x[0] - a * x0) / sigma
    s_hat = MIX.score(x, t, sde)[0] + delta
    return z + sigma * s_hat, sigma


def _se(v):
    return v.std(0) / v.shape[0] ** 0.5


def _terms(jac, c, sigma, grad_tr=None) -> ExactJacobian:
    """The package's exact-Jacobian terms with a fixed J [D, D] (and ∇ tr J [D]) for every draw c [N, D]."""
    n, d = c.shape
    jac = jac.expand(n, d, d)
    return ExactJacobian(s=torch.zeros_like(c), jac=jac, tr_j=jac.diagonal(dim1=1, dim2=2).sum(-1),
                         grad_tr_j=None if grad_tr is None else grad_tr.expand(n, d))


def _dsm2_gradient(jac, c, sigma):
    """Per-draw gradient [N, D, D] of the package's dsm2 (Frobenius + trace) with respect to J."""
    n, d = c.shape
    j = jac.expand(n, d, d).clone().requires_grad_(True)
    terms = ExactJacobian(s=torch.zeros_like(c), jac=j, tr_j=j.diagonal(dim1=1, dim2=2).sum(-1))
    fro, tr = terms.dsm2(c, torch.full((n,), sigma, dtype=c.dtype))
    (grad,) = torch.autograd.grad((fro + tr).sum(), j)
    return grad


@pytest.mark.parametrize("sde,t", CASES, ids=["VE", "VP"])
def test_dsm2_optimum_errs_by_delta_delta(sde, t):
    sigma_t = float(sde.marginal(torch.tensor([t], dtype=torch.float64))[1])
    delta = DELTA / sigma_t  # σδ of order one
    c, sigma = _posterior_c(sde, X, t, delta)
    outer = c[:, :, None] * c[:, None, :]
    hess = MIX.score_jacobian(X, t, sde)[0]
    expected = torch.eye(2, dtype=torch.float64) + sigma**2 * hess + sigma**2 * torch.outer(delta, delta)
    assert torch.all((outer.mean(0) - expected).abs() <= 5 * _se(outer.flatten(1)).reshape(2, 2) + 1e-9)
    # with δ = 0 the same draws give the exact target (the test would fail for a wrong shift)
    c0 = c - sigma * delta
    outer0 = (c0[:, :, None] * c0[:, None, :]).mean(0)
    assert torch.allclose(outer0, expected - sigma**2 * torch.outer(delta, delta), atol=6 * float(_se(c0 * c0).max()))
    err = torch.linalg.matrix_norm(outer.mean(0) - torch.eye(2, dtype=torch.float64) - sigma**2 * hess)
    assert float(err) == pytest.approx(sigma**2 * float(delta @ delta), rel=0.05)
    # the package's dsm2 is stationary at J* = ∇²log q_t + δδᵀ, and not at the true Hessian
    grad = _dsm2_gradient(hess + torch.outer(delta, delta), c, sigma)
    assert torch.all(grad.mean(0).abs() <= 5 * _se(grad) + 1e-12), (grad.mean(0), _se(grad))
    grad_h = _dsm2_gradient(hess, c, sigma)
    assert (grad_h.mean(0).abs() > 20 * _se(grad_h)).any()


@pytest.mark.parametrize("sde,t", CASES, ids=["VE", "VP"])
def test_dsm3_optimum_errs_by_delta_cubed(sde, t):
    sigma_t = float(sde.marginal(torch.tensor([t], dtype=torch.float64))[1])
    delta = DELTA / sigma_t  # σδ of order one
    c, sigma = _posterior_c(sde, X, t, delta)
    hess = MIX.score_jacobian(X, t, sde)[0]
    truth = MIX.grad_laplacian(X, t, sde)[0]  # ∇ tr ∇²log q_t
    cubic = float(delta @ delta) * delta  # ‖δ‖²δ: the optimum of σ³g errs by multiples of σ³‖δ‖²δ

    def mean_residual(jac, g):
        r = _terms(jac, c, sigma, g).residual(c, torch.full((c.shape[0],), sigma, dtype=c.dtype))
        return r.mean(0), _se(r)

    # E[r] = 0 (dsm3 is stationary) at the predicted optimum, for the exact J and for the dsm2 optimum J*
    for jac, g in ((hess, truth - cubic), (hess + torch.outer(delta, delta), truth + 2 * cubic)):
        mean, se = mean_residual(jac, g)
        assert torch.all(mean.abs() <= 5 * se), (mean, se)
    # and not at the truth: the predicted errors are large against the Monte-Carlo error
    mean, se = mean_residual(hess, truth)
    assert torch.all(mean.abs() > 20 * se), (mean, se)
    assert sigma**3 * float(cubic.norm()) > 20 * float(se.max())


def test_targets_at_the_true_score():
    """δ = 0 at several points and times: E[c cᵀ | x_t] = I + σ²∇²log q_t and the package's residual has
    E[r | x_t] = 0 with the true J and ∇ tr J (the minimiser of dsm2 and dsm3 is the true score)."""
    sde, n = VPSDE(), 200_000
    g = torch.Generator().manual_seed(4)
    t = torch.tensor([0.02, 0.1, 0.3], dtype=torch.float64)
    a, sigma = sde.marginal(t)
    xt = a[:, None] * MIX.sample(3, g, dtype=torch.float64) + sigma[:, None] * torch.randn(3, 2, generator=g,
                                                                                          dtype=torch.float64)
    x0 = MIX.posterior_sample(xt, t, sde, n, g)  # [n, B, D]
    z = (xt - a[:, None] * x0) / sigma[:, None]
    s, hess, grad_lap = MIX.score(xt, t, sde), MIX.score_jacobian(xt, t, sde), MIX.grad_laplacian(xt, t, sde)
    c = z + sigma[:, None] * s
    cc = torch.einsum("nbi,nbj->nbij", c, c)
    target = torch.eye(2, dtype=torch.float64) + sigma[:, None, None] ** 2 * hess
    assert ((cc.mean(0) - target).abs() < 5 * _se(cc) + 1e-9).all()

    def residual(grad_tr):
        rows = lambda v: v.expand(n, *v.shape).reshape(n * 3, *v.shape[1:])  # noqa: E731  [B, ...] → [n·B, ...]
        terms = ExactJacobian(s=rows(s), jac=rows(hess), tr_j=rows(hess.diagonal(dim1=1, dim2=2).sum(-1)),
                              grad_tr_j=rows(grad_tr))
        return terms.residual(c.reshape(n * 3, 2), rows(sigma)).reshape(n, 3, 2)

    r = residual(grad_lap)
    assert (r.mean(0).abs() < 5 * _se(r)).all()
    # without the third-derivative term the mean is clearly non-zero: the check has teeth
    r_bad = residual(torch.zeros_like(grad_lap))
    assert (r_bad.mean(0).abs() > 10 * _se(r_bad)).any()
