"""Error-bounded high-order DSM (docs/design.md §3): with a deliberately wrong first-order score
ŝ = ∇log q_t + δ at a fixed x_t, the optima of dsm2 and dsm3 err only through δ.

Conditional expectations over z | x_t come from exact posterior draws of the mixture
(x₀ | x_t, then z = (x_t − a x₀)/σ), many per point, and are compared with the closed forms:

* dsm2: E[c cᵀ | x_t] = I + σ²∇²log q_t + σ²δδᵀ, so σ²J* − σ²∇²log q_t = σ²δδᵀ (Frobenius norm σ²‖δ‖²);
* dsm3: its optimum σ³∇tr J* = E[−‖c‖²c + (σ² tr J + D)c + 2(σ²J + I)c | x_t] errs from σ³∇ tr ∇²log q_t by
  −σ³‖δ‖²δ when J is exact, and by 2σ³‖δ‖²δ when J is the (δ-shifted) dsm2 optimum.
"""

import pytest
import torch

from hosm_lightning.core import VESDE, VPSDE, GaussianMixture

MIX = GaussianMixture([[1.0, 0.5], [-1.0, -0.5], [0.0, 0.0]], [[0.05, 0.1], [0.1, 0.05], [0.3, 0.3]], [0.3, 0.3, 0.4])
N = 400_000


def _posterior_c(sde, x, t, delta):
    """c = z + σ ŝ with ŝ = ∇log q_t(x) + δ, for N posterior draws of z | x_t = x (one point x [1, D])."""
    g = torch.Generator().manual_seed(0)
    x0 = MIX.posterior_sample(x, t, sde, N, generator=g)[:, 0]  # [N, D]
    a, sigma = (float(c) for c in sde.marginal(torch.tensor([t], dtype=torch.float64)))
    z = (x[0] - a * x0) / sigma
    s_hat = MIX.score(x, t, sde)[0] + delta
    return z + sigma * s_hat, sigma


def _se(v):
    return v.std(0) / N**0.5


@pytest.mark.parametrize("sde,t", [(VESDE(), 0.3), (VPSDE(), 0.2)], ids=["VE", "VP"])
def test_dsm2_optimum_errs_by_delta_delta(sde, t):
    x = torch.tensor([[0.4, -0.2]], dtype=torch.float64)
    delta = torch.tensor([0.6, -0.9], dtype=torch.float64)
    c, sigma = _posterior_c(sde, x, t, delta)
    outer = c[:, :, None] * c[:, None, :]
    hess = MIX.score_jacobian(x, t, sde)[0]
    expected = torch.eye(2, dtype=torch.float64) + sigma**2 * hess + sigma**2 * torch.outer(delta, delta)
    assert torch.all((outer.mean(0) - expected).abs() <= 5 * _se(outer.flatten(1)).reshape(2, 2) + 1e-9)
    # with δ = 0 the same draws give the exact target (the test would fail for a wrong shift)
    c0, _ = _posterior_c(sde, x, t, torch.zeros(2, dtype=torch.float64))
    outer0 = (c0[:, :, None] * c0[:, None, :]).mean(0)
    assert torch.allclose(outer0, expected - sigma**2 * torch.outer(delta, delta), atol=6 * float(_se(c0 * c0).max()))
    err = torch.linalg.matrix_norm(outer.mean(0) - torch.eye(2, dtype=torch.float64) - sigma**2 * hess)
    assert float(err) == pytest.approx(sigma**2 * float(delta @ delta), rel=0.05)


@pytest.mark.parametrize("sde,t", [(VESDE(), 0.3), (VPSDE(), 0.2)], ids=["VE", "VP"])
def test_dsm3_optimum_errs_by_delta_cubed(sde, t):
    x = torch.tensor([[0.4, -0.2]], dtype=torch.float64)
    sigma_t = float(sde.marginal(torch.tensor([t], dtype=torch.float64))[1])
    delta = torch.tensor([0.6, -0.9], dtype=torch.float64) / sigma_t  # σδ of order one
    c, sigma = _posterior_c(sde, x, t, delta)
    d = 2
    hess = MIX.score_jacobian(x, t, sde)[0]
    truth = sigma**3 * MIX.grad_laplacian(x, t, sde)[0]
    cc = (c * c).sum(1, keepdim=True)
    cubic = sigma**3 * float(delta @ delta) * delta  # σ³‖δ‖²δ

    def optimum(jac):
        per = -cc * c + (sigma**2 * torch.trace(jac) + d) * c + 2 * c @ (sigma**2 * jac + torch.eye(d)).T
        return per.mean(0), _se(per)

    opt_exact, se1 = optimum(hess)
    assert torch.all((opt_exact - (truth - cubic)).abs() <= 5 * se1), (opt_exact, truth - cubic, se1)
    opt_dsm2, se2 = optimum(hess + torch.outer(delta, delta))
    assert torch.all((opt_dsm2 - (truth + 2 * cubic)).abs() <= 5 * se2), (opt_dsm2, truth + 2 * cubic, se2)
    # the predicted errors are large against the Monte-Carlo error: the check has power
    assert float(cubic.norm()) > 20 * float(se1.max())
