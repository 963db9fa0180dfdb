"""Plots (pure matplotlib) and the DensityPlotCallback driven by a tiny real HOSMModule."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from hosm_lightning.core import ODEOptions, paper_mog1d
from hosm_lightning.lit.options import FitOptions
from hosm_lightning.lit.plots import (
    density_figure_1d, density_figure_2d, exact_logp_2d, image_grid, samples_figure, save_figure,
)


def _saved(fig, path):
    out = save_figure(fig, path)
    assert out.exists() and out.stat().st_size > 0
    return out


def test_density_figure_1d(tmp_path):
    mix = paper_mog1d()
    grid = torch.linspace(-1.2, 1.0, 60)
    logp = mix.log_prob(grid[:, None])
    data = mix.sample(200, torch.Generator().manual_seed(0))
    fig = density_figure_1d(grid, logp + 0.01, logp, data, title="NLL 0.1")
    assert len(fig.axes) == 2 and fig.axes[1].get_xlim() == (-0.5, 0.0)
    _saved(fig, tmp_path / "a" / "d1.png")
    assert len(density_figure_1d(grid, logp, None, None, zoom=None).axes) == 1


def test_density_and_samples_figures_2d(tmp_path):
    xs, ys = torch.linspace(-4, 4, 9), torch.linspace(-4, 4, 7)
    logp = torch.randn(7, 9)
    pts = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], -1).reshape(-1, 2)
    exact = exact_logp_2d("checkerboard", pts).reshape(7, 9)
    samples = torch.randn(30, 2)
    assert len(density_figure_2d(xs, ys, logp, exact, samples).axes) == 3
    assert len(density_figure_2d(xs, ys, logp, None, None).axes) == 1
    _saved(density_figure_2d(xs, ys, logp, exact, None), tmp_path / "d2.png")
    _saved(samples_figure(samples, torch.randn(40, 2)), tmp_path / "s2.png")
    _saved(samples_figure(torch.randn(30, 1), torch.randn(40, 1)), tmp_path / "s1.png")
    with_nan = torch.cat([torch.randn(5, 1), torch.tensor([[float("nan")]])])
    assert len(samples_figure(with_nan).axes) == 1


@pytest.mark.parametrize("centered", [True, False])
def test_image_grid(centered):
    lo = -1.0 if centered else 0.0
    x = torch.rand(5, 3, 8, 8) * 3 - 1  # values beyond the range get clamped
    g = image_grid(x, centered=centered, nrow=4)
    assert g.dtype == torch.uint8 and g.shape == (3, 2 * 8 + 3 * 2, 4 * 8 + 5 * 2)
    full = image_grid(torch.full((1, 3, 4, 4), 1.0), centered=centered)
    low = image_grid(torch.full((1, 3, 4, 4), lo), centered=centered)
    assert full[:, 2:6, 2:6].min() == 255 and low[:, 2:6, 2:6].max() == 0


def test_exact_logp_checkerboard():
    inside = torch.tensor([[-3.0, -3.0], [-3.0, 1.0], [-1.0, -1.0], [-1.0, 3.0], [1.0, 1.0], [3.0, 3.0], [3.0, -1.0]])
    outside = torch.tensor([[-3.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [3.0, 1.0], [5.0, 5.0], [-4.5, -3.0], [4.0, 0.5]])
    assert torch.allclose(exact_logp_2d("checkerboard", inside), torch.full((7,), -math.log(32)))
    assert torch.isneginf(exact_logp_2d("checkerboard", outside)).all()
    assert exact_logp_2d("swissroll", inside) is None
    # matches the data module's sampler: every sample lies inside
    from hosm_lightning.data.synthetic import checkerboard

    assert torch.isfinite(exact_logp_2d("checkerboard", checkerboard(2000, torch.Generator().manual_seed(0)))).all()
    # integrates to 1 (midpoint rule on [-5, 5]^2)
    n, h = 500, 10 / 500
    c = -5 + h * (torch.arange(n, dtype=torch.float64) + 0.5)
    pts = torch.stack(torch.meshgrid(c, c, indexing="ij"), -1).reshape(-1, 2)
    assert float(exact_logp_2d("checkerboard", pts).exp().sum() * h * h) == pytest.approx(1.0, abs=1e-9)


# -- the callback, with a real (tiny) HOSMModule --------------------------------------------------
class TinyNet(nn.Module):
    """forward(x [B, 1], t [B]) -> [B, 1]."""

    def __init__(self, dim: int = 1):
        super().__init__()
        self.dim = dim
        self.body = nn.Sequential(nn.Linear(dim + 1, 16), nn.SiLU(), nn.Linear(16, dim))

    def forward(self, x, t, sigma=None):
        return self.body(torch.cat([x, t.reshape(-1, 1).to(x)], dim=1))


def _datamodule():
    import lightning as L
    from torch.utils.data import DataLoader

    class MoG1D(L.LightningDataModule):
        dim, entropy, name = 1, None, "mog1d"

        def __init__(self):
            super().__init__()
            self.mixture = paper_mog1d()
            self.data = self.mixture.sample(128, torch.Generator().manual_seed(0)).float()

        def train_dataloader(self):
            return DataLoader(self.data, batch_size=64)  # two [64, 1] batches

        def val_dataloader(self):
            return DataLoader(self.data, batch_size=32)

    return MoG1D()


def test_density_plot_callback(tmp_path):
    import lightning as L
    from lightning.pytorch.callbacks import EMAWeightAveraging
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from hosm_lightning.lit.callbacks import DensityPlotCallback
    from hosm_lightning.lit.module import HOSMModule

    torch.manual_seed(0)
    model = HOSMModule(net=TinyNet(), fit=FitOptions(val_likelihood=False), ode=ODEOptions(rtol=1e-3, atol=1e-3))
    cb = DensityPlotCallback(grid_size=50, num_samples=50, ode={"rtol": 1e-3, "atol": 1e-3})
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = L.Trainer(
        max_steps=2, limit_val_batches=1, num_sanity_val_steps=1, logger=logger, callbacks=[EMAWeightAveraging(), cb],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, accelerator="cpu",
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=_datamodule())
    assert not [w for w in caught if "DensityPlotCallback" in str(w.message)], [str(w.message) for w in caught]
    plots = tmp_path / "tb" / "version_0" / "plots"
    names = sorted(p.name for p in plots.iterdir())
    assert names == ["density_latest.png", "density_step000002.png", "samples_latest.png"]  # sanity check skipped
    assert all((plots / n).stat().st_size > 0 for n in names)
    assert cb.last_density_path == str(plots / "density_latest.png")
    assert cb.last_info["sample_nfe"] > 0 and cb.last_info["density_nfe"] > 0
    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    acc.Reload()
    assert {"val/density", "val/samples"} <= set(acc.Tags()["images"])
    assert [e.step for e in acc.Images("val/density")] == [2]


class TinyImageNet(nn.Module):
    """forward(x [B, 3, 4, 4], t [B]) -> same shape."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(49, 48)

    def forward(self, x, t, sigma=None):
        return self.lin(torch.cat([x.flatten(1), t.reshape(-1, 1).to(x)], dim=1)).view_as(x)


@pytest.mark.filterwarnings("error:DensityPlotCallback failed")
@pytest.mark.parametrize("kind", ["checkerboard", "image"])
def test_density_plot_callback_2d_and_images(tmp_path, kind):
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader

    from hosm_lightning.data.synthetic import checkerboard
    from hosm_lightning.lit.callbacks import DensityPlotCallback
    from hosm_lightning.lit.module import HOSMModule

    g = torch.Generator().manual_seed(0)
    if kind == "image":
        data, net = torch.randint(0, 256, (32, 3, 4, 4), dtype=torch.uint8, generator=g), TinyImageNet()
    else:
        data, net = checkerboard(32, g), TinyNet(2)

    class DM(L.LightningDataModule):
        name = kind
        if kind == "image":
            image_shape = (3, 4, 4)

        def train_dataloader(self):
            return DataLoader(data, batch_size=16)

        val_dataloader = train_dataloader

    torch.manual_seed(0)
    model = HOSMModule(net=net, fit=FitOptions(val_likelihood=False), ode=ODEOptions(rtol=1e-3, atol=1e-3))
    cb = DensityPlotCallback(grid_size_2d=6, num_samples=20, ode={"rtol": 1e-3, "atol": 1e-3},
                             out_dir=str(tmp_path / "out"))
    trainer = L.Trainer(
        max_steps=2, limit_val_batches=1, num_sanity_val_steps=0, logger=TensorBoardLogger(tmp_path), callbacks=[cb],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, accelerator="cpu",
    )
    trainer.fit(model, datamodule=DM())
    assert (tmp_path / "out" / "samples_latest.png").stat().st_size > 0
    if kind == "image":
        assert cb.last_density_path is None
    else:
        assert cb.last_density_path == str(tmp_path / "out" / "density_latest.png")
        assert (tmp_path / "out" / "density_step000002.png").exists()
