"""HOSMObjective, DSMTerms and the split steps of the DSM objective (docs/design.md §3, eqs. 3.1-3.5)."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Mapping

import pytest
import torch

from hosm_lightning.core import DSMTerms, GaussianMixture, HOSMObjective, SubVPSDE, VESDE, VPSDE, dsm_losses, perturb
from hosm_lightning.core.losses import (
    c_vector, dsm1, dsm2_exact, dsm2_hutchinson, dsm3, dsm3_residual_exact, dsm3_residual_hutchinson,
    score_derivatives,
)

MIX = GaussianMixture(
    means=[[1.0, 0.0], [-1.0, 0.5], [0.0, -1.0]],
    variances=[[0.1, 0.2], [0.05, 0.3], [0.2, 0.2]],
    weights=[0.3, 0.3, 0.4],
)


def _toy_net(d=2, seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(d + 1, 16), torch.nn.Tanh(), torch.nn.Linear(16, d))
    return net, lambda x, t: net(torch.cat([x, t[:, None]], 1))


def _assert_same(a, b):
    """Exact equality of two DSMTerms: same keys, same values, same info."""
    assert set(a) == set(b) and set(a.info) == set(b.info)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for k in a.info:
        assert torch.equal(a.info[k], b.info[k]), k


# -- HOSMObjective -----------------------------------------------------------------------------------
SETTINGS = [
    (1, {}),
    (2, {"divergence": "exact", "dsm2_form": "trace"}),
    (3, {"divergence": "hutchinson", "probe_product": "vjp", "eps": 0.01}),
    (3, {"divergence": "auto", "importance_sampling": True, "dsm2_form": "frobenius"}),
]


@pytest.mark.parametrize("order,fields", SETTINGS)
def test_call_equals_dsm_losses_with_the_same_settings(order, fields):
    _, score_fn = _toy_net()
    sde = VPSDE()
    x0 = MIX.sample(16, torch.Generator().manual_seed(0))
    objective = HOSMObjective(lambda2=0.5, lambda3=0.1, **fields)
    ours = objective(score_fn, sde, x0, order, torch.Generator().manual_seed(1))
    ref = dsm_losses(
        score_fn, x0, sde, order=order, eps=fields.get("eps", sde.default_eps), generator=torch.Generator().manual_seed(1),
        divergence=fields.get("divergence", "auto"), dsm2_form=fields.get("dsm2_form", "both"),
        importance=fields.get("importance_sampling", False), probe_product=fields.get("probe_product", "jvp"),
    )
    assert isinstance(ours, DSMTerms)
    _assert_same(ours, ref)


def test_call_passes_pre_drawn_t_z_v():
    _, score_fn = _toy_net()
    g = torch.Generator().manual_seed(3)
    x0 = MIX.sample(8, g)
    t, z = torch.rand(8, generator=g) * 0.9 + 0.05, torch.randn(8, 2, generator=g)
    v = torch.randint(0, 2, (8, 2), generator=g).float() * 2 - 1
    obj = HOSMObjective(divergence="hutchinson")
    ours = obj(score_fn, VESDE(), x0, 3, t=t, z=z, v=v)
    _assert_same(ours, dsm_losses(score_fn, x0, VESDE(), order=3, divergence="hutchinson", t=t, z=z, v=v))
    assert torch.equal(ours.info["t"], t)


def test_eps_none_resolves_to_the_sde_default():
    assert HOSMObjective().eps_for(VPSDE()) == VPSDE.default_eps == 1e-5
    assert HOSMObjective().eps_for(SubVPSDE()) == SubVPSDE.default_eps == 1e-2
    assert HOSMObjective(eps=0.3).eps_for(SubVPSDE()) == 0.3
    # the call uses it: t = eps + u (T - eps) differs between eps = 1e-2 and dsm_losses' own 1e-5
    _, score_fn = _toy_net()
    x0 = MIX.sample(8, torch.Generator().manual_seed(0))
    out = HOSMObjective()(score_fn, SubVPSDE(), x0, 1, torch.Generator().manual_seed(2))
    ref = dsm_losses(score_fn, x0, SubVPSDE(), order=1, eps=1e-2, generator=torch.Generator().manual_seed(2))
    _assert_same(out, ref)
    assert not torch.equal(out.info["t"], dsm_losses(score_fn, x0, SubVPSDE(), order=1,
                                                     generator=torch.Generator().manual_seed(2)).info["t"])


def test_eps_beyond_the_sde_horizon_is_a_clear_error():
    class ShortSDE(VPSDE):
        T = 0.5

    with pytest.raises(ValueError, match=r"model\.objective\.eps must be < T=0\.5"):
        HOSMObjective(eps=0.7).eps_for(ShortSDE())


def test_weighted_is_eq_3_5_by_hand():
    _, score_fn = _toy_net()
    x0 = MIX.sample(16, torch.Generator().manual_seed(0))
    obj = HOSMObjective(lambda2=0.5, lambda3=0.1)
    out = obj(score_fn, VPSDE(), x0, 3, torch.Generator().manual_seed(1))
    torch.testing.assert_close(obj.weighted(out), out["dsm1"] + 0.5 * out["dsm2"] + 0.1 * out["dsm3"], rtol=0, atol=0)
    means = {k: v.mean() for k, v in out.items()}
    means["loss"] = torch.tensor(1e6)  # extra keys are ignored
    torch.testing.assert_close(obj.weighted(means), means["dsm1"] + 0.5 * means["dsm2"] + 0.1 * means["dsm3"],
                               rtol=0, atol=0)
    # only the terms present: order 2 has no dsm3, order 1 is dsm1 itself
    two = {"dsm1": torch.tensor(2.0), "dsm2": torch.tensor(3.0)}
    assert obj.weighted(two).item() == pytest.approx(2.0 + 0.5 * 3.0)
    assert obj.weighted({"dsm1": torch.tensor(2.0)}).item() == 2.0
    assert HOSMObjective(lambda2=0, lambda3=2).weighted({**two, "dsm3": torch.tensor(5.0)}).item() == 12.0
    with pytest.raises(ValueError, match="dsm1"):
        obj.weighted({"dsm2": torch.tensor(1.0)})


@pytest.mark.parametrize(
    "field,value",
    [
        ("lambda2", -1), ("lambda3", -0.5), ("lambda2", float("nan")), ("lambda3", float("inf")), ("lambda2", "1"),
        ("eps", 0.0), ("eps", 1.0), ("eps", -1e-5), ("eps", "small"),
        ("divergence", "foo"), ("dsm2_form", "fro"), ("probe_product", "jacobian"), ("importance_sampling", "yes"),
    ],
)
def test_invalid_fields_name_the_config_key(field, value):
    with pytest.raises(ValueError, match=rf"^model\.objective\.{field} must"):
        HOSMObjective(**{field: value})


def test_fields_are_coerced_validated_once_and_plain_data():
    obj = HOSMObjective(lambda2=1, lambda3=0, eps=1e-3)
    assert type(obj.lambda2) is float and type(obj.lambda3) is float and obj.lambda3 == 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        obj.lambda2 = 3.0
    d = obj.as_dict()
    assert d == {"lambda2": 1.0, "lambda3": 0.0, "eps": 1e-3, "divergence": "auto", "dsm2_form": "both",
                 "probe_product": "jvp", "importance_sampling": False, "dsm3_sigma_cap": None}
    assert HOSMObjective(**d) == obj
    buf = io.BytesIO()
    torch.save({"objective": d}, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["objective"] == d


# -- DSMTerms ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", [1, 2, 3])
def test_dsm_terms_is_a_mapping_with_info(order):
    _, score_fn = _toy_net()
    x0 = MIX.sample(8, torch.Generator().manual_seed(0))
    out = dsm_losses(score_fn, x0, VPSDE(), order=order, generator=torch.Generator().manual_seed(1))
    keys = {"dsm1", "dsm2", "dsm3"} - {f"dsm{k}" for k in range(order + 1, 4)}
    assert isinstance(out, Mapping) and not isinstance(out, dict)
    assert set(out) == keys and len(out) == order and "dsm1" in out and f"dsm{order + 1}" not in out
    assert dict(out.items()) == {k: out[k] for k in keys}
    assert {k: v.shape for k, v in out.items()} == {k: (8,) for k in keys}
    with pytest.raises(KeyError):
        out["dsm4"]
    info_keys = {1: {"t", "sigma"}, 2: {"t", "sigma", "dsm2_fro", "dsm2_tr"}, 3: {"t", "sigma", "dsm2_fro", "dsm2_tr", "r"}}
    assert set(out.info) == info_keys[order]
    if order >= 2:
        torch.testing.assert_close(out.info["dsm2_fro"] + out.info["dsm2_tr"], out["dsm2"].detach(), rtol=0, atol=0)
        assert not out.info["dsm2_fro"].requires_grad and out["dsm2"].requires_grad
    if order == 3:
        assert out.info["r"].shape == (8, 2) and not out.info["r"].requires_grad
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.info = {}
    # a copy: mutating the dict it was built from does not change it
    src = {"dsm1": torch.ones(2)}
    terms = DSMTerms(src)
    src["dsm2"] = torch.ones(2)
    assert set(terms) == {"dsm1"} and terms.info == {}


# -- the split steps against a hand-written reference of (3.1)-(3.4) ----------------------------------
def _reference(mix, sde, x0, t, z, theta, v=None):
    """(3.1)-(3.3) (or (3.4) with a probe v) for s_θ = (1 + θ) ∇log q_t, from the mixture's closed-form
    score, Hessian and ∇ tr Hessian: only J and σ³∇ tr J carry θ-gradient, c = z + σ stopgrad(s)."""
    a, sigma = sde.marginal(t)
    xt = (a[:, None] * x0 + sigma[:, None] * z).requires_grad_(v is not None)
    k = 1 + theta
    s, jac = k * mix.score(xt, t, sde), k * mix.score_jacobian(xt, t, sde)
    d, sg = x0.shape[1], sigma[:, None]
    c = z + sg * s.detach()
    out = {"dsm1": ((sg * s + z) ** 2).mean(1)}
    if v is None:
        trj, gtr = jac.diagonal(dim1=1, dim2=2).sum(-1), k * mix.grad_laplacian(xt, t, sde)
        amat = sg[..., None] ** 2 * jac + torch.eye(d, dtype=x0.dtype) - c[:, :, None] * c[:, None, :]
        out["dsm2"] = (amat**2).sum((1, 2)) / d**2 + ((sigma**2 * trj + d - (c**2).sum(1)) / d) ** 2
        jc = torch.einsum("bij,bj->bi", jac.detach(), c)
        r = sg**3 * gtr + (c**2).sum(1, keepdim=True) * c - (sg**2 * trj.detach()[:, None] + d) * c - 2 * (sg**2 * jc + c)
    else:
        jv = torch.einsum("bij,bj->bi", jac, v)
        vjv = (v * jv).sum(1)
        g3 = torch.autograd.grad(vjv.sum(), xt, create_graph=True)[0]  # ∇ₓ(vᵀJv) of the closed-form Hessian
        cv = (c * v).sum(1, keepdim=True)
        out["dsm2"] = ((sg**2 * jv + v - cv * c) ** 2).sum(1) / d**2 + ((sigma**2 * vjv + d - cv[:, 0] ** 2) / d) ** 2
        r = sg**3 * g3 + cv**2 * c - (sg**2 * vjv.detach()[:, None] + d) * c - 2 * cv * (sg**2 * jv.detach() + v)
    out["dsm3"] = (r**2).sum(1) / d**3
    return out


@pytest.mark.parametrize("mode", ["exact", "hutchinson"])
def test_split_steps_compose_to_the_reference(mode):
    mix, sde = MIX.to(torch.float64), VPSDE()
    g = torch.Generator().manual_seed(5)
    x0 = mix.sample(6, g, dtype=torch.float64)
    theta = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    score_fn = lambda x, tt: (1 + theta) * mix.score(x, tt, sde)  # noqa: E731

    # step 1: the draws are t, then z, from the generator
    p = perturb(x0, sde, 1e-3, torch.Generator().manual_seed(7))
    g2 = torch.Generator().manual_seed(7)
    t = sde.sample_t(6, 1e-3, generator=g2).double()
    z = torch.randn(x0.shape, generator=g2, dtype=torch.float64)
    v = torch.randint(0, 2, x0.shape, generator=g2).double() * 2 - 1 if mode == "hutchinson" else None
    a, sigma = sde.marginal(t)
    assert torch.equal(p.t, t) and torch.equal(p.z, z) and torch.equal(p.sigma, sigma) and torch.equal(p.mean_coef, a)
    torch.testing.assert_close(p.xt, a[:, None] * x0 + sigma[:, None] * z, rtol=0, atol=0)

    # step 2 and 3 by hand
    der = score_derivatives(score_fn, p, 3, mode, v=v)
    c = c_vector(der.s, p.z, p.sigma)
    if mode == "exact":
        fro, tr = dsm2_exact(c, der.jac, der.tr_j, p.sigma)
        r = dsm3_residual_exact(c, der.jac, der.tr_j, der.grad_tr_j, p.sigma)
    else:
        assert torch.equal(der.v, v)
        fro, tr = dsm2_hutchinson(c, der.v, der.jv, der.vjv, p.sigma)
        r = dsm3_residual_hutchinson(c, der.v, der.jv, der.vjv, der.grad_vjv, p.sigma)
    steps = {"dsm1": dsm1(der.s, p.z, p.sigma), "dsm2": fro + tr, "dsm3": dsm3(r)}
    composed = dsm_losses(score_fn, x0, sde, order=3, eps=1e-3, generator=torch.Generator().manual_seed(7), divergence=mode)
    ref = _reference(mix, sde, x0, t, z, theta, v)
    for k in ("dsm1", "dsm2", "dsm3"):
        assert torch.equal(steps[k], composed[k]), k
        torch.testing.assert_close(composed[k], ref[k], rtol=1e-10, atol=1e-12)
        g_ours = torch.autograd.grad(composed[k].sum(), theta, retain_graph=True)[0]
        g_ref = torch.autograd.grad(ref[k].sum(), theta, retain_graph=True)[0]
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-9, atol=1e-12)
    assert all(ref[k].abs().min() > 1e-8 for k in ref)  # no vacuous zero terms


def test_first_order_step_keeps_the_data_shape_and_dtype():
    sde = VESDE()
    x0 = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    p = perturb(x0, sde, 1e-5, torch.Generator().manual_seed(0))
    der = score_derivatives(lambda x, t: -x, p, 1)
    assert der.s.shape == x0.shape and der.mode is None and der.jac is None
    expected = (p.sigma.view(-1, 1, 1, 1) * -p.xt + p.z).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(dsm1(der.s, p.z, p.sigma), expected, rtol=0, atol=0)


def test_perturb_checks_shapes_and_eps():
    x0 = torch.randn(4, 2)
    with pytest.raises(ValueError, match="t must"):
        perturb(x0, VPSDE(), 1e-5, t=torch.rand(3))
    with pytest.raises(ValueError, match="z must"):
        perturb(x0, VPSDE(), 1e-5, z=torch.randn(4, 3))
    with pytest.raises(ValueError, match="eps"):
        perturb(x0, VPSDE(), 0.0)


def test_dsm3_sigma_cap_weights_each_sample_by_its_noise_level():
    """loss = mean over the batch of dsm1 + λ₂ dsm2 + λ₃ min(1, (σ_c/σ)²) dsm3; without a cap it is
    (3.5) of the batch means; σ ≤ σ_c keeps weight 1."""
    _, score_fn = _toy_net()
    x0 = MIX.sample(32, torch.Generator().manual_seed(0))
    plain = HOSMObjective(lambda2=0.5, lambda3=0.1)
    capped = HOSMObjective(lambda2=0.5, lambda3=0.1, dsm3_sigma_cap=1.0)
    out = capped(score_fn, VESDE(), x0, 3, torch.Generator().manual_seed(1))
    sigma = out.info["sigma"]
    assert (sigma > 1).any() and (sigma < 1).any()
    w = torch.where(sigma > 1, 1 / sigma**2, torch.ones_like(sigma))
    by_hand = (out["dsm1"] + 0.5 * out["dsm2"] + 0.1 * w * out["dsm3"]).mean()
    torch.testing.assert_close(capped.loss(out), by_hand)
    torch.testing.assert_close(capped.dsm3_weight(sigma), w)
    assert capped.loss(out) < plain.loss(out)  # large-σ dsm3 weighs less
    means = {k: v.mean() for k, v in out.items()}
    assert torch.equal(plain.loss(out), plain.weighted(means))  # the default path is (3.5) of the means
    # order 2: nothing to weight
    two = capped(score_fn, VESDE(), x0, 2, torch.Generator().manual_seed(1))
    assert torch.equal(capped.loss(two), plain.loss(two))
    for bad in (0, -1.0, float("nan"), "1"):
        with pytest.raises(ValueError, match="model.objective.dsm3_sigma_cap"):
            HOSMObjective(dsm3_sigma_cap=bad)
