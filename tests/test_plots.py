"""Figures (hosm_lightning/plots.py: what each figure draws) and the DensityPlotCallback that makes them
during validation."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from hosm_lightning.core import paper_mog1d
from hosm_lightning.data import DiscreteDataModule
from hosm_lightning.data.synthetic import checkerboard, exact_logp_2d
from hosm_lightning.lit import callbacks
from hosm_lightning.lit.callbacks import DensityPlotCallback
from hosm_lightning.lit.ema import HOSMEMA
from hosm_lightning.nets import SmallConvNet
from hosm_lightning.plots import (
    density_figure_1d, density_figure_2d, diagnostics_figure, image_grid, samples_figure, save_figure,
)

from helpers import tiny_data, tiny_module, tiny_trainer

PNG = b"\x89PNG\r\n\x1a\n"


def _lines(ax) -> dict:
    return {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}


# -- density_figure_1d ----------------------------------------------------------------------------
def test_density_figure_1d_draws_both_densities_over_the_normalised_data_histogram():
    mix = paper_mog1d()
    grid = torch.linspace(-1.2, 1.0, 60, dtype=torch.float64)
    exact = mix.log_prob(grid[:, None])
    model = exact + 0.01
    model[5] = float("nan")  # a failed solve at one grid point is drawn as density 0
    data = mix.sample(200, torch.Generator().manual_seed(0))
    fig = density_figure_1d(grid, model, exact, data, title="NLL 0.1")
    main, zoom = fig.axes
    lines = _lines(main)
    np.testing.assert_allclose(lines["exact"].get_ydata(), exact.exp().numpy())
    expected = model.exp().numpy()
    expected[5] = 0.0
    np.testing.assert_allclose(lines["model"].get_ydata(), expected)
    np.testing.assert_allclose(lines["model"].get_xdata(), grid.numpy())
    # the histogram is normalised by the whole sample: its area is the fraction of the data on the grid
    (hist,) = [p for p in main.patches if p.get_label() == "data"]
    stairs = hist.get_data()
    inside = ((data >= grid.min()) & (data <= grid.max())).double().mean().item()
    assert float((stairs.values * np.diff(stairs.edges)).sum()) == pytest.approx(inside)
    assert stairs.edges[0] == pytest.approx(-1.2) and stairs.edges[-1] == pytest.approx(1.0)
    # the zoomed panel: the paper's region, scaled to the highest density inside it
    assert zoom.get_xlim() == (-0.5, 0.0)
    in_zoom = (grid >= -0.5) & (grid <= 0.0)
    top = max(float(exact[in_zoom].exp().max()), float(np.nanmax(expected[in_zoom.numpy()])))
    assert zoom.get_ylim() == pytest.approx((0.0, 1.1 * top))
    zoom_hist = next(p for p in zoom.patches if p.get_label() == "data").get_data()
    assert zoom_hist.edges[0] == pytest.approx(-0.5) and zoom_hist.edges[-1] == pytest.approx(0.0)
    assert fig.get_suptitle() == "NLL 0.1"


def test_density_figure_1d_without_exact_density_data_or_zoom():
    grid = torch.linspace(-1, 1, 11)
    fig = density_figure_1d(grid, -grid**2, None, None, zoom=None)
    (ax,) = fig.axes
    assert set(_lines(ax)) == {"model"} and not ax.patches
    assert ax.get_xlim() == (-1.0, 1.0)


# -- density_figure_2d ----------------------------------------------------------------------------
def test_density_figure_2d_shows_each_density_on_its_own_scale_and_the_samples():
    xs, ys = torch.linspace(-4, 4, 9), torch.linspace(-3, 3, 7)
    pts = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], -1).reshape(-1, 2)  # row i is y = ys[i]
    model = -0.5 * (pts**2).sum(1).reshape(7, 9)
    exact = exact_logp_2d("checkerboard", pts).reshape(7, 9)
    samples = torch.tensor([[0.0, 0.0], [1.0, -2.0], [4.4, 0.0], [0.0, 3.6], [-9.0, 9.0]])
    fig = density_figure_2d(xs, ys, model, exact, samples, title="step 3")
    panels = fig.axes
    assert len(panels) == 3 and fig.get_suptitle() == "step 3"
    half_cell = (-4.5, 4.5, -3.5, 3.5)  # grid points are pixel centres
    for ax, logp in zip(panels[:2], (model, exact)):
        (image,) = ax.images
        p = logp.exp().double().numpy()
        np.testing.assert_allclose(image.get_array(), p)
        assert image.origin == "lower" and image.get_extent() == pytest.approx(half_cell)
        assert image.get_clim() == pytest.approx((0.0, p.max()))  # per panel: a poor model stays visible
    assert panels[0].get_title().startswith("model density") and panels[1].get_title().startswith("exact density")
    (scatter,) = panels[2].collections
    np.testing.assert_allclose(scatter.get_offsets(), samples.numpy())
    assert panels[2].get_xlim() == pytest.approx(half_cell[:2]) and panels[2].get_ylim() == pytest.approx(half_cell[2:])
    assert panels[2].get_title() == "samples (n=5, 2 outside view)"  # (0, 3.6) lies in the half cell
    only_model = density_figure_2d(xs, ys, model)
    assert len(only_model.axes) == 1 and only_model.axes[0].get_title().startswith("model density")


def test_exact_logp_checkerboard():
    inside = torch.tensor([[-3.0, -3.0], [-3.0, 1.0], [-1.0, -1.0], [-1.0, 3.0], [1.0, 1.0], [3.0, 3.0], [3.0, -1.0]])
    outside = torch.tensor([[-3.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [3.0, 1.0], [5.0, 5.0], [-4.5, -3.0], [4.0, 0.5]])
    assert torch.allclose(exact_logp_2d("checkerboard", inside), torch.full((7,), -math.log(32)))
    assert torch.isneginf(exact_logp_2d("checkerboard", outside)).all()
    assert exact_logp_2d("swissroll", inside) is None
    # matches the data module's sampler: every sample lies inside
    assert torch.isfinite(exact_logp_2d("checkerboard", checkerboard(2000, torch.Generator().manual_seed(0)))).all()
    # integrates to 1 (midpoint rule on [-5, 5]^2)
    n, h = 500, 10 / 500
    c = -5 + h * (torch.arange(n, dtype=torch.float64) + 0.5)
    pts = torch.stack(torch.meshgrid(c, c, indexing="ij"), -1).reshape(-1, 2)
    assert float(exact_logp_2d("checkerboard", pts).exp().sum() * h * h) == pytest.approx(1.0, abs=1e-9)


# -- samples_figure -------------------------------------------------------------------------------
def test_samples_figure_1d_bins_on_the_data_range_and_counts_dropped_samples():
    g = torch.Generator().manual_seed(0)
    data = torch.rand(400, 1, generator=g) * 2 - 1  # range ≈ [-1, 1]: bins on [-2, 2]
    samples = torch.cat([torch.randn(30, 1, generator=g) * 0.3, torch.tensor([[float("nan")], [float("inf")]])])
    ax = samples_figure(samples, data).axes[0]
    assert ax.get_title() == "ODE samples (n=30, non-finite dropped: 2)"
    bars = [p for p in ax.patches if type(p).__name__ == "Rectangle"]
    lo, hi = float(data.min()), float(data.max())
    assert bars[0].get_x() == pytest.approx(lo - 0.5 * (hi - lo))
    assert bars[-1].get_x() + bars[-1].get_width() == pytest.approx(hi + 0.5 * (hi - lo))
    assert sum(b.get_height() * b.get_width() for b in bars) == pytest.approx(1.0)  # the data's density
    (step,) = [p for p in ax.patches if p.get_label() == "samples"]
    assert step.get_xy()[:, 0].min() == pytest.approx(bars[0].get_x())
    assert samples_figure(torch.tensor([[float("nan")]]), data, title="t").axes[0].get_title() == "t"


def test_samples_figure_2d_scatters_the_first_two_coordinates():
    samples, data = torch.randn(30, 3), torch.randn(40, 3)
    samples[3, 2] = float("nan")
    ax = samples_figure(samples, data).axes[0]
    drawn = {c.get_label(): c.get_offsets() for c in ax.collections}
    np.testing.assert_allclose(drawn["data"], data[:, :2].numpy(), rtol=1e-6)
    keep = torch.ones(30, dtype=torch.bool)
    keep[3] = False
    np.testing.assert_allclose(drawn["samples"], samples[keep, :2].numpy(), rtol=1e-6)
    assert "non-finite dropped: 1" in ax.get_title()


# -- image_grid, save_figure ----------------------------------------------------------------------
@pytest.mark.parametrize("centered", [True, False])
def test_image_grid(centered):
    lo = -1.0 if centered else 0.0
    x = torch.rand(5, 3, 8, 8) * 3 - 1  # values beyond the range get clamped
    g = image_grid(x, centered=centered, nrow=4)
    assert g.dtype == torch.uint8 and g.shape == (3, 2 * 8 + 3 * 2, 4 * 8 + 5 * 2)
    full = image_grid(torch.full((1, 3, 4, 4), 1.0), centered=centered)
    low = image_grid(torch.full((1, 3, 4, 4), lo), centered=centered)
    assert full[:, 2:6, 2:6].min() == 255 and low[:, 2:6, 2:6].max() == 0
    nan = image_grid(torch.full((1, 3, 4, 4), float("nan")), centered=centered)
    assert nan[:, 2:6, 2:6].max() == 0  # a diverged sample shows black


def test_save_figure_writes_the_format_of_the_suffix_and_creates_folders(tmp_path):
    fig = samples_figure(torch.randn(20, 2))
    out = save_figure(fig, tmp_path / "a" / "b" / "s.png")
    assert out == tmp_path / "a" / "b" / "s.png" and out.read_bytes()[:8] == PNG
    assert b"<svg" in save_figure(fig, tmp_path / "s.svg").read_bytes()[:1000]


# -- diagnostics_figure ---------------------------------------------------------------------------
_NON_NEGATIVE = ("first_order", "self_gap", "fisher")
_TITLES = {"first_order": "(first-order error)", "self_gap": "(network vs its own ODE)",
           "fisher": "(ODE Fisher divergence)", "kl_integrand": "(KL integrand)"}


def _report(scale: float) -> dict:
    """A score report whose standard errors exceed half the mean at some noise levels."""
    rep = {"sigma": [0.01, 0.1, 1.0, 10.0]}
    for key in _NON_NEGATIVE:
        rep[key], rep[key + "_se"] = [scale * v for v in (0.5, 0.01, 2.0, 0.002)], [scale * v for v in (0.1, 0.2, 0.1, 0.5)]
    rep["kl_integrand"], rep["kl_integrand_se"] = [0.3, -0.2, 0.05, 0.0], [0.05, 0.3, 0.01, 0.2]
    return rep


def _band(collection, xs) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) edge of a fill_between band at each x."""
    v = collection.get_paths()[0].vertices
    lower = np.array([v[np.isclose(v[:, 0], x), 1].min() for x in xs])
    upper = np.array([v[np.isclose(v[:, 0], x), 1].max() for x in xs])
    return lower, upper


def test_diagnostics_figure_draws_each_curve_per_model_with_bands_clipped_at_zero():
    reports = {"short": _report(1.0), "longer": _report(0.1)}
    fig = diagnostics_figure(reports, "diag")
    assert len(fig.axes) == 4 and fig.get_suptitle() == "diag"
    for ax, key in zip(fig.axes, _NON_NEGATIVE + ("kl_integrand",)):
        assert _TITLES[key] in ax.get_title()
        assert ax.get_xscale() == "log"
        assert ax.get_yscale() == ("linear" if key == "kl_integrand" else "symlog")
        lines = _lines(ax)
        assert list(lines) == ["short", "longer"]
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["short", "longer"]
        for (name, rep), band in zip(reports.items(), ax.collections):
            sig, m, se = (np.asarray(rep[k]) for k in ("sigma", key, key + "_se"))
            np.testing.assert_allclose(lines[name].get_xdata(), sig)
            np.testing.assert_allclose(lines[name].get_ydata(), m)
            lower, upper = _band(band, sig)
            np.testing.assert_allclose(upper, m + 2 * se)
            if key in _NON_NEGATIVE:  # a squared norm: the band stops at 0 instead of plunging on the symlog axis
                np.testing.assert_allclose(lower, np.maximum(m - 2 * se, 0.0))
            else:  # the KL integrand has either sign
                np.testing.assert_allclose(lower, m - 2 * se)
        if key in _NON_NEGATIVE:
            assert ax.get_ylim()[0] > -0.1 * ax.get_ylim()[1]  # only the autoscale margin below 0
    assert _band(fig.axes[3].collections[0], [0.1])[0][0] == pytest.approx(-0.8)


# -- DensityPlotCallback --------------------------------------------------------------------------
@pytest.mark.parametrize("kw,match", [({"every_n_epochs": 0}, "every_n_epochs"), ({"grid_size": 0}, "grid_size"),
                                      ({"num_samples": 0}, "num_samples"), ({"ode": {"nope": 1}}, "nope"),
                                      ({"ode": {"rtol": -1.0}}, "rtol")])
def test_density_plot_callback_rejects_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        DensityPlotCallback(**kw)


def _record(monkeypatch, name: str) -> list:
    """Record the figures the callback builds with plots.<name>: [(args, kwargs, figure)]."""
    made, original = [], getattr(callbacks, name)

    def record(*args, **kw):
        fig = original(*args, **kw)
        made.append((args, kw, fig))
        return fig

    monkeypatch.setattr(callbacks, name, record)
    return made


@pytest.mark.slow
def test_density_plot_callback_1d(tmp_path, monkeypatch):
    """With the EMA swapped in during validation: the model's ODE density on a grid around the data, against
    the data module's exact density, written to PNGs and TensorBoard at the validation step (not the sanity check)."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    made = _record(monkeypatch, "density_figure_1d")
    dm = tiny_data("mog1d", steps_per_epoch=2, val_size=64)
    model = tiny_module(fit={"val_likelihood": False})
    cb = DensityPlotCallback(grid_size=50, num_samples=50, ode={"rtol": 1e-3, "atol": 1e-3})
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = tiny_trainer(tmp_path, 2, [HOSMEMA(decay=0.9), cb], logger=logger, limit_val_batches=1,
                           num_sanity_val_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=dm)
    assert not [w for w in caught if "DensityPlotCallback" in str(w.message)], [str(w.message) for w in caught]
    assert len(made) == 1  # the sanity check plots nothing
    (grid, logp, exact, data), kw, _ = made[0]
    assert len(grid) == 50 and torch.isfinite(logp).all()
    span = float(data.max() - data.min())
    assert float(grid[0]) == pytest.approx(float(data.min()) - 0.3 * span, rel=1e-5)
    torch.testing.assert_close(exact, dm.data_spec().log_prob(grid[:, None]))
    assert "KL(q||p) on grid" in kw["title"] and "H(q)" in kw["title"] and kw["title"].startswith("step 2")
    plots = tmp_path / "tb" / "version_0" / "plots"
    names = sorted(p.name for p in plots.iterdir())
    assert names == ["density_latest.png", "density_step000002.png", "samples_latest.png"]
    assert all((plots / n).read_bytes()[:8] == PNG for n in names)
    assert cb.last_density_path == str(plots / "density_latest.png")
    assert cb.last_info["sample_nfe"] > 0 and cb.last_info["density_nfe"] > 0
    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    acc.Reload()
    assert {"val/density", "val/samples"} <= set(acc.Tags()["images"])
    assert [e.step for e in acc.Images("val/density")] == [2]


@pytest.mark.slow
@pytest.mark.filterwarnings("error:DensityPlotCallback failed")
def test_density_plot_callback_2d_with_the_exact_density(tmp_path, monkeypatch):
    made = _record(monkeypatch, "density_figure_2d")
    cb = DensityPlotCallback(grid_size_2d=6, num_samples=20, ode={"rtol": 1e-3, "atol": 1e-3},
                             out_dir=str(tmp_path / "out"))
    dm = tiny_data("checkerboard", steps_per_epoch=2, val_size=16)
    tiny_trainer(tmp_path, 2, [cb], limit_val_batches=1).fit(tiny_module(dim=2, fit={"val_likelihood": False}), dm)
    (xs, ys, logp, exact, samples), _, fig = made[0]
    assert logp.shape == exact.shape == (6, 6) and samples.shape == (20, 2)
    pts = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], -1).reshape(-1, 2)
    torch.testing.assert_close(exact, exact_logp_2d("checkerboard", pts).reshape(6, 6))
    assert len(fig.axes) == 3
    assert cb.last_density_path == str(tmp_path / "out" / "density_latest.png")
    assert (tmp_path / "out" / "density_step000002.png").read_bytes()[:8] == PNG
    assert (tmp_path / "out" / "samples_latest.png").read_bytes()[:8] == PNG


@pytest.mark.slow
@pytest.mark.filterwarnings("error:DensityPlotCallback failed")
def test_density_plot_callback_images_writes_a_sample_grid(tmp_path):
    dm = DiscreteDataModule(shape="image", batch_size=8, eval_batch_size=8, steps_per_epoch=2, val_size=8, test_size=8)
    h, w = dm.data_spec().shape[1:]
    model = tiny_module(net=SmallConvNet(image_size=h, channels=8, depth=1), fit={"val_likelihood": False})
    cb = DensityPlotCallback(num_samples=20, ode={"rtol": 1e-2, "atol": 1e-2}, out_dir=str(tmp_path / "out"))
    tiny_trainer(tmp_path, 2, [cb], limit_val_batches=1).fit(model, dm)
    assert cb.last_density_path is None  # no density of images
    from matplotlib.image import imread

    grid = imread(tmp_path / "out" / "samples_latest.png")
    assert grid.shape[:2] == (4 * h + 5 * 2, 4 * w + 5 * 2)  # min(20, 16) samples, 4 per row
