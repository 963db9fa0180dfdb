"""Uniform and truncated-normal dequantization (core/dequantization.py, GitHub issue 12).

Anchors: scipy's truncnorm for log q; closed-form bounds for a Gaussian model; exact discrete
entropies of DiscreteDataModule data under the exact score (closed-form q_eps and the ODE).
"""

from __future__ import annotations

import functools
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import stats

from hosm_lightning.core import VESDE, VPSDE, SubVPSDE, ode_log_likelihood
from hosm_lightning.core.dequantization import (
    bits_per_dim, dequantization_draws, importance_bound, nats_to_bpd, truncnorm_log_prob,
)
from hosm_lightning.data import DiscreteDataModule
from hosm_lightning.lit.evaluation import LikelihoodEvaluator, parse_protocols

from _exact import exact_module  # noqa: E402

LN2 = math.log(2)
SDES = {"vp": (VPSDE, True), "subvp": (SubVPSDE, True), "ve": (VESDE, False)}


def _bytes(n, d=3, seed=0):
    return torch.randint(0, 256, (n, d), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.mark.parametrize("name", list(SDES))
def test_truncated_normal_log_q_matches_scipy_and_stays_in_the_bin(name):
    cls, centered = SDES[name]
    sde, eps = cls(), 1e-3 if name != "subvp" else 1e-2
    x = _bytes(50)
    y, log_q = dequantization_draws(x, centered=centered, dequantization="truncated_normal", num_importance=3,
                                    sde=sde, eps=eps, generator=torch.Generator().manual_seed(1))
    assert y.shape == (3, 50, 3) and log_q.shape == (3, 50)
    a, sigma = (float(c) for c in sde.marginal(torch.tensor([eps], dtype=torch.float64)))
    centre = (2 * x.double() / 255 - 1) if centered else x.double() / 255
    half = (1.0 if centered else 0.5) / 255
    assert ((y.double() / a - centre).abs() <= half * (1 + 1e-5) + 1e-7).all()  # x_eps / a stays in the bin
    tau = a * half / sigma
    ref = stats.truncnorm.logpdf(y.double().numpy(), -tau, tau, loc=(a * centre).numpy(), scale=sigma).sum(-1)
    np.testing.assert_allclose(log_q.numpy(), ref, rtol=1e-6, atol=1e-6)
    # the truncated normal really is one: second moment E n² = 1 − 2τφ(τ)/Z
    n = ((y.double() - a * centre) / sigma).flatten()
    z = math.erf(tau / math.sqrt(2))
    m2 = 1 - 2 * tau * math.exp(-tau * tau / 2) / math.sqrt(2 * math.pi) / z
    assert abs(n.pow(2).mean().item() - m2) < 5 * n.pow(2).std().item() / math.sqrt(n.numel())


def test_truncnorm_log_prob_outside_is_minus_inf():
    out = truncnorm_log_prob(torch.tensor([[0.5, 2.1], [0.1, -0.2]]), tau=2.0, sigma=0.1)
    assert out[0] == -math.inf and torch.isfinite(out[1])


def _gauss(m, s):
    return lambda y: torch.distributions.Normal(m, s).log_prob(y.double()).flatten(1).sum(1)


@pytest.mark.parametrize("centered", [False, True])
def test_bound_of_a_gaussian_model_is_the_closed_form(centered):
    """p_eps = N(m, s²) per dimension: E_q[log p − log q] in closed form (K = 1), both protocols."""
    sde, eps, m, s = VPSDE(), 1e-4, 0.1, 0.3
    k = torch.full((20000, 1), 140, dtype=torch.uint8)
    for proto in ("uniform", "truncated_normal"):
        bpd, info = bits_per_dim(_gauss(m, s), k, centered=centered, dequantization=proto, sde=sde, eps=eps,
                                 generator=torch.Generator().manual_seed(2))
        if proto == "uniform":
            lo = 140 / 256
            w = 1 / 256
            c, var = lo + w / 2, w * w / 12
            c, var, logq = (2 * c - 1, 4 * var, math.log(128)) if centered else (c, var, math.log(256))
            exact = -0.5 * math.log(2 * math.pi * s * s) - ((c - m) ** 2 + var) / (2 * s * s) - logq
        else:
            a, sig = (float(v) for v in sde.marginal(torch.tensor([eps], dtype=torch.float64)))
            xb = 2 * 140 / 255 - 1 if centered else 140 / 255
            tau = a * (1.0 if centered else 0.5) / 255 / sig
            z = math.erf(tau / math.sqrt(2))
            en2 = 1 - 2 * tau * math.exp(-tau * tau / 2) / math.sqrt(2 * math.pi) / z
            e_logp = -0.5 * math.log(2 * math.pi * s * s) - ((a * xb - m) ** 2 + sig * sig * en2) / (2 * s * s)
            e_logq = -0.5 * en2 - 0.5 * math.log(2 * math.pi) - math.log(sig) - math.log(z)
            exact = e_logp - e_logq
        b = info["bound"]
        assert abs(b.mean().item() - exact) < 5 * b.std().item() / math.sqrt(len(b)) + 1e-9, (proto, b.mean(), exact)
        torch.testing.assert_close(bpd.double(), -b / LN2, rtol=0, atol=1e-5)


def test_uniform_k1_is_the_old_formula_and_importance_weighting_is_log_mean_exp():
    x = _bytes(64, d=4, seed=3)
    fn = _gauss(0.0, 0.5)
    bpd, info = bits_per_dim(fn, x, centered=True, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(bpd, nats_to_bpd(info["logp"], 4, True))
    bpd8, info8 = bits_per_dim(fn, x, centered=True, num_importance=8, generator=torch.Generator().manual_seed(4))
    lw = info8["log_w"]
    assert lw.shape == (8, 64)
    torch.testing.assert_close(info8["bound"], torch.logsumexp(lw, 0) - math.log(8))
    assert (info8["bound"] >= lw.mean(0) - 1e-12).all()  # Jensen, per sample
    torch.testing.assert_close(importance_bound(lw[:1], torch.zeros(1, 64)), lw[0])
    # the first of the 8 draws is the K = 1 draw of the same generator
    torch.testing.assert_close(lw[0], info["logp"].double() - 4 * math.log(128))


def test_per_sample_generators_do_not_depend_on_the_batch():
    x = _bytes(6, seed=5)
    sde = VPSDE()
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(6)]  # noqa: E731
    y, lq = dequantization_draws(x, centered=True, dequantization="tn", num_importance=2, sde=sde, eps=1e-5,
                                 generator=gens())
    y2, lq2 = dequantization_draws(x[2:3], centered=True, dequantization="tn", num_importance=2, sde=sde, eps=1e-5,
                                   generator=gens()[2:3])
    torch.testing.assert_close(y[:, 2:3], y2)
    torch.testing.assert_close(lq[:, 2:3], lq2)


def _exact_logp(dist, sde, eps):
    return lambda y: dist.log_prob(y.double(), eps, sde)


@pytest.mark.parametrize("kind", ["discrete", "smooth"])
def test_every_protocol_bounds_the_exact_entropy(kind):
    """Exact q_eps as the model on 2-D 8-bit data: bpd ≥ −log2 P(k)/D (paired, within MC error),
    K = 8 ≤ K = 1; on genuinely discrete data the truncated normal ≪ uniform and ≈ exact."""
    dm = DiscreteDataModule(shape="2d", kind=kind, test_size=1500)
    dm.setup()
    x, dist, sde, eps = dm._test, dm.distribution, VPSDE(), 1e-5
    exact = -dist.log_prob_bytes(x) / (2 * LN2)
    assert abs(exact.mean().item() - dm.entropy_bits) < 4 * exact.std().item() / math.sqrt(len(x))
    res = {}
    for proto, k in (("uniform", 1), ("truncated_normal", 1), ("truncated_normal", 8)):
        bpd, _ = bits_per_dim(_exact_logp(dist, sde, eps), x, centered=True, dequantization=proto, num_importance=k,
                              sde=sde, eps=eps, generator=torch.Generator().manual_seed(6))
        gap = bpd.double() - exact
        se = gap.std().item() / math.sqrt(len(gap))
        assert gap.mean().item() > -4 * se - 1e-4, (proto, k, gap.mean(), se)
        res[(proto, k)] = (bpd.mean().item(), se)
    tn1, tn8 = res[("truncated_normal", 1)], res[("truncated_normal", 8)]
    assert tn8[0] <= tn1[0] + 3 * math.hypot(tn1[1], tn8[1])
    if kind == "discrete":
        assert res[("uniform", 1)][0] > tn1[0] + 1.0  # uniform is loose by > 1 bit/dim here
        assert abs(tn8[0] - exact.mean().item()) < 1e-3  # truncated normal is tight


def test_truncated_normal_tends_to_the_exact_entropy_as_eps_shrinks():
    dm = DiscreteDataModule(shape="1d", kind="discrete", test_size=800)
    dm.setup()
    x, dist, sde = dm._test, dm.distribution, VPSDE()
    exact = (-dist.log_prob_bytes(x) / LN2).mean().item()
    gaps = []
    for eps in (1e-2, 1e-3, 1e-4, 1e-6):
        bpd, _ = bits_per_dim(_exact_logp(dist, sde, eps), x, centered=True, dequantization="tn", num_importance=32,
                              sde=sde, eps=eps, generator=torch.Generator().manual_seed(7))
        gaps.append(bpd.mean().item() - exact)
    assert gaps[-1] < 1e-3 and gaps[0] > gaps[-1]
    assert all(g > -1e-3 for g in gaps), gaps


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_ode_with_the_exact_discrete_score_agrees_with_the_closed_form(sde_name):
    cls, centered = SDES[sde_name]
    sde = cls()
    dm = DiscreteDataModule(shape="1d", kind="discrete", centered=centered, test_size=100)
    dm.setup()
    x, dist = dm._test, dm.distribution
    # tight tolerances: at rtol = 1e-5 the solver occasionally mis-tracks a point near a spike (0.5 bits seen)
    ode = functools.partial(ode_log_likelihood, dist.score_fn(sde), sde, eps=1e-5, divergence="exact", rtol=1e-7, atol=1e-7)
    a, info = bits_per_dim(lambda y: ode(y.double()), x, centered=centered, dequantization="tn", sde=sde, eps=1e-5,
                           generator=torch.Generator().manual_seed(8))
    y, log_q = dequantization_draws(x, centered=centered, dequantization="tn", sde=sde, eps=1e-5,
                                    generator=torch.Generator().manual_seed(8))
    # anchor: the ODE density of the exact score is log q_eps(y) − log q_T(x_T) + log π(x_T) per point
    x_T = info["x_T"].double()
    anchor = dist.log_prob(y[0].double(), 1e-5, sde) - dist.log_prob(x_T, 1.0, sde) + sde.prior_logp(x_T)
    torch.testing.assert_close(a.double(), -(anchor - log_q[0]) / LN2, rtol=0, atol=2e-3)
    b, _ = bits_per_dim(_exact_logp(dist, sde, 1e-5), x, centered=centered, dequantization="tn", sde=sde, eps=1e-5,
                        generator=torch.Generator().manual_seed(8))
    assert (a.double() - b.double()).abs().mean() < 0.05  # the prior mismatch (VE: up to ~0.03 bits here)


def test_bad_inputs_name_the_argument():
    x, fn, sde = _bytes(4), _gauss(0.0, 1.0), VPSDE()
    with pytest.raises(ValueError, match="dequantization"):
        bits_per_dim(fn, x, centered=True, dequantization="gaussian")
    with pytest.raises(ValueError, match="num_importance"):
        bits_per_dim(fn, x, centered=True, num_importance=0)
    with pytest.raises(ValueError, match="sde= and eps="):
        bits_per_dim(fn, x, centered=True, dequantization="truncated_normal")
    with pytest.raises(ValueError, match="eps"):
        bits_per_dim(fn, x, centered=True, dequantization="tn", sde=sde, eps=2.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        bits_per_dim(fn, torch.tensor([[0.5, 1.5]]), centered=True, dequantization="tn", sde=sde, eps=1e-5)
    with pytest.raises(ValueError, match="one generator per sample"):
        bits_per_dim(fn, x, centered=True, generator=[torch.Generator()])
    with pytest.raises(ValueError, match="num_importance"):
        LikelihoodEvaluator(num_importance=0)
    with pytest.raises(ValueError, match="dequantization"):
        LikelihoodEvaluator(dequantization=["uniform", "foo"])
    assert parse_protocols("uniform,tn") == parse_protocols("[uniform, truncated_normal]") == ["uniform", "truncated_normal"]


# -- the evaluator ----------------------------------------------------------------------------------
def _exact_module(dist, sde, centered=True):
    module = exact_module(dist.score_fn(sde), sde, dist.dim, centered)
    module.log = lambda *a, **k: None
    return module


def _fake_trainer(dm):
    return SimpleNamespace(datamodule=dm, world_size=1, global_rank=0, is_global_zero=True, progress_bar_callback=None,
                           strategy=SimpleNamespace(all_gather=lambda t: t))


def test_evaluator_reports_both_protocols_and_writes_them(tmp_path):
    dm = DiscreteDataModule(shape="1d", kind="discrete", test_size=40, eval_batch_size=16)
    dm.setup("test")
    sde = VPSDE()
    logged = {}
    module = _exact_module(dm.distribution, sde)
    module.log = lambda k, v, **kw: logged.__setitem__(k, v)
    ev = LikelihoodEvaluator(dequantization=["uniform", "truncated_normal"], num_importance=2, ode={"divergence": "exact"},
                             per_sample_path=str(tmp_path / "ps.npz"), results_path=str(tmp_path / "res.json"))
    res = ev.evaluate(_fake_trainer(dm), module, "test")
    ev._log(module, "test", res)
    assert res["metric"] == "bpd" and res["dequantization"] == "uniform" and res["num_importance"] == 2
    uni, tn = res["protocols"]["uniform"], res["protocols"]["truncated_normal"]
    assert res["mean"] == uni["mean"] and tn["tag"] == "tn" and tn["num_importance"] == 2
    assert uni["mean"] > tn["mean"] + 0.5 and abs(tn["gap"]) < 5 * tn["gap_se"] + 2e-3
    for tag in ("test/bpd", "test/bpd_se", "test/bpd_uniform", "test/bpd_uniform_se", "test/bpd_tn", "test/bpd_tn_se",
                "test/nfe_tn", "test/bpd_tn_gap"):
        assert tag in logged, tag
    assert logged["test/bpd"] == logged["test/bpd_uniform"] == uni["mean"] and logged["test/bpd_tn"] == tn["mean"]
    saved = json.loads((tmp_path / "res.json").read_text())
    assert saved["protocols"]["truncated_normal"]["num_importance"] == 2
    ps = np.load(tmp_path / "ps.npz")
    assert ps["value_tn"].shape == (40, 1) and np.allclose(ps["value"], ps["value_uniform"])
    assert abs(ps["value_tn"].mean() - tn["mean"]) < 1e-12
    # only the truncated normal: no test/bpd (it means uniform)
    only = LikelihoodEvaluator(dequantization="tn", ode={"divergence": "exact"}, max_samples=8)
    logged.clear()
    r2 = only.evaluate(_fake_trainer(dm), module, "test")
    only._log(module, "test", r2)
    assert "test/bpd_tn" in logged and "test/bpd" not in logged and r2["dequantization"] == "truncated_normal"
