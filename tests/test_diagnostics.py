"""Per-noise-level score diagnostics and the KL identity (core/diagnostics.py; docs/design.md §8), against
closed forms. The ODE model's own score, ``ode_score``, is tested in tests/test_ode.py."""

from __future__ import annotations

import pytest
import torch

from hosm_lightning.core import ODEOptions, VESDE, VPSDE, GaussianMixture, paper_mog1d
from hosm_lightning.core.diagnostics import REPORT_KEYS, kl_decomposition, score_report, sigma_grid, time_proposal


def centred(mix: GaussianMixture) -> GaussianMixture:
    """The same mixture shifted to mean 0: then q_T matches the prior π to second order, so the ODE
    driven by the exact score has p_t^ODE = q_t up to ~1e-4."""
    mean = (mix.weights[:, None] * mix.means).sum(0)
    return GaussianMixture(mix.means - mean, mix.variances, mix.weights)


@pytest.mark.slow
def test_score_report_of_exact_score_is_zero():
    sde, mix = VESDE(), centred(paper_mog1d())
    times = sigma_grid(sde, 1e-3, 4)
    rep = score_report(mix.score_fn(sde), sde, mix, times=times, n=40, generator=torch.Generator().manual_seed(0),
                       dtype=torch.float64, ode=ODEOptions(rtol=1e-7, atol=1e-7))
    scale = [g2 * (1.0 / max(s, 0.05) ** 2) for g2, s in zip(rep["g2"], rep["sigma"])]  # ~E g²‖∇log q‖²
    assert rep["first_order"] == pytest.approx([0.0] * 4, abs=1e-12)
    for key in ("self_gap", "fisher", "kl_integrand"):
        assert all(abs(v) <= 1e-5 * sc for v, sc in zip(rep[key], scale)), (key, rep[key])
    assert set(REPORT_KEYS) <= set(rep) and len(rep["t"]) == 4 and rep["n"] == 40
    assert all(len(rep[k + "_se"]) == 4 for k in REPORT_KEYS)
    torch.testing.assert_close(torch.tensor(rep["sigma"], dtype=torch.float64), sde.marginal(times)[1])


@pytest.mark.slow
def test_score_report_of_a_wrong_score_measures_its_error():
    """s_θ = ∇log q + c: first_order = g² D c² exactly (zero standard error), and the other curves are not zero."""
    sde, mix = VPSDE(), centred(paper_mog1d())
    shift = 0.3
    score_fn = lambda x, t: mix.score_fn(sde)(x, t) + shift  # noqa: E731
    times = [0.05, 0.5]
    rep = score_report(score_fn, sde, mix, times=times, n=20, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64, ode=ODEOptions(rtol=1e-6, atol=1e-6))
    g2 = sde.g2(torch.tensor(times, dtype=torch.float64))
    assert rep["first_order"] == pytest.approx((g2 * shift**2).tolist(), rel=1e-9)
    assert rep["first_order_se"] == pytest.approx([0.0, 0.0], abs=1e-12)
    assert all(v > 1e-3 * f for v, f in zip(rep["fisher"], rep["first_order"]))


def test_sigma_grid_is_log_spaced_in_sigma():
    sde = VPSDE()
    ts = sigma_grid(sde, 1e-3, 5)
    log_s = sde.marginal(ts)[1].log()
    steps = log_s[1:] - log_s[:-1]
    assert torch.allclose(steps, steps.mean().expand(4), rtol=0.02)
    assert float(ts[0]) == pytest.approx(1e-3, rel=1e-3) and float(ts[-1]) == pytest.approx(1.0, abs=1e-3)
    # VE: log σ is linear in t, so the grid is equally spaced in t
    ve = sigma_grid(VESDE(), 0.1, 4)
    torch.testing.assert_close(ve, torch.linspace(0.1, 1.0, 4, dtype=torch.float64), rtol=0, atol=1e-4)


@pytest.mark.parametrize("sde", [VESDE(), VPSDE()], ids=["VE", "VP"])
def test_time_proposal_integrates_over_eps_T(sde):
    """t(u) with the weight 1/p(t): stratified u gives ∫_eps^T f dt for f = 1 and f = t, and the weight
    is ∝ σ²/g² (the importance proposal), which is the constant T − eps for VE (g²/σ² constant)."""
    eps, n = 1e-3, 20_000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    t, inv_p = time_proposal(sde, u, eps)
    assert t.min() >= eps and t.max() <= sde.T and bool((t[1:] >= t[:-1]).all())
    assert float((inv_p).mean()) == pytest.approx(sde.T - eps, rel=2e-3)
    assert float((t * inv_p).mean()) == pytest.approx((sde.T**2 - eps**2) / 2, rel=2e-3)
    _, sigma = sde.marginal(t)
    ratio = inv_p * sde.g2(t) / sigma**2  # constant: the proposal is ∝ g²/σ²
    torch.testing.assert_close(ratio, ratio[0].expand_as(ratio), rtol=1e-9, atol=0)
    if isinstance(sde, VESDE):
        torch.testing.assert_close(inv_p, torch.full_like(u, sde.T - eps), rtol=1e-12, atol=0)
        torch.testing.assert_close(t, eps + u * (sde.T - eps), rtol=0, atol=1e-12)
    else:
        assert float(t.median()) < 0.5 * (sde.T + eps)  # and it is not uniform


@pytest.mark.parametrize("sde", [VESDE(), VPSDE()], ids=["VE", "VP"])
@pytest.mark.slow
def test_kl_identity_with_a_wrong_model(sde):
    """KL(q_eps‖p_eps^ODE) from the ODE likelihood equals KL(q_T‖π) + ½∫ g² E[(s_θ-∇q)ᵀ(∇log p^ODE-∇q)] dt
    (eq. 8.1) for a model that is wrong everywhere: the exact score of a mixture with other weights
    and wider components. Within 3 combined standard errors, and the errors are small enough to matter."""
    data = paper_mog1d()
    model = GaussianMixture(data.means, data.variances * 1.6, [0.4, 0.2, 0.4])
    eps = 1e-3 if isinstance(sde, VPSDE) else 1e-5
    out = kl_decomposition(model.score_fn(sde), sde, data, n=6000, generator=torch.Generator().manual_seed(3),
                           dtype=torch.float64, ode=ODEOptions(eps=eps, rtol=1e-6, atol=1e-6))
    assert out["kl_ode"] > 0.05  # the model is measurably wrong
    assert abs(out["diff"]) <= 3 * out["diff_se"], out
    assert out["diff_se"] <= 0.1 * out["kl_ode"], out
    assert out["kl_scores"] == pytest.approx(out["kl_prior"] + out["kl_integral"], rel=1e-12)


def test_kl_decomposition_takes_eps_from_the_ode_options():
    """The likelihood side starts at ode.eps: a different eps changes KL(q_eps‖p_eps^ODE)."""
    data = paper_mog1d()
    model = GaussianMixture(data.means, data.variances * 1.6, [0.4, 0.2, 0.4])
    sde, kw = VESDE(), dict(n=200, dtype=torch.float64)
    ode = ODEOptions(rtol=1e-4, atol=1e-4)
    small = kl_decomposition(model.score_fn(sde), sde, data, generator=torch.Generator().manual_seed(4), ode=ode, **kw)
    large = kl_decomposition(model.score_fn(sde), sde, data, generator=torch.Generator().manual_seed(4),
                             ode=ode.replace(eps=0.3), **kw)
    assert large["kl_ode"] < 0.5 * small["kl_ode"]  # at σ(0.3) ≈ 0.13 both densities are much smoother


# -- diagnose on images: no exact density, the paired DSM terms per σ ---------------------------------
def test_diagnose_on_images_gives_paired_dsm_terms_per_sigma(tmp_path):
    from helpers import tiny_trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    from hosm_lightning.data import ImageDataModule
    from hosm_lightning.diagnose import run_diagnose
    from hosm_lightning.lit.module import HOSMModule
    from hosm_lightning.nets import DDPMpp

    torch.manual_seed(0)
    net = DDPMpp(image_size=8, in_channels=1, nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
    module = HOSMModule(net, sde=VPSDE(), objective={"divergence": "hutchinson"})
    dm = ImageDataModule(source="digits", batch_size=8, steps_per_epoch=2, train_dequantization="uniform")
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=1, save_top_k=-1, filename="s{step}",
                           auto_insert_metric_name=False)
    trainer = tiny_trainer(tmp_path, max_steps=2, callbacks=[ckpt], enable_checkpointing=True)
    trainer.fit(module, datamodule=dm)
    one, two = (str(tmp_path / "ckpt" / f"s{s}.ckpt") for s in ("1", "2"))
    dm.setup("test")
    res = run_diagnose(module, dm, [one, one, two], ["a", "a again", "b"], num_times=3, num_points=6,
                       identity_points=0, rtol=None, seed=0, out=tmp_path)
    assert len(res["sigma"]) == 3 and res["n"] == 6 and (tmp_path / "diagnose.png").is_file()
    for term in ("dsm1", "dsm2", "dsm3"):  # the same weights, noise and probes: exactly no difference
        assert res["delta"]["a again"][term]["mean"] == [0.0, 0.0, 0.0]
        assert all(abs(m) > 0 for m in res["delta"]["b"][term]["mean"][:2])
