"""Synthetic toy data and the CIFAR-10 DataModule (docs/design.md §5, §6)."""

import math
import pickle
import socket
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hosm_lightning.core import paper_mog1d
from hosm_lightning.data import CIFAR10DataModule, SyntheticDataModule, checkerboard, read_cifar10, swissroll, write_fake_cifar10


# -- samplers ---------------------------------------------------------------------------------------
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


# -- SyntheticDataModule ------------------------------------------------------------------------------
def _first_batches(dm, k=2):
    return [b for _, b in zip(range(k), dm.train_dataloader())]


def test_train_batches_fresh_per_step_rank_epoch():
    dm = SyntheticDataModule("checkerboard", batch_size=64, steps_per_epoch=3, val_size=10, test_size=10)
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(loader) == 3 and len(batches) == 3
    assert all(b.shape == (64, 2) and b.dtype == torch.float32 for b in batches)
    assert not torch.equal(batches[0], batches[1])
    assert torch.equal(batches[0], next(iter(loader)))  # same (seed, rank, epoch) replays
    dm.trainer = SimpleNamespace(global_rank=1, current_epoch=0)
    rank1 = next(iter(loader))
    dm.trainer = SimpleNamespace(global_rank=0, current_epoch=1)
    epoch1 = next(iter(loader))
    assert not torch.equal(rank1, batches[0]) and not torch.equal(epoch1, batches[0])
    assert not torch.equal(rank1, epoch1)


def test_val_test_fixed_and_identical_across_instances():
    a = SyntheticDataModule("swissroll", batch_size=300, val_size=500, test_size=700, seed=3)
    b = SyntheticDataModule("swissroll", batch_size=300, val_size=500, test_size=700, seed=3)
    b.trainer = SimpleNamespace(global_rank=2, current_epoch=5)  # rank does not matter for eval sets
    a.setup("fit"), b.setup("fit")
    va, vb = list(a.val_dataloader()), list(b.val_dataloader())
    assert [v.shape for v in va] == [(300, 2), (200, 2)] and all(isinstance(v, torch.Tensor) for v in va)
    assert all(torch.equal(p, q) for p, q in zip(va, vb))
    ta = torch.cat(list(a.test_dataloader()))
    assert ta.shape == (700, 2) and torch.equal(ta, torch.cat(list(b.test_dataloader())))
    assert not torch.equal(ta[:500], torch.cat(va))


def test_properties_and_entropy():
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


# -- CIFAR-10 ---------------------------------------------------------------------------------------
@pytest.fixture
def fake_root(tmp_path):
    write_fake_cifar10(tmp_path, n_train=50, n_test=20, seed=0)
    return tmp_path


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
    val, test = torch.cat(list(dm.val_dataloader())), torch.cat(list(dm.test_dataloader()))
    assert val.dtype == test.dtype == torch.uint8
    assert val.shape == (10, 3, 32, 32) and test.shape == (15, 3, 32, 32)
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
    with pytest.raises(ValueError, match="val_size"):
        CIFAR10DataModule(str(fake_root), val_size=0)
    with pytest.raises(ValueError, match="val_size=60"):
        CIFAR10DataModule(str(fake_root), val_size=60, num_workers=0).setup("fit")


def test_data_spec_describes_every_data_module(fake_root):
    """The one interface callbacks read (DataSpec via describe), with the exact densities where known."""
    import lightning as L

    from hosm_lightning.data import DataSpec, DiscreteDataModule, describe

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
