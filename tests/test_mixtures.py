"""Tests of hosm_lightning.core.mixtures: exact densities, derivatives and samplers of diffused mixtures."""

from __future__ import annotations

import math

import pytest
import torch

from hosm_lightning.core.mixtures import GaussianMixture, paper_mog1d
from hosm_lightning.core.sde import VESDE, VPSDE, SubVPSDE

TIMES = [1e-5, 0.3, 1.0]


def mix2d() -> GaussianMixture:
    return GaussianMixture(
        means=[[-1.0, 0.5], [1.0, 1.0], [0.3, -1.2]],
        variances=[[0.1, 0.3], [0.2, 0.05], [0.4, 0.4]],
        weights=[0.2, 0.5, 0.3],
    )


MIXES = {"mix2d": mix2d, "paper1d": paper_mog1d}
SDES = {"vp": VPSDE, "ve": VESDE}


def ref_marginal(name: str, t: float) -> tuple[float, float]:
    """(a, sigma) of docs/design.md §2, written out independently of sde.py."""
    if name == "vp":
        log_a = -0.25 * t * t * (20.0 - 0.1) - 0.5 * t * 0.1
        return math.exp(log_a), math.sqrt(-math.expm1(2 * log_a))
    return 1.0, 0.01 * (50.0 / 0.01) ** t


def points(mix: GaussianMixture, sde_name: str, t: float, n: int, seed: int) -> torch.Tensor:
    """Points spread like q_t, plus a few in the tails (float64, [n + 4, D])."""
    g = torch.Generator().manual_seed(seed)
    a, sigma = ref_marginal(sde_name, t)
    x0 = mix.sample(n, generator=g, dtype=torch.float64)
    xt = a * x0 + sigma * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    scale = math.sqrt(a * a * float(mix.variances.max()) + sigma * sigma)
    tails = torch.tensor([[3.0], [-3.0], [4.5], [-2.2]], dtype=torch.float64).expand(4, mix.dim) * scale
    return torch.cat([xt, tails])


def autograd_derivs(mix, x, t, sde):
    """Score, Hessian and gradient of the Laplacian of log q_t by autograd of ``log_prob``."""
    x = x.clone().requires_grad_(True)
    logq = mix.log_prob(x, t, sde)
    (grad,) = torch.autograd.grad(logq.sum(), x, create_graph=True)
    rows = [torch.autograd.grad(grad[:, i].sum(), x, create_graph=True)[0] for i in range(x.shape[1])]
    hess = torch.stack(rows, 1)  # [B, D, D]; points are independent so batch sums are exact
    (grad_lap,) = torch.autograd.grad(hess.diagonal(dim1=1, dim2=2).sum(), x)
    return grad.detach(), hess.detach(), grad_lap


@pytest.mark.parametrize("mix_name", list(MIXES))
@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("t", TIMES)
def test_log_prob_matches_torch_distributions(mix_name, sde_name, t):
    mix, sde = MIXES[mix_name](), SDES[sde_name]()
    x = points(mix, sde_name, t, 40, seed=0)
    a, sigma = ref_marginal(sde_name, t)
    ref = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(probs=mix.weights),
        torch.distributions.Independent(
            torch.distributions.Normal(a * mix.means, torch.sqrt(a * a * mix.variances + sigma * sigma)), 1
        ),
    )
    out = mix.log_prob(x, t, sde)
    assert out.shape == (x.shape[0],) and out.dtype == torch.float64
    torch.testing.assert_close(out, ref.log_prob(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mix_name", list(MIXES))
@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("t", TIMES)
def test_score_jacobian_grad_laplacian_match_autograd(mix_name, sde_name, t):
    mix, sde = MIXES[mix_name](), SDES[sde_name]()
    x = points(mix, sde_name, t, 40, seed=1)
    grad, hess, grad_lap = autograd_derivs(mix, x, t, sde)
    s = mix.score(x, t, sde)
    h = mix.score_jacobian(x, t, sde)
    gl = mix.grad_laplacian(x, t, sde)
    assert s.shape == x.shape and h.shape == (x.shape[0], mix.dim, mix.dim) and gl.shape == x.shape
    # absolute tolerance relative to the natural size of the k-th derivative, v^(-k/2) with v the
    # smallest component variance of q_t: near t = 1 q_t is almost Gaussian and its third
    # derivatives nearly cancel, so a purely relative check would only measure float64 rounding.
    a, sigma = ref_marginal(sde_name, t)
    v = a * a * float(mix.variances.min()) + sigma * sigma
    for k, (ours, ref) in enumerate(((s, grad), (h, hess), (gl, grad_lap)), start=1):
        torch.testing.assert_close(ours, ref, rtol=1e-8, atol=1e-11 * v ** (-k / 2))
    torch.testing.assert_close(h, h.transpose(1, 2), rtol=0, atol=1e-12 * hess.abs().max().item())


def test_per_point_times_match_scalar_time():
    mix, sde = mix2d(), VPSDE()
    x = points(mix, "vp", 0.5, 5, seed=2)
    t = torch.linspace(0.01, 0.9, x.shape[0], dtype=torch.float64)
    s = mix.score(x, t, sde)
    lp = mix.log_prob(x, t, sde)
    for i in range(x.shape[0]):
        torch.testing.assert_close(s[i], mix.score(x[i : i + 1], float(t[i]), sde)[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lp[i], mix.log_prob(x[i : i + 1], float(t[i]), sde)[0], rtol=1e-12, atol=1e-12)


def test_score_fn_handles_image_shapes():
    g = torch.Generator().manual_seed(0)
    mix = GaussianMixture(torch.randn(3, 4, generator=g, dtype=torch.float64), torch.full((3, 4), 0.3), [1, 2, 3])
    sde = VESDE()
    x = torch.randn(7, 1, 2, 2, generator=g, dtype=torch.float64)
    t = torch.full((7,), 0.2, dtype=torch.float64)
    out = mix.score_fn(sde)(x, t)
    assert out.shape == x.shape
    torch.testing.assert_close(out.reshape(7, 4), mix.score(x.reshape(7, 4), t, sde))


def test_q0_integrates_to_one_in_1d():
    mix = paper_mog1d()
    x = torch.linspace(-8.0, 8.0, 400_001, dtype=torch.float64)[:, None]
    for t, sde in ((None, None), (0.3, VESDE()), (0.3, VPSDE())):
        mass = torch.trapezoid(mix.log_prob(x, t, sde).exp(), x[:, 0]).item()
        assert mass == pytest.approx(1.0, abs=1e-6)
    # sde=None really is q_0 (the diffused density differs)
    x = torch.tensor([[-2.0 / 7]], dtype=torch.float64)
    direct = math.log(sum(w * math.exp(-((-2 / 7 - m) ** 2) / (2 * v)) / math.sqrt(2 * math.pi * v)
                          for w, m, v in zip([0.3, 0.3, 0.4], [-2 / 7, -6 / 7, 4 / 7], [0.1 / 49, 0.1 / 49, 1 / 49])))
    assert mix.log_prob(x).item() == pytest.approx(direct, rel=1e-12)
    assert mix.log_prob(x, 0.3, VESDE()).item() < direct - 0.5


@pytest.mark.parametrize("mix_name", list(MIXES))
def test_sample_moments(mix_name):
    mix = MIXES[mix_name]()
    n = 100_000
    x = mix.sample(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x2 = mix.sample(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert x.shape == (n, mix.dim) and torch.equal(x, x2)
    assert mix.sample(3, generator=torch.Generator().manual_seed(0)).dtype == torch.float32
    w = mix.weights[:, None]
    mean = (w * mix.means).sum(0)
    var = (w * (mix.variances + mix.means**2)).sum(0) - mean**2
    m_hat, v_hat = x.mean(0), x.var(0)
    se_mean = (var / n).sqrt()
    se_var = (((x - mean) ** 2).var(0) / n).sqrt()
    assert ((m_hat - mean).abs() < 5 * se_mean).all(), (m_hat, mean)
    assert ((v_hat - var).abs() < 5 * se_var).all(), (v_hat, var)


@pytest.mark.parametrize("mix_name", list(MIXES))
@pytest.mark.parametrize("sde_name", list(SDES))
def test_posterior_sample_reproduces_tweedie(mix_name, sde_name):
    """E[x0|x_t] = (x_t + σ² s)/a and Cov[x0|x_t] = σ²/a² (I + σ² ∇² log q_t)."""
    mix, sde = MIXES[mix_name](), SDES[sde_name]()
    t = 0.3
    a, sigma = ref_marginal(sde_name, t)
    xt = points(mix, sde_name, t, 3, seed=3)[:4]  # 3 typical points and one tail point
    n = 20_000
    x0 = mix.posterior_sample(xt, t, sde, n, generator=torch.Generator().manual_seed(4))
    assert x0.shape == (n, xt.shape[0], mix.dim)
    s = mix.score(xt, t, sde)
    mean = (xt + sigma**2 * s) / a
    m_hat = x0.mean(0)
    se = x0.std(0) / math.sqrt(n)
    assert ((m_hat - mean).abs() < 5 * se + 1e-12).all(), (m_hat, mean)
    cov = sigma**2 / a**2 * (torch.eye(mix.dim, dtype=torch.float64) + sigma**2 * mix.score_jacobian(xt, t, sde))
    dev = x0 - m_hat
    prod = dev[..., :, None] * dev[..., None, :]  # [n, B, D, D]
    cov_hat, cov_se = prod.mean(0), prod.std(0) / math.sqrt(n)
    assert ((cov_hat - cov).abs() < 5 * cov_se + 1e-12).all(), (cov_hat, cov)
    # the posterior is not the prior: the points pull the mean in different directions
    assert (mean - mean[0]).abs().max() > 10 * se.max()


@pytest.mark.parametrize("mix_name", list(MIXES))
@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE()], ids=["vp", "subvp", "ve"])
@pytest.mark.parametrize("t", [0.05, 0.3])
def test_posterior_mean_and_velocity(mix_name, sde, t):
    """posterior_mean is Tweedie's E[x0|x_t] = (x_t + σ² s)/a (from the score, to rounding), and velocity
    is E[a ε − σ x0 | x_t] with ε = (x_t − a x0)/σ, here by Monte Carlo over posterior_sample (no score)."""
    mix = MIXES[mix_name]()
    a, sigma = (float(c) for c in sde.marginal(torch.tensor([t], dtype=torch.float64)))
    g = torch.Generator().manual_seed(5)
    x0 = mix.sample(3, g, dtype=torch.float64)
    xt = torch.cat([a * x0 + sigma * torch.randn(x0.shape, generator=g, dtype=torch.float64),
                    torch.full((1, mix.dim), 2.5 * a, dtype=torch.float64)])  # and one point in a tail
    tt = torch.full((4,), t, dtype=torch.float64)
    mean = mix.posterior_mean(xt, tt, sde)
    torch.testing.assert_close(mean, (xt + sigma**2 * mix.score(xt, tt, sde)) / a, rtol=1e-10, atol=1e-12)
    n = 20_000
    post = mix.posterior_sample(xt, t, sde, n, generator=torch.Generator().manual_seed(6))
    v = a * (xt - a * post) / sigma - sigma * post  # [n, B, D]
    v_hat, se = v.mean(0), v.std(0) / math.sqrt(n)
    velocity = mix.velocity(xt, tt, sde)
    assert velocity.shape == xt.shape
    assert ((v_hat - velocity).abs() < 5 * se).all(), (v_hat, velocity)
    # the same formula with the prior mean in place of the posterior mean is far off: the check has power
    prior_mean = (mix.weights[:, None] * mix.means).sum(0)
    wrong = a * (xt - a * prior_mean) / sigma - sigma * prior_mean
    assert ((v_hat - wrong).abs() > 10 * se).any()


def test_entropy_paper_mixture_and_single_gaussian():
    assert paper_mog1d().entropy() == pytest.approx(-0.12885, abs=1e-4)
    var = 0.37
    single = GaussianMixture(means=[[0.4]], variances=[[var]])
    assert single.entropy() == pytest.approx(0.5 * math.log(2 * math.pi * math.e * var), abs=1e-8)
    with pytest.raises(ValueError):
        mix2d().entropy()


def test_paper_mixture_parameters():
    mix = paper_mog1d()
    # float64 exact (parameters built in float32 would be off by ~3e-8 relative)
    exact = dict(rtol=1e-15, atol=0)
    torch.testing.assert_close(mix.means[:, 0], torch.tensor([-2.0, -6.0, 4.0], dtype=torch.float64) / 7, **exact)
    torch.testing.assert_close(mix.variances[:, 0], torch.tensor([0.1, 0.1, 1.0], dtype=torch.float64) / 49, **exact)
    torch.testing.assert_close(mix.weights, torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64), **exact)


def test_weights_normalised_and_cast():
    mix = GaussianMixture(means=[[0.0], [1.0]], variances=[1.0, 2.0], weights=[1.0, 3.0])
    torch.testing.assert_close(mix.weights, torch.tensor([0.25, 0.75], dtype=torch.float64))
    m32 = mix.to(torch.float32)
    assert m32.means.dtype == torch.float32 and mix.means.dtype == torch.float64
    x = torch.tensor([[0.3], [2.0]])
    torch.testing.assert_close(m32.log_prob(x), mix.log_prob(x.double()).float())


def test_bad_inputs():
    mix = mix2d()
    with pytest.raises(ValueError, match="shape"):
        mix.log_prob(torch.zeros(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError):
        mix.score(torch.zeros(4, dtype=torch.float64), 0.3, VPSDE())
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture(means=[[0.0], [1.0]], variances=[1.0, 1.0], weights=[-0.5, 1.5])
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture(means=[[0.0], [1.0]], variances=[1.0, 1.0], weights=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="variances"):
        GaussianMixture(means=[[0.0], [1.0]], variances=[1.0, -1.0])
    with pytest.raises(ValueError, match="variances"):
        GaussianMixture(means=[[0.0], [1.0]], variances=[1.0, 0.0])
