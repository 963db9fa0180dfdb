"""The forward SDEs (core/sde.py) against independent float64 closed forms (docs/design.md §2): schedules,
drift, prior and ``resolve_eps``, the one place where eps is chosen. The training times drawn on them are
tested in tests/test_time_sampling.py."""

from __future__ import annotations

import math

import pytest
import torch

from hosm_lightning.core.sde import SDE, SubVPSDE, VESDE, VPSDE, bcast, make_sde

BMIN, BMAX = 0.1, 20.0
SMIN, SMAX = 0.01, 50.0
T_GRID = [1e-5, 1e-3, 0.05, 0.2, 0.5, 0.9, 1.0]


# -- independent float64 references (docs/design.md §2) ------------------------------------------------
def ref_beta(t):
    return BMIN + t * (BMAX - BMIN)


def ref_log_a(t):
    return -0.25 * t**2 * (BMAX - BMIN) - 0.5 * t * BMIN


def ref_vp(t):
    a = torch.exp(ref_log_a(t))
    return a, torch.sqrt(-torch.expm1(2 * ref_log_a(t))), ref_beta(t)


def ref_subvp(t):
    a = torch.exp(ref_log_a(t))
    sigma = -torch.expm1(2 * ref_log_a(t))  # 1 - a^2, no square root
    g2 = ref_beta(t) * -torch.expm1(-2 * BMIN * t - (BMAX - BMIN) * t**2)
    return a, sigma, g2


def ref_ve(t):
    sigma = SMIN * (SMAX / SMIN) ** t
    return torch.ones_like(t), sigma, sigma**2 * 2 * math.log(SMAX / SMIN)


REFS = {"vp": ref_vp, "subvp": ref_subvp, "ve": ref_ve}
SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}


# -- schedules ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_marginal_and_g2_match_closed_forms_float64(name):
    sde = SDES[name]()
    t = torch.tensor(T_GRID, dtype=torch.float64)
    a, sigma = sde.marginal(t)
    a_ref, sigma_ref, g2_ref = REFS[name](t)
    assert a.dtype == torch.float64 and a.shape == t.shape and sigma.shape == t.shape
    torch.testing.assert_close(a, a_ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(sigma, sigma_ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(sde.g2(t), g2_ref, rtol=1e-12, atol=0)


def test_vp_closed_form_spot_values():
    # sanity of the references themselves at t = 1: B(1) = 0.1 + 9.95 = 10.05
    sde = VPSDE()
    a, sigma = sde.marginal(torch.tensor([1.0], dtype=torch.float64))
    assert a.item() == pytest.approx(math.exp(-10.05 / 2), rel=1e-12)
    assert sigma.item() == pytest.approx(math.sqrt(1 - math.exp(-10.05)), rel=1e-12)
    a, sigma = SubVPSDE().marginal(torch.tensor([1.0], dtype=torch.float64))
    assert sigma.item() == pytest.approx(1 - math.exp(-10.05), rel=1e-12)
    _, sigma = VESDE().marginal(torch.tensor([0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(sigma, torch.tensor([SMIN, SMAX], dtype=torch.float64))


def test_vp_std_accurate_in_float32_at_small_t():
    t32 = torch.tensor([1e-5, 3e-5, 1e-4], dtype=torch.float32)
    t64 = t32.double()  # the same time values, evaluated in float64
    _, sigma32 = VPSDE().marginal(t32)
    assert sigma32.dtype == torch.float32
    sigma_ref = torch.sqrt(-torch.expm1(2 * ref_log_a(t64)))
    rel = (sigma32.double() / sigma_ref - 1).abs()
    assert rel.max() < 1e-4, rel
    # the naive float32 formula sqrt(1 - exp(2 log a)) loses ~0.6% here: the test above is meaningful
    naive = torch.sqrt(1 - torch.exp(2 * (-0.25 * t32**2 * (BMAX - BMIN) - 0.5 * t32 * BMIN)))
    assert (naive[0].double() / sigma_ref[0] - 1).abs() > 1e-3


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_variance_ode_consistency_finite_differences(name):
    """Linear drift f = -1/2 beta x: da/dt = -1/2 beta a and d(sigma^2)/dt = -beta sigma^2 + g^2."""
    sde = SDES[name]()
    t = torch.tensor([0.01, 0.05, 0.2, 0.5, 0.8, 0.99], dtype=torch.float64)
    h = 1e-6
    a_p, s_p = sde.marginal(t + h)
    a_m, s_m = sde.marginal(t - h)
    a, sigma = sde.marginal(t)
    da = (a_p - a_m) / (2 * h)
    dvar = (s_p**2 - s_m**2) / (2 * h)
    beta = sde.beta(t)
    if name == "ve":
        assert torch.all(beta == 0)
    else:
        torch.testing.assert_close(beta, ref_beta(t), rtol=1e-12, atol=0)
    torch.testing.assert_close(da, -0.5 * beta * a, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(dvar, -beta * sigma**2 + sde.g2(t), rtol=1e-7, atol=1e-9)


def test_variance_ode_check_detects_wrong_g2():
    # the finite-difference identity is sharp: the VP g^2 does not fit the subVP variance
    sub, vp = SubVPSDE(), VPSDE()
    t = torch.tensor([0.05, 0.3], dtype=torch.float64)
    h = 1e-6
    dvar = (sub.marginal(t + h)[1] ** 2 - sub.marginal(t - h)[1] ** 2) / (2 * h)
    _, sigma = sub.marginal(t)
    wrong = -sub.beta(t) * sigma**2 + vp.g2(t)
    assert ((dvar - wrong).abs() / dvar.abs()).min() > 1e-2


# -- prior and drift ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_prior_logp_matches_torch_normal(name):
    sde = SDES[name]()
    g = torch.Generator().manual_seed(0)
    z = sde.prior_std * torch.randn(5, 3, 2, 2, generator=g, dtype=torch.float64) * 1.3
    std = torch.tensor(sde.prior_std, dtype=torch.float64)
    ref = torch.distributions.Normal(torch.zeros_like(std), std).log_prob(z).sum((1, 2, 3))
    out = sde.prior_logp(z)
    assert out.shape == (5,)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-10)
    expected_std = SMAX if name == "ve" else 1.0
    assert sde.prior_std == expected_std


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_prior_sample_std_and_reproducibility(name):
    sde = SDES[name]()
    x1 = sde.prior_sample((4000, 3, 4, 4), generator=torch.Generator().manual_seed(3))
    x2 = sde.prior_sample((4000, 3, 4, 4), generator=torch.Generator().manual_seed(3))
    x3 = sde.prior_sample((4000, 3, 4, 4), generator=torch.Generator().manual_seed(4))
    assert x1.shape == (4000, 3, 4, 4)
    assert torch.equal(x1, x2)
    assert not torch.equal(x1, x3)
    n = x1.numel()  # 192k values: std of the sample std ~ 1/sqrt(2n) = 0.16%
    std = x1.double().std().item() / sde.prior_std
    assert abs(std - 1) < 0.01
    assert abs(x1.double().mean().item() / sde.prior_std) < 5 / math.sqrt(n)
    x64 = sde.prior_sample((3, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert x64.dtype == torch.float64


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_pf_drift_broadcasts_over_images(name):
    sde = SDES[name]()
    g = torch.Generator().manual_seed(1)
    b = 6
    x = torch.randn(b, 3, 4, 4, generator=g, dtype=torch.float64)
    score = torch.randn(b, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.rand(b, generator=g, dtype=torch.float64)
    _, _, g2 = REFS[name](t)
    beta = torch.zeros_like(t) if name == "ve" else ref_beta(t)
    ref = -0.5 * beta[:, None, None, None] * x - 0.5 * g2[:, None, None, None] * score
    out = sde.pf_drift(x, t, score)
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sde.f(x, t), -0.5 * beta[:, None, None, None] * x, rtol=1e-12, atol=0)
    # per-sample coefficients really differ per sample (not broadcast along a wrong axis)
    assert bcast(t, x).shape == (b, 1, 1, 1)


# -- eps ----------------------------------------------------------------------------------------------
def test_default_eps_per_design():
    assert VPSDE.default_eps == 1e-5 and VESDE.default_eps == 1e-5 and SubVPSDE.default_eps == 1e-2
    assert VPSDE.default_sample_eps == 1e-3 and VESDE.default_sample_eps == 1e-5 and SubVPSDE.default_sample_eps == 1e-2


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_resolve_eps_chooses_the_default_of_the_use(name):
    sde = SDES[name]()
    assert sde.resolve_eps() == sde.resolve_eps(None) == type(sde).default_eps
    assert sde.resolve_eps(sampling=True) == type(sde).default_sample_eps
    for use in (False, True):  # a configured eps is used as given, for training, likelihood and sampling
        out = sde.resolve_eps(0.25, sampling=use)
        assert out == 0.25 and type(out) is float


@pytest.mark.parametrize("eps", [0.0, 1.0, -1e-3, 1.5])
def test_resolve_eps_rejects_times_outside_0_T(eps):
    with pytest.raises(ValueError, match=r"eps must lie in \(0, T=1\.0\) for VPSDE"):
        VPSDE().resolve_eps(eps)
    with pytest.raises(ValueError, match="eps must lie"):
        VESDE().resolve_eps(eps, sampling=True)


def test_resolve_eps_checks_against_the_sde_horizon():
    class ShortSDE(VPSDE):
        T = 0.5

    assert ShortSDE().resolve_eps(0.4) == 0.4
    with pytest.raises(ValueError, match=r"eps must lie in \(0, T=0\.5\) for ShortSDE, got 0\.7"):
        ShortSDE().resolve_eps(0.7)


# -- construction -------------------------------------------------------------------------------------
def test_make_sde_names_and_errors():
    assert type(make_sde("vp")) is VPSDE
    assert type(make_sde("ve")) is VESDE
    assert type(make_sde("subvp")) is SubVPSDE
    assert type(make_sde("sub-VP")) is SubVPSDE
    sde = make_sde("ve", sigma_min=0.02, sigma_max=10.0)
    assert isinstance(sde, SDE) and sde.prior_std == 10.0
    assert make_sde("vp", beta_min=0.2, beta_max=10.0).beta_max == 10.0
    with pytest.raises(ValueError, match="unknown SDE"):
        make_sde("edm")


@pytest.mark.parametrize(
    "ctor,kwargs",
    [
        (VPSDE, dict(beta_min=20.0, beta_max=0.1)),
        (VPSDE, dict(beta_min=1.0, beta_max=1.0)),
        (SubVPSDE, dict(beta_min=5.0, beta_max=1.0)),
        (VPSDE, dict(beta_min=-0.1, beta_max=1.0)),
        (VESDE, dict(sigma_min=0.0, sigma_max=50.0)),
        (VESDE, dict(sigma_min=-1.0, sigma_max=50.0)),
        (VESDE, dict(sigma_min=60.0, sigma_max=50.0)),
    ],
)
def test_bad_constructor_args(ctor, kwargs):
    with pytest.raises(ValueError):
        ctor(**kwargs)
