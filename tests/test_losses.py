"""High-order DSM losses against the exact Gaussian-mixture score (docs/design.md §3)."""

import pytest
import torch

from hosm_lightning.core import GaussianMixture, VESDE, VPSDE, dsm_losses, paper_mog1d

MIX2 = GaussianMixture(
    means=[[1.0, 0.0], [-1.0, 0.5], [0.0, -1.0]],
    variances=[[0.1, 0.2], [0.05, 0.3], [0.2, 0.2]],
    weights=[0.3, 0.3, 0.4],
)


def _perturbed_score(mix, sde, theta):
    """Exact score plus theta * h(x, t) / sigma(t): a smooth perturbation on the ε scale of a net."""

    def fn(x, t):
        h = torch.sin(3 * x) + 0.5 * x.flip(-1) * t[:, None]
        return mix.score(x, t, sde) + theta * h / sde.marginal(t)[1][:, None]

    return fn


def _theta_grad(mix, sde, order, theta0, divergence, chunks=40, n=500, seed=0):
    """d E[dsm_k] / d theta at theta0, from independent chunks: (mean, standard error)."""
    g = torch.Generator().manual_seed(seed)
    grads = []
    for _ in range(chunks):
        theta = torch.tensor(theta0, requires_grad=True)
        div, _, product = divergence.partition("-")
        losses = dsm_losses(_perturbed_score(mix, sde, theta), mix.sample(n, g), sde, order=order, generator=g,
                            divergence=div, probe_product=product or "jvp")
        grads.append(torch.autograd.grad(losses[f"dsm{order}"].mean(), theta)[0])
    grads = torch.stack(grads)
    return grads.mean().item(), grads.std().item() / chunks**0.5


CASES = [
    (paper_mog1d(), VESDE(), "exact"),
    (MIX2, VPSDE(), "exact"),
    (MIX2, VPSDE(), "hutchinson"),
    (MIX2, VPSDE(), "hutchinson-vjp"),
]


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("mix,sde,divergence", CASES, ids=["mog1d-ve-exact", "mix2d-vp-exact", "mix2d-vp-hutch", "mix2d-vp-hutch-vjp"])
def test_dsm_terms_stationary_at_truth(mix, sde, divergence, order):
    """At θ = 0 the score is exact: E[d dsm_k/dθ] = 0. At θ = 0.3 it is clearly not.

    Catches sign and stop-gradient mistakes (a c that carries gradient, a wrong sign in r).
    """
    mean0, se0 = _theta_grad(mix, sde, order, 0.0, divergence)
    assert abs(mean0) < 4 * se0, f"order {order}: gradient at the truth {mean0:.3g} ± {se0:.3g} is not ~0"
    mean1, se1 = _theta_grad(mix, sde, order, 0.3, divergence)
    assert abs(mean1) > 8 * se1, f"order {order}: gradient at theta=0.3 {mean1:.3g} ± {se1:.3g} too small"


def _toy_net(d, seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(d + 1, 32), torch.nn.Tanh(), torch.nn.Linear(32, d))
    return net, lambda x, t: net(torch.cat([x, t[:, None]], 1))


def test_exact_and_hutchinson_identical_in_1d():
    """D = 1: v = ±1, so every probe estimate equals its exact value."""
    _, score_fn = _toy_net(1)
    x0 = paper_mog1d().sample(64, torch.Generator().manual_seed(1))
    a = dsm_losses(score_fn, x0, VESDE(), order=3, generator=torch.Generator().manual_seed(2), divergence="exact")
    b = dsm_losses(score_fn, x0, VESDE(), order=3, generator=torch.Generator().manual_seed(2), divergence="hutchinson")
    for k in ("dsm1", "dsm2", "dsm3"):
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_exact_and_hutchinson_agree_in_expectation_2d():
    """D = 2 with fixed (t, z): averaging probes reproduces the exact Frobenius term and residual r;
    the squared trace estimate has the known bias (A₁₂ + A₂₁)² / D² of Rademacher probes."""
    net, score_fn = _toy_net(2)
    sde, n_pts, n_probe = VPSDE(), 4, 6000
    g = torch.Generator().manual_seed(0)
    x0 = MIX2.sample(n_pts, g)
    t = torch.tensor([0.05, 0.2, 0.5, 0.9])
    z = torch.randn(n_pts, 2, generator=g)
    out = dsm_losses(score_fn, x0, sde, order=3, t=t, z=z, divergence="exact")
    exact, info_e = out, out.info
    rep = lambda a: a.repeat_interleave(n_probe, 0)  # noqa: E731
    out = dsm_losses(score_fn, rep(x0), sde, order=3, t=rep(t), z=rep(z), generator=g, divergence="hutchinson")
    hut, info_h = out, out.info

    def mean_se(a):
        a = a.reshape(n_pts, n_probe, *a.shape[1:])
        return a.mean(1), a.std(1) / n_probe**0.5

    m, se = mean_se(info_h["dsm2_fro"])
    assert ((m - info_e["dsm2_fro"]).abs() < 4 * se + 1e-6).all()
    m, se = mean_se(info_h["r"])
    assert ((m - info_e["r"]).abs() < 4 * se + 1e-5).all()
    # dsm1 has no probe: identical
    torch.testing.assert_close(hut["dsm1"].reshape(n_pts, n_probe)[:, 0], exact["dsm1"])
    # trace form: E_v[(vᵀAv)²] = (tr A)² + (A12 + A21)²
    _, sigma = sde.marginal(t)
    xt = (sde.marginal(t)[0][:, None] * x0 + sigma[:, None] * z).requires_grad_(True)
    jac = torch.stack([torch.autograd.grad(score_fn(xt, t)[:, i].sum(), xt)[0] for i in range(2)], 1)
    c = z + sigma[:, None] * score_fn(xt, t).detach()
    amat = sigma[:, None, None] ** 2 * jac + torch.eye(2) - c[:, :, None] * c[:, None, :]
    expected = info_e["dsm2_tr"] + ((amat[:, 0, 1] + amat[:, 1, 0]) / 2) ** 2
    m, se = mean_se(info_h["dsm2_tr"])
    assert ((m - expected).abs() < 4 * se + 1e-6).all()
    assert (expected > info_e["dsm2_tr"]).all()  # the bias is real, so the check above is not vacuous


def test_dsm1_value_by_hand():
    """dsm1 = mean_D (sigma s + z)^2 at x_t = a x0 + sigma z, for given t, z."""
    sde = VPSDE()
    x0 = torch.randn(5, 3, 2, 2)
    t, z = torch.rand(5) * 0.9 + 0.05, torch.randn(5, 3, 2, 2)
    score_fn = lambda x, tt: -x * (1 + tt.view(-1, 1, 1, 1))  # noqa: E731
    out = dsm_losses(score_fn, x0, sde, order=1, t=t, z=z)
    a, s = (c.view(-1, 1, 1, 1) for c in sde.marginal(t))
    expected = (s * score_fn(a * x0 + s * z, t) + z).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(out["dsm1"], expected)
    assert set(out) == {"dsm1"}


def test_target_identities_hold_for_the_mixture():
    """E[c cᵀ | x_t] = I + sigma² ∇² log q_t and E[r | x_t] = 0 with c = z + sigma ∇log q_t."""
    sde = VPSDE()
    g = torch.Generator().manual_seed(4)
    mix = MIX2.to(torch.float64)
    t = torch.tensor([0.02, 0.1, 0.3], dtype=torch.float64)
    a, sigma = sde.marginal(t)
    xt = a[:, None] * mix.sample(3, g, dtype=torch.float64) + sigma[:, None] * torch.randn(3, 2, generator=g, dtype=torch.float64)
    x0 = mix.posterior_sample(xt, t, sde, 200000, g)  # [n, B, D]
    z = (xt - a[:, None] * x0) / sigma[:, None]
    s, hess = mix.score(xt, t, sde), mix.score_jacobian(xt, t, sde)
    c = z + sigma[:, None] * s
    ccT = torch.einsum("nbi,nbj->nbij", c, c)
    target = torch.eye(2, dtype=torch.float64) + sigma[:, None, None] ** 2 * hess
    se = ccT.std(0) / len(c) ** 0.5
    assert ((ccT.mean(0) - target).abs() < 5 * se + 1e-9).all()
    trh = hess.diagonal(dim1=1, dim2=2).sum(-1)
    hc = torch.einsum("bij,nbj->nbi", hess, c)
    r = (
        sigma[:, None] ** 3 * mix.grad_laplacian(xt, t, sde)
        + (c * c).sum(-1, keepdim=True) * c
        - (sigma**2 * trh + 2)[:, None] * c
        - 2 * (sigma[:, None] ** 2 * hc + c)
    )
    se = r.std(0) / len(r) ** 0.5
    assert (r.mean(0).abs() < 5 * se).all()
    # without the third-derivative term the mean is clearly non-zero: the check has teeth
    r_bad = r - sigma[:, None] ** 3 * mix.grad_laplacian(xt, t, sde)
    assert (r_bad.mean(0).abs() > 10 * se).any()


def test_gradients_reach_all_parameters_image_shaped():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 3, 3, padding=1))
    score_fn = lambda x, t: net(x) / (1 + t.view(-1, 1, 1, 1))  # noqa: E731
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    out = dsm_losses(score_fn, x0, VPSDE(), order=3, generator=torch.Generator().manual_seed(0))
    assert out["dsm3"].shape == (4,) and set(out) == {"dsm1", "dsm2", "dsm3"}
    (out["dsm1"] + out["dsm2"] + out["dsm3"]).mean().backward()
    for p in net.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_high_order_terms_run_in_float32_under_autocast():
    net, score_fn = _toy_net(2)
    x0 = MIX2.sample(16, torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dsm_losses(score_fn, x0, VPSDE(), order=3, generator=torch.Generator().manual_seed(0))
    assert all(v.dtype == torch.float32 for v in out.values())


def test_importance_sampled_times():
    _, score_fn = _toy_net(2)
    x0 = MIX2.sample(256, torch.Generator().manual_seed(0))
    out = dsm_losses(score_fn, x0, VPSDE(), order=1, importance=True, eps=1e-3, generator=torch.Generator().manual_seed(0))
    _, info = out, out.info
    assert info["t"].min() >= 1e-3 and info["t"].max() <= 1.0
    # p(t) ∝ g²/σ² = d/dt log(e^B - 1): the median solves log expm1(B(m)) = mean of the end values
    w = lambda tt: torch.log(torch.expm1(VPSDE().int_beta(tt)))  # noqa: E731
    grid = torch.linspace(1e-3, 1, 100001, dtype=torch.float64)
    median = grid[(w(grid) < 0.5 * (w(grid[0]) + w(grid[-1]))).sum()]
    assert abs(info["t"].median() - median) < 0.06  # ≈ 0.30; U(eps, 1) would give ≈ 0.5
    with pytest.raises(ValueError, match="importance"):
        dsm_losses(score_fn, x0, VESDE(), order=1, importance=True)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"order": 0}, "order"),
        ({"order": 4}, "order"),
        ({"order": 2, "eps": 0.0}, "eps"),
        ({"order": 2, "eps": 1.0}, "eps"),
        ({"order": 2, "divergence": "foo"}, "divergence"),
        ({"order": 2, "dsm2_form": "foo"}, "dsm2_form"),
        ({"order": 2, "probe_product": "foo"}, "probe_product"),
        ({"order": 1, "t": torch.rand(3)}, "t must"),
        ({"order": 1, "z": torch.randn(8, 3)}, "z must"),
        ({"order": 2, "divergence": "hutchinson", "v": torch.ones(8, 3)}, "v must"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    _, score_fn = _toy_net(2)
    with pytest.raises(ValueError, match=match):
        dsm_losses(score_fn, torch.randn(8, 2), VPSDE(), **kwargs)


def test_bad_data_and_score_shapes():
    _, score_fn = _toy_net(2)
    with pytest.raises(ValueError, match="x0"):
        dsm_losses(score_fn, torch.randn(8), VPSDE(), order=1)
    x = torch.randn(8, 2)
    x[3, 1] = float("nan")
    with pytest.raises(ValueError, match="x0"):
        dsm_losses(score_fn, x, VPSDE(), order=1)
    bad = lambda x, t: x.sum(1)  # noqa: E731
    for order in (1, 2, 3):
        with pytest.raises(ValueError, match="score_fn"):
            dsm_losses(bad, torch.randn(8, 2), VPSDE(), order=order)


def _reference_terms(net_fn, x0, sde, t, z, v, mode, transpose=False):
    """Independent reference (full Jacobian by reverse-mode loops) of docs/design.md §3, for D = 2."""
    a, sigma = sde.marginal(t)
    xt = (a[:, None] * x0 + sigma[:, None] * z).requires_grad_(True)
    s = net_fn(xt, t)
    jac = torch.stack([torch.autograd.grad(s[:, i].sum(), xt, create_graph=True)[0] for i in range(2)], 1)
    jac = jac.transpose(1, 2) if transpose else jac  # probe_product='vjp' uses Jᵀ v
    d, sg2, sg3 = 2, sigma[:, None] ** 2, sigma[:, None] ** 3
    c = z + sigma[:, None] * s.detach()
    dsm1 = (sigma[:, None] * s + z).pow(2).mean(1)
    if mode == "exact":
        trj = jac.diagonal(dim1=1, dim2=2).sum(-1)
        g3 = torch.autograd.grad(trj.sum(), xt, create_graph=True)[0]
        amat = sg2[..., None] * jac + torch.eye(2) - c[:, :, None] * c[:, None, :]
        fro = amat.pow(2).sum((1, 2)) / d**2
        tr2 = ((sg2[:, 0] * trj + d - c.pow(2).sum(1)) / d) ** 2
        jc = torch.einsum("bij,bj->bi", jac.detach(), c)
        r = sg3 * g3 + c.pow(2).sum(1, keepdim=True) * c - (sg2 * trj.detach()[:, None] + d) * c - 2 * (sg2 * jc + c)
    else:
        jv = torch.einsum("bij,bj->bi", jac, v)
        vjv = (v * jv).sum(1)
        g3 = torch.autograd.grad(vjv.sum(), xt, create_graph=True)[0]
        cv = (c * v).sum(1, keepdim=True)
        fro = (sg2 * jv + v - cv * c).pow(2).sum(1) / d**2
        tr2 = ((sg2[:, 0] * vjv + d - cv[:, 0] ** 2) / d) ** 2
        r = sg3 * g3 + cv**2 * c - (sg2 * vjv.detach()[:, None] + d) * c - 2 * cv * (sg2 * jv.detach() + v)
    return {"dsm1": dsm1, "dsm2": fro + tr2, "dsm3": r.pow(2).sum(1) / d**3}


@pytest.mark.parametrize("mode,product", [("exact", "jvp"), ("hutchinson", "jvp"), ("hutchinson", "vjp")])
def test_values_and_parameter_gradients_match_reference(mode, product):
    """Values and θ-gradients of every term equal an independent implementation: this pins down
    which factors are stop-gradient (only J in dsm2 and σ³∇tr J in dsm3 carry gradient)."""
    net, score_fn = _toy_net(2, seed=3)
    sde, g = VPSDE(), torch.Generator().manual_seed(1)
    x0 = MIX2.sample(32, g)
    t, z = torch.rand(32, generator=g) * 0.5 + 0.01, torch.randn(32, 2, generator=g)
    v = torch.randint(0, 2, (32, 2), generator=g).float() * 2 - 1
    ours = dsm_losses(score_fn, x0, sde, order=3, t=t, z=z, v=v, divergence=mode, probe_product=product)
    ref = _reference_terms(score_fn, x0, sde, t, z, v, mode, transpose=product == "vjp")
    params = list(net.parameters())
    for k in ("dsm1", "dsm2", "dsm3"):
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-4, atol=1e-6)
        g_ours = torch.autograd.grad(ours[k].sum(), params, retain_graph=True, allow_unused=True)
        g_ref = torch.autograd.grad(ref[k].sum(), params, retain_graph=True, allow_unused=True)
        for p, a, b in zip(params, g_ours, g_ref):
            zero = torch.zeros_like(p)
            torch.testing.assert_close(zero if a is None else a, zero if b is None else b, rtol=1e-4, atol=1e-6)
