"""Data: the synthetic, discrete 8-bit and CIFAR-10 data modules, DataSpec, the training streams and the
evaluation sharding (docs/design.md §5, §6).

Training batches are float tensors; validation and test batches are dicts ``{'x': [B, ...], 'index': [B]}``
whose rows are split over DDP ranks by one rule, ``shard_indices`` (rank r of W takes r, r + W, ...).
"""

from __future__ import annotations

import math
import pickle
import shutil
import socket
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.connectors.data_connector import _process_dataloader
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from scipy import stats
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler

from hosm_lightning.core import VESDE, VPSDE, GaussianMixture, paper_mog1d
from hosm_lightning.data import (
    CIFAR10DataModule,
    DataSpec,
    DiscreteDataModule,
    QuantizedMarginal,
    SyntheticDataModule,
    checkerboard,
    describe,
    read_cifar10,
    swissroll,
    write_fake_cifar10,
)
from hosm_lightning.data.discrete import MARGINALS
from hosm_lightning.data.sharding import (
    EvalSampler,
    IndexedRows,
    batch_index,
    batch_tensor,
    eval_loader,
    shard_indices,
)
from hosm_lightning.data.streams import FreshBatches, ResumableLoader, train_key


def eval_rows(loader):
    """(x, index, batches) of an evaluation loader: the rows and dataset indices in the order served."""
    batches = list(loader)
    assert batches and all(set(b) == {"x", "index"} for b in batches)
    return torch.cat([b["x"] for b in batches]), torch.cat([b["index"] for b in batches]), batches


def stub_trainer(world_size: int, rank: int, epoch: int = 0) -> SimpleNamespace:
    """What the data modules read of a trainer: world size, global rank and epoch."""
    return SimpleNamespace(world_size=world_size, global_rank=rank, current_epoch=epoch)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def fake_root(tmp_path):
    write_fake_cifar10(tmp_path, n_train=50, n_test=20, seed=0)
    return tmp_path


# ==================================================================================================
# synthetic toy data
# ==================================================================================================
def test_checkerboard_squares_and_mass():
    x = checkerboard(40_000, torch.Generator().manual_seed(0))
    assert x.shape == (40_000, 2) and x.dtype == torch.float32
    assert (x >= -4).all() and (x < 4).all()
    cell = torch.floor(x / 2).long() + 2  # 4x4 grid of side-2 cells, indices 0..3
    black = (cell[:, 0] + cell[:, 1]) % 2 == 0  # the occupied cells of the checkerboard
    assert black.all()
    counts = torch.bincount(cell[:, 0] * 4 + cell[:, 1], minlength=16).float()
    occupied = counts[counts > 0]
    assert len(occupied) == 8
    assert (occupied / 40_000 - 1 / 8).abs().max() < 0.01  # ~ 5 standard errors


def test_swissroll_shape_offsets_and_shuffling():
    g = torch.Generator().manual_seed(0)
    x = swissroll(1003, g)
    assert x.shape == (1003, 2) and x.dtype == torch.float32
    # quadrant of the copy (far from the centre copy, whose radius is < ~1.5)
    far = x.abs().min(1).values > 2.25
    assert far.sum() == 800  # 4 shifted copies of 1003 // 5 = 200; the centre copy (203) has |x| < 2
    # shuffled: the first 200 points are not all one copy
    first = far[:200].float().mean()
    assert 0.5 < first < 0.95
    assert not torch.equal(x, swissroll(1003, torch.Generator().manual_seed(1)))


def test_synthetic_train_batches_fresh_per_step_rank_epoch():
    dm = SyntheticDataModule("checkerboard", batch_size=64, steps_per_epoch=3, val_size=10, test_size=10)
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(loader) == 3 and len(batches) == 3
    assert all(b.shape == (64, 2) and b.dtype == torch.float32 for b in batches)
    assert not torch.equal(batches[0], batches[1])
    assert torch.equal(batches[0], next(iter(loader)))  # same (seed, rank, epoch) replays
    dm.trainer = stub_trainer(1, 1, epoch=0)
    rank1 = next(iter(loader))
    dm.trainer = stub_trainer(1, 0, epoch=1)
    epoch1 = next(iter(loader))
    assert not torch.equal(rank1, batches[0]) and not torch.equal(epoch1, batches[0])
    assert not torch.equal(rank1, epoch1)


def test_synthetic_val_test_fixed_indexed_and_identical_across_instances():
    a = SyntheticDataModule("swissroll", batch_size=300, val_size=500, test_size=700, seed=3)
    b = SyntheticDataModule("swissroll", batch_size=300, val_size=500, test_size=700, seed=3)
    b.trainer = stub_trainer(1, 2, epoch=5)  # rank and epoch do not change the evaluation sets
    a.setup("fit"), b.setup("fit")
    va, ia, batches = eval_rows(a.val_dataloader())
    vb, ib, _ = eval_rows(b.val_dataloader())
    assert [tuple(bt["x"].shape) for bt in batches] == [(300, 2), (200, 2)]
    assert all(bt["x"].dtype == torch.float32 for bt in batches)
    assert torch.equal(va, vb) and ia.tolist() == ib.tolist() == list(range(500))
    ta, it, _ = eval_rows(a.test_dataloader())
    assert ta.shape == (700, 2) and it.tolist() == list(range(700))
    assert torch.equal(ta, eval_rows(b.test_dataloader())[0])
    assert not torch.equal(ta[:500], va)
    # the rows are the seeded samples themselves, in index order
    assert torch.equal(va, swissroll(500, torch.Generator().manual_seed(4)))
    assert torch.equal(ta, swissroll(700, torch.Generator().manual_seed(5)))


def test_synthetic_properties_and_entropy():
    dm = SyntheticDataModule("mog1d")
    assert dm.dim == 1 and dm.data_spec().discrete is False and dm.mixture is not None
    assert dm.entropy == pytest.approx(-0.12885, abs=1e-4)
    assert SyntheticDataModule("checkerboard").entropy == pytest.approx(math.log(32))
    assert SyntheticDataModule("checkerboard").mixture is None
    sw = SyntheticDataModule("swissroll")
    assert sw.dim == 2 and sw.entropy is None
    g1 = SyntheticDataModule("gmm", means=[0.0, 3.0], variances=[1.0, 1.0])
    assert g1.dim == 1 and g1.entropy == pytest.approx(g1.mixture.entropy())
    g3 = SyntheticDataModule("gmm", means=[[0, 0, 0], [1, 1, 1]], variances=[[1, 1, 1], [2, 2, 2]], weights=[1, 3])
    assert g3.dim == 3 and g3.entropy is None
    assert next(iter(SyntheticDataModule("gmm", means=[[0, 0, 0]], variances=[1.0], batch_size=8)
                     .train_dataloader())).shape == (8, 3)


def test_mog1d_train_samples_match_paper_mixture():
    x = next(iter(SyntheticDataModule("mog1d", batch_size=20_000).train_dataloader()))
    assert x.shape == (20_000, 1)
    mix = paper_mog1d()
    mean = float((mix.weights * mix.means[:, 0]).sum())
    assert float(x.mean()) == pytest.approx(mean, abs=0.01)


def test_synthetic_errors():
    with pytest.raises(ValueError, match="mog1d.*checkerboard.*swissroll.*gmm"):
        SyntheticDataModule("moons")
    with pytest.raises(ValueError, match="means"):
        SyntheticDataModule("gmm")
    for arg in ("batch_size", "steps_per_epoch", "val_size", "test_size"):
        with pytest.raises(ValueError, match=arg):
            SyntheticDataModule("checkerboard", **{arg: 0})


# ==================================================================================================
# discrete 8-bit data with an exact entropy
# ==================================================================================================
def test_quantized_probabilities_are_cdf_differences_and_entropy_is_exact():
    means, stds, w = MARGINALS[2]
    m = QuantizedMarginal(means, stds, w)
    edges = (np.arange(257) - 0.5) / 255
    cdf = sum(wi * stats.norm.cdf(edges, mu, s) for mu, s, wi in zip(means, stds, w))
    cdf[0], cdf[-1] = 0.0, 1.0
    np.testing.assert_allclose(m.probs.numpy(), np.diff(cdf), atol=1e-15)
    assert abs(m.probs.sum().item() - 1) < 1e-12
    p = np.diff(cdf)
    p = p[p > 0]
    assert abs(m.entropy_bits - float(-(p * np.log2(p)).sum())) < 1e-10


@pytest.mark.parametrize("shape,sample_shape", [("1d", (1,)), ("2d", (2,)), ("image", (3, 8, 8))])
def test_discrete_batches_dtypes_shapes_and_ranges(shape, sample_shape):
    dm = DiscreteDataModule(shape=shape, batch_size=8, eval_batch_size=5, steps_per_epoch=2, val_size=7, test_size=9)
    dm.setup()
    train = list(dm.train_dataloader())
    assert len(train) == 2 and train[0].shape == (8, *sample_shape) and train[0].dtype == torch.float32
    k = torch.round((train[0] + 1) / 2 * 255)  # centered: on the grid 2k/255 - 1
    assert torch.allclose(train[0], 2 * k / 255 - 1, atol=1e-6) and not torch.equal(train[0], train[1])
    test, test_index, batches = eval_rows(dm.test_dataloader())
    assert test.dtype == torch.uint8 and test.shape == (9, *sample_shape)
    assert [len(b["x"]) for b in batches] == [5, 4] and test_index.tolist() == list(range(9))
    val, val_index, _ = eval_rows(dm.val_dataloader())
    assert val.shape == (7, *sample_shape) and val.dtype == torch.uint8 and val_index.tolist() == list(range(7))
    assert dm.dim == math.prod(sample_shape) and dm.entropy == dm.entropy_bits
    assert (dm.image_shape == sample_shape) if shape == "image" else not hasattr(dm, "image_shape")
    again = DiscreteDataModule(shape=shape, val_size=7, test_size=9)
    again.setup()
    assert torch.equal(eval_rows(again.test_dataloader())[0], test)  # fixed test set
    uncentered = DiscreteDataModule(shape=shape, centered=False, batch_size=8, steps_per_epoch=1)
    assert next(iter(uncentered.train_dataloader())).min() >= 0


def test_discrete_sample_frequencies_match_p_and_entropy_is_mean_code_length():
    dm = DiscreteDataModule(shape="image")
    k = dm.sample_bytes(4000, torch.Generator().manual_seed(0))
    dist = dm.distribution
    code = -dist.log_prob_bytes(k) / (dm.dim * math.log(2))
    assert abs(code.mean().item() - dm.entropy_bits) < 4 * code.std().item() / math.sqrt(len(code))
    counts = torch.bincount(k[:, 0].flatten().long(), minlength=256).double()  # channel 0 pixels: marginal 0
    expected = dist.probs[0] * counts.sum()
    chi2 = ((counts - expected) ** 2 / expected.clamp_min(1e-9))[expected > 5].sum().item()
    assert chi2 < stats.chi2.ppf(0.999, int((expected > 5).sum()) - 1)


@pytest.mark.parametrize("kind", ["discrete", "smooth"])
@pytest.mark.parametrize("sde", [VPSDE(), VESDE()], ids=["vp", "ve"])
def test_discrete_product_of_1d_mixtures_equals_the_joint_mixture(kind, sde):
    """2-D: the product-of-marginals density and score equal a brute-force joint GaussianMixture
    (256² point-mass components for the discrete kind) at t > 0."""
    dm = DiscreteDataModule(shape="2d", kind=kind)
    dist = dm.distribution
    g = dist.grid()
    if kind == "discrete":
        p0, p1 = dist.probs[0], dist.probs[2]
        means = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
        weights = (p0[:, None] * p1[None, :]).reshape(-1)
        keep = weights > 0
        joint = GaussianMixture(means[keep], torch.full((int(keep.sum()), 2), 1e-300, dtype=torch.float64), weights[keep])
    else:
        comps = []
        for m in (0, 2):
            logw, mu, var = dist._components(m)
            comps.append((logw.exp(), mu, var))
        (w0, m0, v0), (w1, m1, v1) = comps
        means = torch.stack(torch.meshgrid(m0, m1, indexing="ij"), -1).reshape(-1, 2)
        var = torch.stack(torch.meshgrid(v0, v1, indexing="ij"), -1).reshape(-1, 2)
        joint = GaussianMixture(means, var, (w0[:, None] * w1[None, :]).reshape(-1))
    x = torch.rand(6, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 1.6 - 0.8
    for t in (1e-3, 0.05, 0.5):
        torch.testing.assert_close(dist.log_prob(x, t, sde), joint.log_prob(x, t, sde), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(dist.score(x, t, sde), joint.score(x, t, sde), rtol=1e-7, atol=1e-7)


def test_discrete_exact_score_is_the_gradient_of_log_q_and_handles_chunks(monkeypatch):
    import hosm_lightning.data.discrete as discrete

    dm = DiscreteDataModule(shape="image", kind="discrete")
    dist, sde = dm.distribution, VPSDE()
    x = (torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2 - 1).requires_grad_()
    t = torch.tensor([1e-4, 1e-2, 0.3], dtype=torch.float64)
    (grad,) = torch.autograd.grad(dist.log_prob(x, t, sde).sum(), x)
    torch.testing.assert_close(dist.score_fn(sde)(x.detach(), t), grad, rtol=1e-6, atol=1e-6)
    # the closed-form diagonal derivative that score_fn's backward uses = autograd's second derivative
    xs = x.detach().clone().requires_grad_()
    (diag,) = torch.autograd.grad(dist.score_fn(sde)(xs, t).sum(), xs)
    xr = x.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad(dist.log_prob(xr, t, sde).sum(), xr, create_graph=True)
    (ref,) = torch.autograd.grad(g.sum(), xr)  # Jacobian is diagonal: column sums = diagonal
    torch.testing.assert_close(diag, ref, rtol=1e-6, atol=1e-6)
    full = dist.log_prob(x.detach(), t, sde)
    monkeypatch.setattr(discrete, "_CHUNK", 1000)  # one sample per chunk
    torch.testing.assert_close(dist.log_prob(x.detach(), t, sde), full)
    torch.testing.assert_close(dist.score(x.detach(), t, sde), grad, rtol=1e-6, atol=1e-6)


def test_discrete_smooth_kind_at_t0_is_the_base_density_and_discrete_kind_refuses():
    dm = DiscreteDataModule(shape="1d", kind="smooth", centered=False)
    means, stds, w = MARGINALS[2]
    y = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)[:, None]
    ref = np.log(sum(wi * stats.norm.pdf(y.numpy(), mu, s) for mu, s, wi in zip(means, stds, w))).squeeze(1)
    np.testing.assert_allclose(dm.distribution.log_prob(y).numpy(), ref, rtol=1e-10)
    with pytest.raises(ValueError, match="t > 0"):
        DiscreteDataModule(shape="1d").distribution.log_prob(y)


def test_discrete_bad_arguments():
    with pytest.raises(ValueError, match="shape"):
        DiscreteDataModule(shape="3d")
    with pytest.raises(ValueError, match="kind"):
        DiscreteDataModule(kind="continuous")
    for arg in ("batch_size", "eval_batch_size", "steps_per_epoch", "val_size", "test_size"):
        with pytest.raises(ValueError, match=arg):
            DiscreteDataModule(**{arg: 0})
    with pytest.raises(ValueError, match="dimensions"):
        DiscreteDataModule(shape="2d").distribution.log_prob(torch.zeros(2, 3), 0.1, VPSDE())


# ==================================================================================================
# CIFAR-10
# ==================================================================================================
def test_fake_cifar_format(fake_root):
    folder = fake_root / "cifar-10-batches-py"
    with open(folder / "data_batch_1", "rb") as fh:
        d = pickle.load(fh, encoding="bytes")
    assert d[b"data"].dtype == np.uint8 and d[b"data"].shape == (10, 3072) and len(d[b"labels"]) == 10
    with open(folder / "batches.meta", "rb") as fh:
        assert pickle.load(fh, encoding="bytes")[b"label_names"][0] == b"airplane"
    x, y = read_cifar10(fake_root, train=True)
    assert x.shape == (50, 3, 32, 32) and x.dtype == torch.uint8 and y.shape == (50,)
    assert torch.equal(x[0].reshape(-1), torch.from_numpy(d[b"data"][0]))  # channel-major layout


@pytest.mark.parametrize("centered", [True, False])
def test_cifar_batches(fake_root, centered):
    dm = CIFAR10DataModule(str(fake_root), batch_size=8, eval_batch_size=6, centered=centered,
                           num_workers=0, val_size=10, test_subset=15)
    assert dm.dim == 3072 and dm.image_shape == (3, 32, 32) and dm.centered is centered and dm.data_spec().entropy is None
    dm.setup("fit")
    dm.setup("test")
    train = list(dm.train_dataloader())
    assert len(train) == 5 and all(b.shape == (8, 3, 32, 32) and b.dtype == torch.float32 for b in train)
    lo = -1.0 if centered else 0.0
    allx = torch.cat(train)
    assert allx.min() >= lo and allx.max() <= 1.0 and allx.min() < lo + 0.05
    val, val_index, val_batches = eval_rows(dm.val_dataloader())
    test, test_index, _ = eval_rows(dm.test_dataloader())
    assert val.dtype == test.dtype == torch.uint8
    assert val.shape == (10, 3, 32, 32) and test.shape == (15, 3, 32, 32)
    assert [len(b["x"]) for b in val_batches] == [6, 4]  # eval_batch_size, in order
    assert val_index.tolist() == list(range(10)) and test_index.tolist() == list(range(15))
    full, _ = read_cifar10(fake_root, train=True)
    assert torch.equal(val, full[40:])  # the last val_size training images
    train_raw = dm.train_set.images
    assert len(train_raw) == 40
    assert not any(torch.equal(v, t) for v in val for t in train_raw)  # disjoint
    assert torch.equal(test, read_cifar10(fake_root, train=False)[0][:15])


def test_cifar_random_flips(fake_root):
    dm = CIFAR10DataModule(str(fake_root), num_workers=0, val_size=10, centered=False)
    dm.setup("fit")
    torch.manual_seed(0)
    raw = dm.train_set.images.float() / 255
    items = torch.stack([dm.train_set[i] for i in range(len(raw))])
    same = (items == raw).flatten(1).all(1)
    flipped = (items == raw.flip(-1)).flatten(1).all(1)
    assert (same ^ flipped).all() and 5 < flipped.sum() < 35
    dm2 = CIFAR10DataModule(str(fake_root), num_workers=0, val_size=10, centered=False, random_flip=False)
    dm2.setup("fit")
    assert torch.equal(torch.stack([dm2.train_set[i] for i in range(len(raw))]), raw)


def test_cifar_missing_and_corrupt(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr("torchvision.datasets.CIFAR10", no_network)
    dm = CIFAR10DataModule(str(tmp_path / "nowhere"), num_workers=0)
    dm.prepare_data()  # download=False: a no-op
    with pytest.raises(FileNotFoundError, match=r"nowhere/cifar-10-batches-py.*cifar-10-python.tar.gz.*download=true"):
        dm.setup("fit")

    folder = write_fake_cifar10(tmp_path / "bad", n_train=10, n_test=5)
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"corrupt CIFAR-10 file .*bad/cifar-10-batches-py/data_batch_3"):
        CIFAR10DataModule(str(tmp_path / "bad"), num_workers=0, val_size=2).setup("fit")
    with open(folder / "data_batch_3", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, fh)
    with pytest.raises(ValueError, match=r"data_batch_3.*uint8 \[N, 3072\]"):
        read_cifar10(tmp_path / "bad")
    (folder / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match=r"bad/cifar-10-batches-py/test_batch"):
        read_cifar10(tmp_path / "bad", train=False)


def test_cifar_bad_args(fake_root):
    for arg in ("batch_size", "eval_batch_size", "val_size", "test_subset"):
        with pytest.raises(ValueError, match=arg):
            CIFAR10DataModule(str(fake_root), **{arg: 0})
    with pytest.raises(ValueError, match="num_workers"):
        CIFAR10DataModule(str(fake_root), num_workers=-1)
    with pytest.raises(ValueError, match="val_size=60"):
        CIFAR10DataModule(str(fake_root), val_size=60, num_workers=0).setup("fit")
    not_set_up = CIFAR10DataModule(str(fake_root), num_workers=0)
    for loader in (not_set_up.train_dataloader, not_set_up.val_dataloader, not_set_up.test_dataloader):
        with pytest.raises(RuntimeError, match="setup"):
            loader()


# ==================================================================================================
# DataSpec: what callbacks and the module read of a data module
# ==================================================================================================
def test_data_spec_describes_every_data_module(fake_root):
    """The one interface callbacks read (DataSpec via describe), with the exact densities where known."""
    mog = describe(SyntheticDataModule(name="mog1d"))
    x = torch.linspace(-1, 1, 7)[:, None]
    assert mog.shape == (1,) and mog.dim == 1 and not mog.discrete and not mog.is_image
    assert mog.entropy == pytest.approx(-0.12885, abs=1e-5) and torch.equal(mog.log_prob(x), mog.mixture.log_prob(x))
    board = describe(SyntheticDataModule(name="checkerboard"))
    pts = torch.tensor([[0.5, 0.5], [-0.5, 0.5]])  # cell sums 0 (inside) and -1 (outside)
    assert board.mixture is None and board.log_prob(pts)[0] == pytest.approx(-math.log(32))
    assert torch.isneginf(board.log_prob(pts)[1]) and board.entropy == pytest.approx(math.log(32))
    roll = describe(SyntheticDataModule(name="swissroll"))
    assert roll.log_prob is None and roll.entropy is None and roll.sample(5).shape == (5, 2)
    cifar = describe(CIFAR10DataModule(str(fake_root), centered=False))
    assert cifar.shape == (3, 32, 32) and cifar.is_image and cifar.discrete and cifar.centered is False
    ref = cifar.reference_images()
    assert ref.dtype == torch.uint8 and ref.shape[1:] == (3, 32, 32)
    disc = describe(DiscreteDataModule(shape="image", centered=False))
    assert disc.shape == (3, 8, 8) and disc.discrete and disc.centered is False and disc.log_prob_bytes is not None
    assert disc.entropy == DiscreteDataModule(shape="image").entropy_bits
    assert describe(None) == DataSpec() and describe(L.LightningDataModule()) == DataSpec()


def test_one_data_range_conversion():
    from hosm_lightning.core.data_range import bytes_to_model, model_to_bytes, model_to_unit

    k = torch.arange(256, dtype=torch.uint8)
    for centered, lo in ((True, -1.0), (False, 0.0)):
        x = bytes_to_model(k, centered)
        assert x[0] == lo and x[-1] == 1.0 and torch.allclose(x[1] - x[0], torch.tensor((1 - lo) / 255))
        assert torch.equal(model_to_bytes(x, centered), k)  # round trip
        assert torch.allclose(model_to_unit(x, centered), k.float() / 255)
    assert torch.equal(model_to_bytes(torch.tensor([float("nan"), 2.0, -3.0]), True), torch.tensor([0, 255, 0], dtype=torch.uint8))


# ==================================================================================================
# training streams: batch i of an epoch is a function of (seed, rank, epoch, i); resumable mid-epoch
# ==================================================================================================
def _stream(steps=5, key=(7, 0, 0)):
    holder = {"key": key}
    fresh = FreshBatches(lambda n, g: torch.randn(n, 2, generator=g), 4, steps, lambda: holder["key"])
    return ResumableLoader(fresh), holder


def test_fresh_batches_depend_on_seed_rank_epoch_and_index_only():
    loader, holder = _stream()
    epoch0 = list(loader)
    assert len(loader) == 5 and len(epoch0) == 5 and all(b.shape == (4, 2) for b in epoch0)
    assert all(not torch.equal(epoch0[i], epoch0[j]) for i in range(5) for j in range(i))
    assert all(torch.equal(a, b) for a, b in zip(epoch0, list(_stream()[0])))  # a new loader, same stream
    for key in ((8, 0, 0), (7, 1, 0), (7, 0, 1)):  # another seed, rank or epoch: another stream
        holder["key"] = key
        other = list(loader)  # the key is read at each iter()
        assert not any(torch.equal(a, b) for a in other for b in epoch0), key
    assert train_key(None, 7) == (7, 0, 0)
    assert train_key(stub_trainer(2, 1, epoch=3), 7) == (7, 1, 3)


def test_resumable_loader_continues_mid_epoch():
    loader, _ = _stream()
    full = list(loader)
    it = iter(loader)
    for _ in range(2):
        next(it)
    state = loader.state_dict()
    assert state == {"yielded": 2}
    resumed, _ = _stream()
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == 3 and all(torch.equal(a, b) for a, b in zip(rest, full[2:]))
    assert all(torch.equal(a, b) for a, b in zip(list(resumed), full))  # the next epoch starts at batch 0
    at_end, _ = _stream()
    at_end.load_state_dict({"yielded": 5})  # saved after the last batch: the next epoch from the start
    assert len(list(at_end)) == 5


@pytest.mark.parametrize("make_dm", [lambda: SyntheticDataModule("mog1d", batch_size=4, steps_per_epoch=5),
                                     lambda: DiscreteDataModule("1d", batch_size=4, steps_per_epoch=5)],
                         ids=["synthetic", "discrete"])
def test_data_module_streams_resume_through_state_dict(make_dm):
    ref = make_dm()
    ref.trainer = stub_trainer(1, 0, epoch=1)
    full = list(ref.train_dataloader())
    dm = make_dm()
    dm.trainer = stub_trainer(1, 0, epoch=1)
    loader = dm.train_dataloader()
    it = iter(loader)
    seen = [next(it) for _ in range(3)]
    state = loader.state_dict()
    fresh = make_dm()
    fresh.trainer = stub_trainer(1, 0, epoch=1)
    resumed = fresh.train_dataloader()
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(seen + list(resumed), full))


class _RecordBatches(L.LightningModule):
    """Records every training batch and the test batches it is given."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.train_batches, self.test_batches = [], []

    def training_step(self, batch, batch_idx):
        self.train_batches.append(batch.clone())
        return (self.w * batch).sum() + self.w**2

    def test_step(self, batch, batch_idx):
        self.test_batches.append({k: v.clone() for k, v in batch.items()})

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _StopAt(L.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            raise RuntimeError("stopped")


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no `validation_step`")
def test_training_stream_resumes_mid_epoch_under_lightning(make_trainer, tmp_path):
    """Lightning saves the loader's state in the checkpoint: a run resumed mid-epoch is fed the
    batches the uninterrupted run was fed, from the checkpointed step on."""
    dm = lambda: SyntheticDataModule("mog1d", batch_size=4, steps_per_epoch=5, val_size=4, test_size=4)  # noqa: E731
    ref = _RecordBatches()
    make_trainer(8).fit(ref, dm())
    assert len(ref.train_batches) == 8  # two epochs: 5 + 3

    ckpt = lambda d: ModelCheckpoint(dirpath=tmp_path / d, every_n_train_steps=1, save_last=True, save_top_k=-1)  # noqa: E731
    with pytest.raises(RuntimeError, match="stopped"):
        make_trainer(8, [ckpt("ck"), _StopAt(3)], enable_checkpointing=True).fit(_RecordBatches(), dm())
    last = (tmp_path / "ck" / "last.ckpt").rename(tmp_path / "last.ckpt")
    shutil.rmtree(tmp_path / "ck")  # the resumed run checkpoints into the same, now empty, folder
    step = torch.load(last, weights_only=True)["global_step"]
    assert 0 < step < 5  # mid-epoch
    resumed = _RecordBatches()
    make_trainer(8, [ckpt("ck")], enable_checkpointing=True).fit(resumed, dm(), ckpt_path=str(last))
    assert len(resumed.train_batches) == 8 - step
    for i, (a, b) in enumerate(zip(resumed.train_batches, ref.train_batches[step:])):
        assert torch.equal(a, b), f"step {step + i}"


# ==================================================================================================
# evaluation sharding: every point on exactly one rank, each batch with its dataset indices
# ==================================================================================================
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_indices_cover_every_index_exactly_once(world):
    for n in range(10):
        shards = [list(shard_indices(n, world, r)) for r in range(world)]
        assert sorted(i for s in shards for i in s) == list(range(n)), (n, world)
        for r, s in enumerate(shards):
            assert s == list(range(r, n, world))  # rank, rank + W, ...
        assert max(map(len, shards)) - min(map(len, shards)) <= 1  # balanced, no padding


def test_eval_sampler_is_a_distributed_sampler_without_padding():
    data = IndexedRows(torch.arange(7))
    samplers = [EvalSampler(data, num_replicas=3, rank=r) for r in range(3)]
    assert all(isinstance(s, DistributedSampler) for s in samplers)  # what Lightning leaves in place
    assert [list(s) for s in samplers] == [[0, 3, 6], [1, 4], [2, 5]]
    assert [len(s) for s in samplers] == [3, 2, 2]
    samplers[1].set_epoch(4)  # no shuffling: the epoch does not change the order
    assert list(samplers[1]) == [1, 4]


def test_eval_loader_shards_by_the_trainer_rank():
    data = IndexedRows(torch.arange(10, 17))  # 7 rows, values 10 + index
    for trainer in (None, stub_trainer(1, 0)):
        loader = eval_loader(data, 3, trainer)
        assert isinstance(loader.sampler, SequentialSampler)
        x, index, _ = eval_rows(loader)
        assert index.tolist() == list(range(7)) and torch.equal(x, 10 + index)
    seen = []
    for rank in (0, 1):
        loader = eval_loader(data, 3, stub_trainer(2, rank), num_workers=0)
        assert isinstance(loader.sampler, EvalSampler) and loader.sampler.rank == rank
        x, index, _ = eval_rows(loader)
        assert index.tolist() == list(range(rank, 7, 2)) and torch.equal(x, 10 + index)
        seen += index.tolist()
    assert sorted(seen) == list(range(7))


def test_batch_tensor_and_batch_index():
    x = torch.randn(3, 2)
    indexed = {"x": x, "index": torch.tensor([4, 5, 6])}
    assert batch_tensor(indexed) is x and batch_index(indexed).tolist() == [4, 5, 6]
    assert batch_index({"x": x, "index": [1, 2, 3]}).tolist() == [1, 2, 3]
    assert batch_tensor(x) is x and batch_index(x) is None
    assert batch_tensor((x, torch.zeros(3))) is x and batch_index([x, torch.zeros(3)]) is None
    assert batch_index({"x": x}) is None


def _synthetic(fake_root):
    return SyntheticDataModule("checkerboard", batch_size=3, val_size=7, test_size=8)


def _discrete(fake_root):
    return DiscreteDataModule("image", eval_batch_size=3, val_size=7, test_size=8)


def _cifar(fake_root):
    return CIFAR10DataModule(str(fake_root), eval_batch_size=3, num_workers=0, val_size=7, test_subset=8)


def _eval_data(dm, split: str) -> torch.Tensor:
    """The full evaluation set a data module documents, rows in index order, built independently of
    its loaders: seeded draws (seed + 1 for val, seed + 2 for test) or the CIFAR-10 files."""
    if isinstance(dm, CIFAR10DataModule):
        if split == "val":
            return read_cifar10(dm.root, train=True)[0][-dm.val_size:]  # the last val_size training images
        return read_cifar10(dm.root, train=False)[0][: dm.test_subset]
    n, seed = (dm.val_size, dm.seed + 1) if split == "val" else (dm.test_size, dm.seed + 2)
    draw = dm.sample_bytes if isinstance(dm, DiscreteDataModule) else dm.sample
    return draw(n, torch.Generator().manual_seed(seed))


DATA_MODULES = pytest.mark.parametrize("make_dm", [_synthetic, _discrete, _cifar], ids=["synthetic", "discrete", "cifar"])


@DATA_MODULES
def test_eval_batches_carry_their_dataset_indices_on_every_rank(make_dm, fake_root):
    """Under 2 ranks (a stub trainer), val and test batches of each rank hold the rows
    rank, rank + 2, ... with those indices, and the two ranks together hold every row once."""
    dm = make_dm(fake_root)
    dm.setup(None)
    for split, n in (("val", 7), ("test", 8)):
        data = _eval_data(dm, split)
        assert len(data) == n
        seen = []
        for rank in (0, 1):
            dm.trainer = stub_trainer(2, rank)
            x, index, batches = eval_rows(getattr(dm, f"{split}_dataloader")())
            assert index.tolist() == list(range(rank, n, 2)), (split, rank)
            assert x.dtype == data.dtype and torch.equal(x, data[index]), (split, rank)  # uint8 bytes stay uint8
            assert all(len(b["x"]) <= 3 for b in batches)
            seen += index.tolist()
        assert sorted(seen) == list(range(n)), split


@DATA_MODULES
def test_lightning_keeps_the_eval_sampler_under_ddp(make_dm, fake_root):
    """A DDP trainer (2 processes, this one rank 1; not launched) runs the data module's loaders through
    Lightning's own loader processing: the EvalSampler stays (no DistributedSampler with padding put in
    its place), so rank 1 sees rows 1, 3, 5, ... exactly once, with their indices."""
    trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    trainer.strategy.cluster_environment.set_global_rank(1)
    assert (trainer.world_size, trainer.global_rank) == (2, 1)
    dm = make_dm(fake_root)
    dm.setup(None)
    dm.trainer = trainer
    for split, stage, fn in (("val", RunningStage.VALIDATING, TrainerFn.VALIDATING),
                             ("test", RunningStage.TESTING, TrainerFn.TESTING)):
        loader = getattr(dm, f"{split}_dataloader")()
        processed = _process_dataloader(trainer, fn, stage, loader)
        assert isinstance(processed.sampler, EvalSampler) and processed.sampler is loader.sampler
        x, index, _ = eval_rows(processed)
        data = _eval_data(dm, split)
        assert index.tolist() == list(range(1, len(data), 2)) and x.dtype == data.dtype and torch.equal(x, data[index])
    # the same trainer does replace a plain loader's sampler by a padding DistributedSampler
    plain = DataLoader(IndexedRows(torch.arange(7)), batch_size=3)
    replaced = _process_dataloader(trainer, TrainerFn.TESTING, RunningStage.TESTING, plain)
    assert type(replaced.sampler) is DistributedSampler and list(replaced.sampler) == [1, 3, 5, 0]


@DATA_MODULES
def test_lightning_test_loop_sees_every_point_once_with_its_index(make_dm, fake_root, make_trainer):
    dm = make_dm(fake_root)
    module = _RecordBatches()
    make_trainer().test(module, datamodule=dm, verbose=False)
    x = torch.cat([b["x"] for b in module.test_batches])
    index = torch.cat([b["index"] for b in module.test_batches])
    data = _eval_data(dm, "test")
    assert index.tolist() == list(range(8)) and x.dtype == data.dtype and torch.equal(x, data[index])
