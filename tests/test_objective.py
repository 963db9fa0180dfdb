"""The training objective, ``HOSMObjective`` (core/objective.py) on the equations of core/dsm.py and
core/flow.py (docs/design.md §3, eqs. 3.1-3.11).

Every DSM term and its θ-gradients equal the one reference implementation of the DSM equations,
tests/reference.py ``dsm_terms``, and every flow-matching term is its DSM term times a function of t;
then: stationarity at the true score of every loss (DSM, likelihood-weighted, flow matching) and the
failure of i-DODE's probe pairing, exact against Hutchinson estimates, the draws (t, then z, then the
probe v), the per-sample loss (3.5) with the factor of dsm1, the settings and their validation,
precision under autocast, image-shaped data, the time proposals and bad inputs. The time proposals
themselves are tested in tests/test_time_sampling.py.
"""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch

from hosm_lightning.core import GaussianMixture, HOSMObjective, SettingsError, SubVPSDE, VESDE, VPSDE, paper_mog1d
from hosm_lightning.core import time_sampling
from hosm_lightning.core.dsm import ExactJacobian, ProbeProducts, c_vector, dsm1, dsm3, perturb, score_derivatives
from hosm_lightning.nets import ScoreModel, SmallConvNet

from helpers import LinearSigmaSDE
from reference import dsm_terms

MIX = GaussianMixture(
    means=[[1.0, 0.0], [-1.0, 0.5], [0.0, -1.0]],
    variances=[[0.1, 0.2], [0.05, 0.3], [0.2, 0.2]],
    weights=[0.3, 0.3, 0.4],
)
ESTIMATORS = [("exact", "jvp"), ("hutchinson", "jvp"), ("hutchinson", "vjp")]
ESTIMATOR_IDS = ["exact", "hutchinson-jvp", "hutchinson-vjp"]
#: the (weighting, time proposal) pairs that are offered
PAIRS = [("sigma2", "uniform"), ("likelihood", "uniform"), ("likelihood", "importance"), ("likelihood", "velocity")]
PAIR_IDS = [f"{w}-{p}" for w, p in PAIRS]


def _probe(shape, g, dtype=torch.float64):
    return torch.randint(0, 2, shape, generator=g).to(dtype) * 2 - 1


def _draws(n, seed=1, dtype=torch.float64, t_max=0.5):
    """Data from MIX, times in [0.01, 0.01 + t_max], noise and a Rademacher probe, all [n, ...]."""
    g = torch.Generator().manual_seed(seed)
    x0 = MIX.sample(n, g, dtype=dtype)
    t = torch.rand(n, generator=g, dtype=dtype) * t_max + 0.01
    return x0, t, torch.randn(n, 2, generator=g, dtype=dtype), _probe((n, 2), g, dtype)


def _grads(value, params):
    out = torch.autograd.grad(value.sum(), params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, out)]


# -- every term against the reference ---------------------------------------------------------------
@pytest.mark.parametrize("sde", [VPSDE(), VESDE()], ids=["VP", "VE"])
@pytest.mark.parametrize("divergence,product", ESTIMATORS, ids=ESTIMATOR_IDS)
def test_terms_and_parameter_gradients_equal_the_reference(make_net, sde, divergence, product):
    """Values and θ-gradients of dsm1, dsm2, dsm3 equal tests/reference.py: this pins down which factors
    are stop-gradient (only J in dsm2 and σ³∇tr J in dsm3 carry gradient). ``vjp`` estimates with Jᵀ."""
    net = make_net(2, seed=3).double()
    score_fn = ScoreModel(net, sde)
    x0, t, z, v = _draws(32)
    hutchinson = divergence == "hutchinson"
    _, terms = HOSMObjective(divergence=divergence, probe_product=product)(score_fn, sde, x0, 3, t=t, z=z, v=v)
    ref = dsm_terms(score_fn, x0, sde, t, z, v if hutchinson else None, transpose=product == "vjp")
    params = list(net.parameters())
    assert set(terms.terms()) == set(ref) == {"dsm1", "dsm2", "dsm3"}
    for k, ours in terms.terms().items():
        assert ours.shape == (32,) and ref[k].abs().min() > 1e-10, k  # no vacuous zero terms
        torch.testing.assert_close(ours, ref[k], rtol=1e-9, atol=1e-12)
        for a, b in zip(_grads(ours, params), _grads(ref[k], params)):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
    # lower orders compute the same terms from the same draws
    for order in (1, 2):
        _, low = HOSMObjective(divergence=divergence, probe_product=product)(score_fn, sde, x0, order, t=t, z=z, v=v)
        assert set(low.terms()) == {f"dsm{k}" for k in range(1, order + 1)}
        for k, value in low.terms().items():
            torch.testing.assert_close(value, ref[k], rtol=1e-9, atol=1e-12)


def test_vjp_estimates_with_the_transposed_jacobian(make_net):
    """The network's J is not symmetric, so J v and Jᵀ v estimates differ: the test above could not
    pass with the two products swapped."""
    sde = VPSDE()
    score_fn = ScoreModel(make_net(2, seed=3).double(), sde)
    x0, t, z, v = _draws(32)
    jvp = HOSMObjective(divergence="hutchinson")(score_fn, sde, x0, 3, t=t, z=z, v=v)[1]
    vjp = HOSMObjective(divergence="hutchinson", probe_product="vjp")(score_fn, sde, x0, 3, t=t, z=z, v=v)[1]
    assert torch.equal(jvp.dsm1, vjp.dsm1) and torch.equal(jvp.dsm2_tr, vjp.dsm2_tr)  # vᵀJv = vᵀJᵀv
    assert (jvp.dsm2_fro - vjp.dsm2_fro).abs().max() > 1e-6 and (jvp.dsm3 - vjp.dsm3).abs().max() > 1e-6


def test_image_shaped_terms_equal_the_reference_on_flat_data():
    """[B, C, H, W] data: the terms are those of the flattened data (D = C·H·W) with the flattened probe."""
    torch.manual_seed(0)
    sde, shape = VPSDE(), (1, 4, 4)
    score_fn = ScoreModel(SmallConvNet(image_channels=1, image_size=4, channels=8, depth=1).double(), sde)
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(3, *shape, generator=g, dtype=torch.float64) * 2 - 1
    t, z, v = torch.rand(3, generator=g, dtype=torch.float64) * 0.5 + 0.05, torch.randn(x0.shape, generator=g,
                                                                                       dtype=torch.float64), _probe(x0.shape, g)
    _, terms = HOSMObjective()(score_fn, sde, x0, 3, t=t, z=z, v=v)  # 'auto': Hutchinson for D = 16
    flat_fn = lambda x, tt: score_fn(x.reshape(-1, *shape), tt).flatten(1)  # noqa: E731
    ref = dsm_terms(flat_fn, x0.flatten(1), sde, t, z.flatten(1), v.flatten(1))
    assert terms.r.shape == (3, 16)
    for k, ours in terms.terms().items():
        assert ours.dtype == torch.float64
        torch.testing.assert_close(ours, ref[k], rtol=1e-9, atol=1e-12)
    # order 1 evaluates the score on the image-shaped x_t itself
    loss, first = HOSMObjective()(score_fn, sde, x0, 1, t=t, z=z)
    assert set(first.terms()) == {"dsm1"} and loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref["dsm1"], rtol=1e-9, atol=1e-12)


# -- flow matching: the DSM terms in velocity space ----------------------------------------------------
@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE()], ids=["VP", "subVP", "VE"])
@pytest.mark.parametrize("divergence,product", ESTIMATORS, ids=ESTIMATOR_IDS)
def test_flow_terms_are_the_dsm_terms_weighted_in_time(make_net, sde, divergence, product):
    """On the same (t, z, v), with m = a² + σ²: the full part of fm2 is D (m/a)² times the Frobenius part
    of dsm2, its trace part D (m/a)² times the trace part, and fm3 = (m/a)² dsm3, in value and θ-gradient
    (eqs. 3.9-3.11), for the exact and both probe estimates (the same probe)."""
    net = make_net(2, seed=3).double()
    score_fn = ScoreModel(net, sde)
    x0, t, z, v = _draws(32)
    a, sigma = sde.marginal(t)
    factor = ((a * a + sigma * sigma) / a) ** 2
    assert (factor - 1).abs().max() > 0.5  # a weight in t that really differs from 1
    params, d = list(net.parameters()), 2
    for form in ("frobenius", "trace"):
        settings = dict(divergence=divergence, probe_product=product, order2_form=form)
        _, flow = HOSMObjective(higher_order="flow", **settings)(score_fn, sde, x0, 3, t=t, z=z, v=v)
        _, dsm = HOSMObjective(**settings)(score_fn, sde, x0, 3, t=t, z=z, v=v)
        assert set(flow.terms()) == {"dsm1", "fm2", "fm3"} and flow.dsm2 is None and flow.dsm3 is None
        assert torch.equal(flow.dsm1, dsm.dsm1)
        # the score-space record is the same in both modes
        for k in ("dsm2_fro", "dsm2_tr", "r"):
            assert torch.equal(getattr(flow, k), getattr(dsm, k)), k
        for ours, ref in ((flow.fm2, d * factor * dsm.dsm2), (flow.fm3, factor * dsm.dsm3)):
            assert ours.shape == (32,) and ref.abs().min() > 1e-10
            torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12)
            for g_ours, g_ref in zip(_grads(ours, params), _grads(ref, params)):
                torch.testing.assert_close(g_ours, g_ref, rtol=1e-8, atol=1e-12)
        # order 2 computes the same fm2 and no fm3
        _, low = HOSMObjective(higher_order="flow", **settings)(score_fn, sde, x0, 2, t=t, z=z, v=v)
        assert set(low.terms()) == {"dsm1", "fm2"} and low.fm3 is None
        torch.testing.assert_close(low.fm2, flow.fm2, rtol=1e-12, atol=0)


# -- stationarity at the true score -----------------------------------------------------------------
def _theta_grads(mix, sde, theta0, n, order=3, seed=0, scale="eps", **settings):
    """d/dθ of every term of ``HOSMObjective(**settings)`` and of its per-sample loss ('loss') at θ0:
    {name: (mean, standard error)} over n samples.

    The score is exact plus θ h(x, t) f(t), a smooth perturbation on the ε scale of a net (f = 1/σ:
    ε̂ − ε* = θ h) or, with ``scale='velocity'``, on the v scale (f = a/(σ (a² + σ²)): v̂ − v* = −θ h).
    One θ_i per sample: the gradient with respect to θ_i is sample i's own, so one batch gives the mean
    and its standard error."""
    g = torch.Generator().manual_seed(seed)
    x0 = mix.sample(n, g)
    theta = torch.full((n,), theta0, requires_grad=True)

    def score_fn(x, t):
        h = torch.sin(3 * x) + 0.5 * x.flip(-1) * t[:, None]
        a, sigma = sde.marginal(t)
        f = 1 / sigma if scale == "eps" else a / (sigma * (a * a + sigma * sigma))
        return mix.score(x, t, sde) + theta[:, None] * h * f[:, None]

    loss, terms = HOSMObjective(**settings)(score_fn, sde, x0, order, g)
    out = {}
    for k, value in {**terms.terms(), "loss": loss}.items():
        (grad,) = torch.autograd.grad(value.sum(), theta, retain_graph=True)
        out[k] = (grad.mean().item(), grad.std().item() / n**0.5)
    return out


def _assert_stationary(at_truth, away):
    """Every gradient is ~0 at the truth (|mean| < 4 s.e.) and clearly not at θ = 0.3 (> 8 s.e.)."""
    assert set(at_truth) == set(away)
    for k, (mean0, se0) in at_truth.items():
        assert abs(mean0) < 4 * se0, f"{k}: gradient at the truth {mean0:.3g} ± {se0:.3g} is not ~0"
        mean1, se1 = away[k]
        assert abs(mean1) > 8 * se1, f"{k}: gradient at theta=0.3 {mean1:.3g} ± {se1:.3g} too small"


STATIONARY_CASES = [  # the 1-D case needs more samples for the same power at θ = 0.3
    (paper_mog1d(), VESDE(), "exact", "jvp", 20_000),
    (MIX, VPSDE(), "exact", "jvp", 5_000),
    (MIX, VPSDE(), "hutchinson", "jvp", 5_000),
    (MIX, VPSDE(), "hutchinson", "vjp", 5_000),
]


@pytest.mark.parametrize("mix,sde,divergence,product,n", STATIONARY_CASES,
                         ids=["mog1d-ve-exact", "mix2d-vp-exact", "mix2d-vp-hutchinson", "mix2d-vp-hutchinson-vjp"])
def test_terms_are_stationary_at_the_true_score(mix, sde, divergence, product, n):
    """At θ = 0 the score is exact: E[d dsm_k/dθ] = 0 for every order k. At θ = 0.3 it is clearly not.

    Catches sign and stop-gradient mistakes (a c that carries gradient, a wrong sign in r).
    """
    settings = dict(divergence=divergence, probe_product=product)
    at_truth = _theta_grads(mix, sde, 0.0, n, **settings)
    assert set(at_truth) == {"dsm1", "dsm2", "dsm3", "loss"}
    _assert_stationary(at_truth, _theta_grads(mix, sde, 0.3, n, **settings))


@pytest.mark.parametrize("proposal", ["uniform", "importance", "velocity"])
@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE()], ids=["VP", "subVP", "VE"])
def test_likelihood_weighted_first_order_loss_is_stationary_at_the_true_score(sde, proposal):
    """The per-sample loss weight1 · dsm1 of the likelihood weighting (order 1), for t from each proposal.

    A weight that depends on t only keeps E[d dsm1/dθ | t] = 0 at the truth; the weights make the
    estimate heavy-tailed, so: with 'uniform' the factor is g²/σ² ~ 1/t, and eps = 1e-3 (at 1e-5 the few
    samples near eps make the standard error too large to show the gradient at θ = 0.3); with 'velocity'
    the factor ((a² + σ²)/a)² is largest where that proposal rarely draws, so the perturbation is on the
    v scale, where it is bounded there."""
    settings = dict(weighting="likelihood", time_proposal=proposal, eps=1e-3 if proposal == "uniform" else None)
    scale = "velocity" if proposal == "velocity" else "eps"
    at_truth = _theta_grads(MIX, sde, 0.0, 20_000, order=1, scale=scale, **settings)
    assert set(at_truth) == {"dsm1", "loss"}
    _assert_stationary(at_truth, _theta_grads(MIX, sde, 0.3, 20_000, order=1, scale=scale, **settings))


FLOW_STATIONARY_CASES = [  # (mixture, divergence, probe product, time proposal, n) under VP
    (paper_mog1d(), "exact", "jvp", "uniform", 20_000),
    (MIX, "exact", "jvp", "uniform", 5_000),
    (MIX, "hutchinson", "jvp", "uniform", 5_000),
    (MIX, "hutchinson", "vjp", "uniform", 5_000),
    (MIX, "exact", "jvp", "velocity", 5_000),
]


@pytest.mark.parametrize("mix,divergence,product,proposal,n", FLOW_STATIONARY_CASES,
                         ids=["mog1d-exact", "mix2d-exact", "mix2d-hutchinson", "mix2d-hutchinson-vjp",
                              "mix2d-exact-velocity-proposal"])
def test_flow_terms_are_stationary_at_the_true_score(mix, divergence, product, proposal, n):
    """fm2 and fm3 (and the loss with them) under VP: the σ² weighting with uniform t, and i-DODE's
    setting (likelihood weighting, velocity proposal, perturbation on the v scale as above)."""
    settings = dict(higher_order="flow", divergence=divergence, probe_product=product)
    if proposal == "velocity":
        settings.update(weighting="likelihood", time_proposal="velocity", scale="velocity")
    at_truth = _theta_grads(mix, VPSDE(), 0.0, n, **settings)
    assert set(at_truth) == {"dsm1", "fm2", "fm3", "loss"}
    _assert_stationary(at_truth, _theta_grads(mix, VPSDE(), 0.3, n, **settings))


#: two components offset along the diagonal: the off-diagonal of the score Jacobian is >= 0 everywhere
DIAGONAL_MIX = GaussianMixture(means=[[1.0, 1.0], [-1.0, -1.0]], variances=0.05)


def test_idode_probe_pairing_is_not_stationary_at_the_true_score():
    """fm2's trace part with one probe p: ours pairs pᵀ∂v̂p with (uᵀp)², i-DODE's with the exact ||u||².

    With B = σ ∂v̂ − a I and the truth's E[a u uᵀ/m | x_t] = −B, ours averages to zero given (x_t, p);
    i-DODE's to pᵀBp − tr B = Σ_{i≠j} B_ij p_i p_j, so its θ-gradient has mean (2/D) Σ_{i≠j} B_ij (K_ij + K_ji)
    with K = σ ∂_θ ∂v̂. The perturbation θ x.flip/σ (on the ε scale) has ∂_θ J = [[0, 1], [1, 0]]/σ, so
    K₁₂ = K₂₁ = −σ m/a, B₁₂ = −(σ² m/a) J₁₂ and the mean is 4 σ³ m² J₁₂ / a² (D = 2), J = ∇² log q_t: not
    zero for DIAGONAL_MIX. Both terms are computed here from (3.9); ours is the objective's fm2."""
    sde, mix, n, d = VPSDE(), DIAGONAL_MIX, 5000, 2
    g = torch.Generator().manual_seed(0)
    x0 = mix.sample(n, g, dtype=torch.float64)
    t = 1e-3 + (1 - 1e-3) * torch.rand(n, generator=g, dtype=torch.float64)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    p = _probe((n, d), g)
    theta = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    a, sigma = sde.marginal(t)
    m = a * a + sigma * sigma
    col = lambda c: c[:, None]  # noqa: E731

    def score_fn(x, tt):
        return mix.score(x, tt, sde) + col(theta) * x.flip(-1) / col(sde.marginal(tt)[1])

    xt = col(a) * x0 + col(sigma) * z
    v_hat = lambda x: -(col(m * sigma) * score_fn(x, t) + col(sigma) * x) / col(a)  # noqa: E731
    v_hat_xt, dv_p = torch.func.jvp(v_hat, (xt,), (p,))
    p_dv_p = (p * dv_p).sum(1)
    u = (col(a) * z - col(sigma) * x0 - v_hat_xt).detach()
    ours = (sigma * p_dv_p - a * (d - (u * p).sum(1) ** 2 / m)) ** 2 / d
    idode = (sigma * p_dv_p - a * (d - (u * u).sum(1) / m)) ** 2 / d
    _, terms = HOSMObjective(divergence="hutchinson", higher_order="flow", order2_form="trace")(
        score_fn, sde, x0, 2, t=t, z=z, v=p)
    torch.testing.assert_close(terms.fm2, ours, rtol=1e-9, atol=1e-12)

    def mean_se(grad):
        return grad.mean().item(), grad.std().item() / n**0.5

    grad = lambda value: torch.autograd.grad(value.sum(), theta, retain_graph=True)[0]  # noqa: E731
    mean, se = mean_se(grad(terms.fm2))
    assert abs(mean) < 4 * se, f"ours: {mean:.3g} ± {se:.3g}"
    mean, se = mean_se(grad(idode))
    assert mean > 8 * se, f"i-DODE's: {mean:.3g} ± {se:.3g}"
    j12 = mix.score_jacobian(xt, t, sde)[:, 0, 1]
    assert (j12 >= 0).all()
    # and the bias is the one derived above
    mean, se = mean_se(grad(idode) - 4 * sigma**3 * m**2 * j12 / a**2)
    assert abs(mean) < 4 * se, f"i-DODE's minus its predicted bias: {mean:.3g} ± {se:.3g}"


# -- exact against Hutchinson -----------------------------------------------------------------------
def test_exact_and_hutchinson_identical_in_1d(make_net):
    """D = 1: v = ±1, so every probe estimate equals its exact value."""
    sde = VESDE()
    score_fn = ScoreModel(make_net(1), sde)
    x0 = paper_mog1d().sample(64, torch.Generator().manual_seed(1))
    _, a = HOSMObjective(divergence="exact")(score_fn, sde, x0, 3, torch.Generator().manual_seed(2))
    _, b = HOSMObjective(divergence="hutchinson")(score_fn, sde, x0, 3, torch.Generator().manual_seed(2))
    for k in ("dsm1", "dsm2", "dsm3"):
        torch.testing.assert_close(a.terms()[k], b.terms()[k], rtol=1e-4, atol=1e-6)


def test_exact_and_hutchinson_agree_in_expectation_2d(make_net):
    """D = 2 with fixed (t, z): averaging probes reproduces the exact Frobenius term and residual r;
    the squared trace estimate has the known bias (A₁₂ + A₂₁)² / D² of Rademacher probes."""
    sde, n_pts, n_probe = VPSDE(), 4, 6000
    score_fn = ScoreModel(make_net(2), sde)
    g = torch.Generator().manual_seed(0)
    x0 = MIX.sample(n_pts, g)
    t = torch.tensor([0.05, 0.2, 0.5, 0.9])
    z = torch.randn(n_pts, 2, generator=g)
    _, exact = HOSMObjective(divergence="exact")(score_fn, sde, x0, 3, t=t, z=z)
    rep = lambda a: a.repeat_interleave(n_probe, 0)  # noqa: E731
    _, hut = HOSMObjective(divergence="hutchinson")(score_fn, sde, rep(x0), 3, g, t=rep(t), z=rep(z))

    def mean_se(a):
        a = a.reshape(n_pts, n_probe, *a.shape[1:])
        return a.mean(1), a.std(1) / n_probe**0.5

    m, se = mean_se(hut.dsm2_fro)
    assert ((m - exact.dsm2_fro).abs() < 4 * se + 1e-6).all()
    m, se = mean_se(hut.r)
    assert ((m - exact.r).abs() < 4 * se + 1e-5).all()
    # dsm1 has no probe: identical
    torch.testing.assert_close(hut.dsm1.reshape(n_pts, n_probe)[:, 0], exact.dsm1)
    # trace form: E_v[(vᵀAv)²] = (tr A)² + (A12 + A21)², A = σ²J + I − c cᵀ
    a, sigma = sde.marginal(t)
    xt = (a[:, None] * x0 + sigma[:, None] * z).requires_grad_(True)
    s = score_fn(xt, t)
    jac = torch.stack([torch.autograd.grad(s[:, i].sum(), xt, retain_graph=True)[0] for i in range(2)], 1)
    c = z + sigma[:, None] * s.detach()
    amat = sigma[:, None, None] ** 2 * jac + torch.eye(2) - c[:, :, None] * c[:, None, :]
    expected = exact.dsm2_tr + ((amat[:, 0, 1] + amat[:, 1, 0]) / 2) ** 2
    m, se = mean_se(hut.dsm2_tr)
    assert ((m - expected).abs() < 4 * se + 1e-6).all()
    assert (expected > exact.dsm2_tr).all()  # the bias is real, so the check above is not vacuous


def test_auto_divergence_is_exact_up_to_four_dimensions(make_net):
    sde, g = VPSDE(), lambda: torch.Generator().manual_seed(4)  # noqa: E731
    for d, same_as in ((2, "exact"), (4, "exact"), (5, "hutchinson")):
        score_fn = ScoreModel(make_net(d), sde)
        x0 = torch.randn(8, d, generator=torch.Generator().manual_seed(0))
        _, auto = HOSMObjective()(score_fn, sde, x0, 3, g())
        for divergence in ("exact", "hutchinson"):
            _, other = HOSMObjective(divergence=divergence)(score_fn, sde, x0, 3, g())
            same = all(torch.equal(auto.terms()[k], other.terms()[k]) for k in ("dsm2", "dsm3"))
            assert same == (divergence == same_as), (d, divergence)


# -- draws -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weighting,proposal,higher_order", [("sigma2", "uniform", "dsm"),
                                                             ("likelihood", "importance", "dsm"),
                                                             ("likelihood", "velocity", "flow")])
def test_draws_are_t_then_z_then_the_probe(make_net, weighting, proposal, higher_order):
    sde = VPSDE()
    score_fn = ScoreModel(make_net(2).double(), sde)
    x0 = MIX.sample(8, torch.Generator().manual_seed(0), dtype=torch.float64)
    objective = HOSMObjective(divergence="hutchinson", eps=1e-3, weighting=weighting, time_proposal=proposal,
                              higher_order=higher_order)
    loss, drawn = objective(score_fn, sde, x0, 3, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    t = time_sampling.sample_t(sde, proposal, 8, 1e-3, g)
    z = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    v = _probe(x0.shape, g)
    pre_loss, given = objective(score_fn, sde, x0, 3, t=t, z=z, v=v)
    assert torch.equal(drawn.t, t.double()) and torch.equal(given.t, t.double())
    assert torch.equal(loss, pre_loss)
    for k in (*drawn.terms(), "weight1", "dsm2_fro", "dsm2_tr", "r"):
        assert torch.equal(getattr(drawn, k), getattr(given, k)), k
    # pre-drawn t and z skip their draws: the generator's first draw is then the probe
    _, probe_only = objective(score_fn, sde, x0, 3, torch.Generator().manual_seed(7), t=t, z=z)
    ref = dsm_terms(score_fn, x0, sde, t.double(), z, _probe(x0.shape, torch.Generator().manual_seed(7)))
    torch.testing.assert_close(probe_only.dsm1, ref["dsm1"], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(probe_only.dsm2_fro + probe_only.dsm2_tr, ref["dsm2"], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(probe_only.r.pow(2).sum(1) / 8, ref["dsm3"], rtol=1e-9, atol=1e-12)
    assert not torch.equal(probe_only.dsm2_tr, given.dsm2_tr)


def test_perturb_is_a_x0_plus_sigma_z():
    sde = VPSDE()
    x0 = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    t = torch.tensor([1e-5, 0.3, 1.0])
    z = torch.randn(x0.shape, dtype=torch.float64)
    p = perturb(x0, sde, t, z)
    a, sigma = sde.marginal(t.double())
    assert p.t.dtype == torch.float64 and torch.equal(p.sigma, sigma) and torch.equal(p.mean_coef, a)
    torch.testing.assert_close(p.xt, a.view(-1, 1, 1, 1) * x0 + sigma.view(-1, 1, 1, 1) * z, rtol=0, atol=0)


@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_the_steps_of_core_dsm_compose_to_the_objective(make_net, divergence):
    """perturb → score_derivatives → c_vector → the terms' own dsm2 / residual → dsm1, dsm3 is the objective."""
    sde = VESDE()
    score_fn = ScoreModel(make_net(2).double(), sde)
    x0, t, z, v = _draws(6, seed=5)
    p = perturb(x0, sde, t, z)
    der = score_derivatives(score_fn, p, 3, divergence, v=v)
    assert isinstance(der, ExactJacobian if divergence == "exact" else ProbeProducts)
    c = c_vector(der.s, p.z, p.sigma)
    fro, tr = der.dsm2(c, p.sigma)
    _, terms = HOSMObjective(divergence=divergence, order2_form="both")(score_fn, sde, x0, 3, t=t, z=z, v=v)
    assert torch.equal(dsm1(der.s, p.z, p.sigma), terms.dsm1)
    assert torch.equal(fro + tr, terms.dsm2)
    assert torch.equal(dsm3(der.residual(c, p.sigma)), terms.dsm3)


# -- the loss (3.5) and the terms' record ------------------------------------------------------------
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("lambda2,lambda3", [(0.5, 0.1), (0.0, 2.0)])
def test_loss_is_eq_3_5_per_sample(make_net, order, lambda2, lambda3):
    sde = VPSDE()
    score_fn = ScoreModel(make_net(2), sde)
    x0 = MIX.sample(16, torch.Generator().manual_seed(0))
    loss, terms = HOSMObjective(lambda2=lambda2, lambda3=lambda3)(score_fn, sde, x0, order,
                                                                  torch.Generator().manual_seed(1))
    expected = terms.dsm1.clone()
    if order >= 2:
        expected = expected + lambda2 * terms.dsm2
    if order == 3:
        expected = expected + lambda3 * terms.dsm3
    assert loss.shape == (16,) and loss.requires_grad
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    assert (terms.dsm2 is None) == (order < 2) and (terms.dsm3 is None) == (order < 3)
    if lambda2 > 0 and order >= 2 or order == 3:  # the weighted terms really are there
        assert (loss > terms.dsm1).all()


@pytest.mark.parametrize("order", [1, 2, 3])
def test_flow_loss_is_weighted_dsm1_plus_the_flow_terms(make_net, order):
    """loss = weight1 dsm1 + λ₂ fm2 + λ₃ w(σ) fm3 per sample, here with the velocity proposal's factor."""
    sde = VPSDE()
    score_fn = ScoreModel(make_net(2), sde)
    x0 = MIX.sample(16, torch.Generator().manual_seed(0))
    objective = HOSMObjective(lambda2=0.5, lambda3=0.1, weighting="likelihood", time_proposal="velocity",
                              higher_order="flow", dsm3_sigma_cap=0.02)  # this proposal draws mostly σ < 0.2
    loss, terms = objective(score_fn, sde, x0, order, torch.Generator().manual_seed(1))
    expected = terms.weight1 * terms.dsm1
    if order >= 2:
        expected = expected + 0.5 * terms.fm2
    if order == 3:
        expected = expected + 0.1 * objective.dsm3_weight(terms.sigma) * terms.fm3
    assert loss.shape == (16,) and loss.requires_grad
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    assert list(terms.terms()) == ["dsm1", "fm2", "fm3"][:order]
    assert terms.dsm2 is None and terms.dsm3 is None
    assert (terms.weight1 > 1).all()  # ((a² + σ²)/a)² = 1/a² for VP
    if order == 3:
        assert (objective.dsm3_weight(terms.sigma) < 1).any()  # the cap weighs fm3 as it weighs dsm3


@pytest.mark.parametrize("weighting,proposal", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE()], ids=["VP", "subVP", "VE"])
def test_weight1_is_the_loss_factor_of_the_weighting_and_proposal(make_net, sde, weighting, proposal):
    """t from the proposal, weight1 = w(t)/p̃(t) of core/time_sampling.py at that t (computed in float64),
    and the order-1 loss is weight1 · dsm1."""
    score_fn = ScoreModel(make_net(2), sde)
    x0 = MIX.sample(64, torch.Generator().manual_seed(0))
    objective = HOSMObjective(eps=1e-3, weighting=weighting, time_proposal=proposal)
    loss, terms = objective(score_fn, sde, x0, 1, torch.Generator().manual_seed(1))
    assert torch.equal(terms.t, time_sampling.sample_t(sde, proposal, 64, 1e-3, torch.Generator().manual_seed(1)))
    expected = time_sampling.loss_factor(sde, weighting, proposal, terms.t.double()).float()
    assert terms.weight1.shape == (64,) and torch.equal(terms.weight1, expected)
    torch.testing.assert_close(loss, terms.weight1 * terms.dsm1, rtol=0, atol=0)
    # the likelihood weighting with its importance proposal is the plain dsm1, as is the σ² weighting
    plain = (weighting, proposal) in (("sigma2", "uniform"), ("likelihood", "importance"))
    assert torch.equal(expected, torch.ones_like(expected)) == plain


def test_dsm3_sigma_cap_weights_each_sample_by_its_noise_level(make_net):
    """loss = dsm1 + λ₂ dsm2 + λ₃ min(1, (σ_c/σ)²) dsm3 per sample; σ ≤ σ_c keeps weight 1."""
    sde = VESDE()
    score_fn = ScoreModel(make_net(2), sde)
    x0 = MIX.sample(32, torch.Generator().manual_seed(0))
    plain = HOSMObjective(lambda2=0.5, lambda3=0.1)
    capped = HOSMObjective(lambda2=0.5, lambda3=0.1, dsm3_sigma_cap=1.0)
    loss, terms = capped(score_fn, sde, x0, 3, torch.Generator().manual_seed(1))
    plain_loss, plain_terms = plain(score_fn, sde, x0, 3, torch.Generator().manual_seed(1))
    sigma = terms.sigma
    assert (sigma > 1).any() and (sigma < 1).any()
    w = torch.where(sigma > 1, 1 / sigma**2, torch.ones_like(sigma))
    torch.testing.assert_close(loss, terms.dsm1 + 0.5 * terms.dsm2 + 0.1 * w * terms.dsm3)
    torch.testing.assert_close(capped.dsm3_weight(sigma), w)
    assert torch.equal(plain.dsm3_weight(sigma), torch.ones_like(sigma))
    assert torch.equal(terms.dsm3, plain_terms.dsm3)  # the cap weighs the term, it does not change it
    assert torch.equal(loss[sigma <= 1], plain_loss[sigma <= 1])
    assert (loss[sigma > 1] < plain_loss[sigma > 1]).all()  # large-σ dsm3 weighs less
    # order 2: nothing to weight
    two = capped(score_fn, sde, x0, 2, torch.Generator().manual_seed(1))[0]
    assert torch.equal(two, plain(score_fn, sde, x0, 2, torch.Generator().manual_seed(1))[0])


@pytest.mark.parametrize("order", [1, 2, 3])
def test_terms_record(make_net, order):
    sde = VPSDE()
    score_fn = ScoreModel(make_net(2), sde)
    x0 = MIX.sample(8, torch.Generator().manual_seed(0))
    _, terms = HOSMObjective()(score_fn, sde, x0, order, torch.Generator().manual_seed(1))
    assert set(terms.terms()) == {f"dsm{k}" for k in range(1, order + 1)}
    assert {k: v.shape for k, v in terms.terms().items()} == {f"dsm{k}": (8,) for k in range(1, order + 1)}
    assert terms.t.shape == terms.sigma.shape == (8,)
    assert torch.equal(terms.weight1, torch.ones(8)) and terms.fm2 is None and terms.fm3 is None
    torch.testing.assert_close(terms.sigma, sde.marginal(terms.t)[1], rtol=0, atol=0)
    assert (terms.dsm2_fro is None) == (order < 2) and (terms.r is None) == (order < 3)
    if order >= 2:
        torch.testing.assert_close(terms.dsm2_fro + terms.dsm2_tr, terms.dsm2.detach(), rtol=0, atol=0)
        assert not terms.dsm2_fro.requires_grad and not terms.dsm2_tr.requires_grad and terms.dsm2.requires_grad
    if order == 3:
        assert terms.r.shape == (8, 2) and not terms.r.requires_grad
        torch.testing.assert_close(terms.r.pow(2).sum(1) / 8, terms.dsm3.detach())  # dsm3 = ‖r‖²/D³
    with pytest.raises(dataclasses.FrozenInstanceError):
        terms.dsm1 = terms.t


@pytest.mark.parametrize("form", ["frobenius", "trace"])
def test_order2_form_selects_a_part_of_eq_3_2(make_net, form):
    sde = VPSDE()
    net = make_net(2)
    score_fn = ScoreModel(net, sde)
    x0 = MIX.sample(16, torch.Generator().manual_seed(0))
    _, both = HOSMObjective(order2_form="both")(score_fn, sde, x0, 2, torch.Generator().manual_seed(1))
    _, part = HOSMObjective(order2_form=form)(score_fn, sde, x0, 2, torch.Generator().manual_seed(1))
    _, other = HOSMObjective(order2_form={"frobenius": "trace", "trace": "frobenius"}[form])(
        score_fn, sde, x0, 2, torch.Generator().manual_seed(1))
    torch.testing.assert_close(part.dsm2.detach(), both.dsm2_fro if form == "frobenius" else both.dsm2_tr,
                               rtol=0, atol=0)
    params = list(net.parameters())
    for a, b, c in zip(_grads(part.dsm2, params), _grads(other.dsm2, params), _grads(both.dsm2, params)):
        torch.testing.assert_close(a + b, c)
    assert not torch.equal(part.dsm2, both.dsm2)


# -- eps and the SDE ---------------------------------------------------------------------------------
def test_eps_none_is_the_sde_default(make_net):
    x0 = MIX.sample(64, torch.Generator().manual_seed(0))
    score_fn_for = lambda sde: ScoreModel(make_net(2), sde)  # noqa: E731
    for sde, eps in ((VPSDE(), 1e-5), (SubVPSDE(), 1e-2)):
        _, terms = HOSMObjective()(score_fn_for(sde), sde, x0, 1, torch.Generator().manual_seed(2))
        assert torch.equal(terms.t, time_sampling.sample_t(sde, "uniform", 64, eps, torch.Generator().manual_seed(2)))
        assert terms.t.min() >= eps
    # the defaults differ, so the check above tells them apart
    assert not torch.equal(time_sampling.sample_t(VPSDE(), "uniform", 64, 1e-5, torch.Generator().manual_seed(2)),
                           time_sampling.sample_t(SubVPSDE(), "uniform", 64, 1e-2, torch.Generator().manual_seed(2)))
    _, terms = HOSMObjective(eps=0.3)(score_fn_for(SubVPSDE()), SubVPSDE(), x0, 1, torch.Generator().manual_seed(2))
    assert terms.t.min() >= 0.3


def test_check_sde():
    HOSMObjective().check_sde(VESDE())
    HOSMObjective(weighting="likelihood").check_sde(LinearSigmaSDE())  # uniform t needs no closed form
    for proposal in ("importance", "velocity"):
        objective = HOSMObjective(weighting="likelihood", time_proposal=proposal)
        for sde in (VPSDE(), SubVPSDE(), VESDE()):
            objective.check_sde(sde)
        with pytest.raises(SettingsError, match=rf"^HOSMObjective\.time_proposal no '{proposal}' time proposal for "
                                                r"LinearSigmaSDE; use time_proposal: uniform$") as err:
            objective.check_sde(LinearSigmaSDE())
        assert (err.value.owner, err.value.field) == ("HOSMObjective", "time_proposal")

    class ShortSDE(VPSDE):
        T = 0.5

    with pytest.raises(ValueError, match=r"eps must lie in \(0, T=0\.5\)"):
        HOSMObjective(eps=0.7).check_sde(ShortSDE())
    with pytest.raises(ValueError, match=r"eps must lie in \(0, T=0\.5\)"):
        HOSMObjective(eps=0.7)(lambda x, t: -x, ShortSDE(), torch.randn(4, 2), 1)


# -- settings ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field,value",
    [
        ("lambda2", -1), ("lambda3", -0.5), ("lambda2", float("nan")), ("lambda3", float("inf")), ("lambda2", "1"),
        ("lambda2", True), ("eps", 0.0), ("eps", 1.0), ("eps", -1e-5), ("eps", "small"),
        ("divergence", "foo"), ("order2_form", "fro"), ("order2_form", None), ("probe_product", "jacobian"),
        ("weighting", "g2"), ("weighting", None), ("time_proposal", "log-snr"), ("time_proposal", True),
        ("higher_order", "velocity"), ("higher_order", 2),
        ("dsm3_sigma_cap", 0), ("dsm3_sigma_cap", -1.0), ("dsm3_sigma_cap", float("nan")), ("dsm3_sigma_cap", "1"),
    ],
)
def test_invalid_fields_raise_a_settings_error_naming_the_field(field, value):
    with pytest.raises(SettingsError, match=rf"^HOSMObjective\.{field} must") as err:
        HOSMObjective(**{field: value})
    assert (err.value.owner, err.value.field) == ("HOSMObjective", field)
    assert isinstance(err.value, ValueError)


def test_fields_are_coerced_validated_once_and_plain_data():
    obj = HOSMObjective(lambda2=1, lambda3=0, eps=1e-3, dsm3_sigma_cap=2, order2_form="trace", weighting="likelihood",
                        time_proposal="velocity", higher_order="flow")
    assert type(obj.lambda2) is float and type(obj.lambda3) is float and obj.lambda3 == 0.0
    assert type(obj.dsm3_sigma_cap) is float
    with pytest.raises(dataclasses.FrozenInstanceError):
        obj.lambda2 = 3.0
    d = obj.as_dict()
    assert d == {"lambda2": 1.0, "lambda3": 0.0, "eps": 1e-3, "divergence": "auto", "order2_form": "trace",
                 "probe_product": "jvp", "weighting": "likelihood", "time_proposal": "velocity",
                 "higher_order": "flow", "dsm3_sigma_cap": 2.0}
    assert HOSMObjective(**d) == obj and HOSMObjective(**{**d, "time_proposal": "importance"}) != obj
    defaults = HOSMObjective().as_dict()
    assert (defaults["weighting"], defaults["time_proposal"], defaults["higher_order"]) == ("sigma2", "uniform", "dsm")
    buf = io.BytesIO()
    torch.save({"objective": d}, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["objective"] == d


# -- precision, images, time proposals -----------------------------------------------------------------
@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_high_order_terms_run_in_float32_under_autocast(make_net, divergence):
    sde = VPSDE()
    score_fn = ScoreModel(make_net(2), sde)
    x0 = MIX.sample(16, torch.Generator().manual_seed(0))
    objective = HOSMObjective(divergence=divergence)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, terms = objective(score_fn, sde, x0, 3, torch.Generator().manual_seed(0))
    assert loss.dtype == torch.float32 and all(v.dtype == torch.float32 for v in terms.terms().values())
    # autocast is off inside: the same numbers as without it (bfloat16 would be ~1e-2 off)
    plain_loss, _ = objective(score_fn, sde, x0, 3, torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("product", ["jvp", "vjp"])
def test_gradients_reach_all_parameters_image_shaped(product):
    torch.manual_seed(0)
    sde = VPSDE()
    net = SmallConvNet(image_channels=3, image_size=8, channels=8, depth=1)
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    loss, terms = HOSMObjective(probe_product=product)(ScoreModel(net, sde), sde, x0, 3,
                                                       torch.Generator().manual_seed(0))
    assert loss.shape == terms.dsm3.shape == (4,) and set(terms.terms()) == {"dsm1", "dsm2", "dsm3"}
    loss.mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_importance_sampled_times(make_net):
    sde = VPSDE()
    score_fn = ScoreModel(make_net(2), sde)
    x0 = MIX.sample(256, torch.Generator().manual_seed(0))
    objective = HOSMObjective(weighting="likelihood", time_proposal="importance", eps=1e-3)
    _, terms = objective(score_fn, sde, x0, 1, torch.Generator().manual_seed(0))
    assert terms.t.min() >= 1e-3 and terms.t.max() <= 1.0
    # p(t) ∝ g²/σ² = d/dt log(e^B - 1): the median solves log expm1(B(m)) = mean of the end values
    w = lambda tt: torch.log(torch.expm1(sde.int_beta(tt)))  # noqa: E731
    grid = torch.linspace(1e-3, 1, 100001, dtype=torch.float64)
    median = grid[(w(grid) < 0.5 * (w(grid[0]) + w(grid[-1]))).sum()]
    assert abs(terms.t.median() - median) < 0.06  # ≈ 0.30; U(eps, 1) would give ≈ 0.5
    # an SDE without the proposal's closed form fails at the draw as at check_sde
    with pytest.raises(ValueError, match="no 'importance' time proposal for LinearSigmaSDE"):
        objective(ScoreModel(make_net(2), LinearSigmaSDE()), LinearSigmaSDE(), x0, 1)


# -- bad inputs --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"order": 0}, "order"),
        ({"order": 4}, "order"),
        ({"order": 1, "t": torch.rand(3)}, "t must"),
        ({"order": 1, "z": torch.randn(8, 3)}, "z the shape of x0"),
        ({"order": 2, "v": torch.ones(8, 3)}, "v must"),
        ({"order": 3, "v": torch.ones(8)}, "v must"),
    ],
)
def test_bad_call_arguments_raise_clear_errors(make_net, kwargs, match):
    sde = VPSDE()
    with pytest.raises(ValueError, match=match):
        HOSMObjective(divergence="hutchinson")(ScoreModel(make_net(2), sde), sde, torch.randn(8, 2), **kwargs)


@pytest.mark.parametrize("x0", [torch.randn(8), torch.randn(0, 2), [[0.0, 1.0]]], ids=["1-d", "empty", "list"])
def test_x0_must_be_a_batch(x0):
    with pytest.raises(ValueError, match="x0 must be a batch"):
        HOSMObjective()(lambda x, t: -x, VPSDE(), x0, 1)


@pytest.mark.parametrize("order", [1, 3])
def test_a_non_finite_point_makes_only_its_own_loss_non_finite(order):
    """No host-side check (it would stall DDP ranks): NaN stays in its sample, and HOSMModule stops on
    the non-finite gradient with a message naming the term (tests/test_module.py)."""
    x = torch.randn(8, 2)
    x[3, 1] = float("nan")
    loss, terms = HOSMObjective()(lambda x, t: -torch.tanh(x), VPSDE(), x, order, torch.Generator().manual_seed(0))
    finite = torch.ones(8, dtype=torch.bool)
    finite[3] = False
    assert torch.equal(torch.isfinite(loss), finite) and torch.equal(torch.isfinite(terms.dsm1), finite)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("divergence,product", ESTIMATORS, ids=ESTIMATOR_IDS)
def test_a_score_of_the_wrong_shape_is_rejected(order, divergence, product):
    bad = lambda x, t: x.sum(1)  # noqa: E731
    with pytest.raises(ValueError, match="score_fn output must have the shape of its input"):
        HOSMObjective(divergence=divergence, probe_product=product)(bad, VPSDE(), torch.randn(8, 2), order)
