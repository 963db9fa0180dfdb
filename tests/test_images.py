"""Real-image data: sources, patches, splits by source, crops and flips, L grey levels in bits/dim, bad input."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT, clean_env

from hosm_lightning.core.data_range import bytes_to_model, model_to_bytes
from hosm_lightning.core.dequantization import bits_per_dim, dequantization_draws
from hosm_lightning.core.sde import VPSDE
from hosm_lightning.data import ImageDataModule
from hosm_lightning.data.image_sources import ImageDataError, read_digits
from hosm_lightning.data.images import patch_grid
from hosm_lightning.data.sharding import batch_index, batch_tensor


def _ramps(n: int = 4, size: int = 12, channels: int = 3) -> np.ndarray:
    """n images [n, H, W, C] whose every pixel value tells the image, row and column: 100·i + ... (mod 256),
    and which are not left-right symmetric."""
    i, r, c = np.meshgrid(np.arange(n), np.arange(size), np.arange(size), indexing="ij")
    grey = (40 * i + 3 * r + c) % 256
    return np.repeat(grey[..., None], channels, axis=3).astype(np.uint8)


@pytest.fixture
def array_file(tmp_path):
    path = tmp_path / "ramps.npz"
    np.savez(path, images=_ramps(), labels=np.arange(4))
    return path


def _dm(path, **kw) -> ImageDataModule:
    dm = ImageDataModule(source="array", path=str(path), **{"patch_size": 4, "stride": 4, **kw})
    dm.setup()
    return dm


# -- reading and splitting --------------------------------------------------------------------------
def test_array_layouts_give_the_same_images(tmp_path):
    hwc = _ramps()
    for name, arr in (("nhwc", hwc), ("nchw", np.moveaxis(hwc, 3, 1)), ("grey", hwc[..., 0])):
        np.save(tmp_path / f"{name}.npy", arr)
    a, b = _dm(tmp_path / "nhwc.npy"), _dm(tmp_path / "nchw.npy")
    assert torch.equal(a.split_images("train")[0], b.split_images("train")[0])
    grey = _dm(tmp_path / "grey.npy").split_images("train")[0]
    assert grey.shape[1] == 1 and torch.equal(grey[:, 0], a.split_images("train")[0][:, 0])


def test_patch_grid_covers_the_image_and_ends_at_the_border():
    assert patch_grid(12, 10, 4, 4) == [(r, c) for r in (0, 4, 8) for c in (0, 4, 6)]
    with pytest.raises(ImageDataError, match="patch_size 16 is larger than an image of 12×10"):
        patch_grid(12, 10, 16, 4)


def test_split_by_source_keeps_every_test_patch_out_of_the_training_images(array_file):
    dm = _dm(array_file, val_sources=["ramps[1]"], test_sources=["ramps[3]"])
    images = torch.from_numpy(np.moveaxis(_ramps(), 3, 1))
    labels = {s: dm.split_images(s)[1].unique().tolist() for s in ("train", "val", "test")}
    assert labels == {"train": [0, 2], "val": [1], "test": [3]}
    test, _ = dm.split_images("test")
    assert len(test) == 9 and torch.equal(test[0], images[3, :, :4, :4])  # a 3x3 grid of 4x4 patches
    # the image index is encoded in the pixel values: a test patch never holds a training image's values
    pixel_image = ((test[:, 0, 0, 0].long() - 0) // 40) % 256
    assert set(pixel_image.tolist()) == {3}


def test_seeded_index_split_is_disjoint_reproducible_and_sized(array_file):
    a, b = _dm(array_file, seed=3), _dm(array_file, seed=3)
    sets = {s: {tuple(x.flatten().tolist()) for x in a.split_images(s)[0]} for s in ("train", "val", "test")}
    assert not (sets["train"] & sets["test"]) and not (sets["train"] & sets["val"]) and not (sets["val"] & sets["test"])
    assert sum(len(v) for v in sets.values()) == 36 and len(sets["test"]) == round(0.2 * 36)
    assert torch.equal(a.split_images("test")[0], b.split_images("test")[0])
    assert not torch.equal(_dm(array_file, seed=4).split_images("test")[0], a.split_images("test")[0])
    assert len(_dm(array_file, test_size=3).split_images("test")[0]) == 3


def test_training_draws_are_crops_of_training_images_flipped_half_the_time(array_file):
    dm = _dm(array_file, val_sources=["ramps[1]"], test_sources=["ramps[3]"], random_flip=True, centered=False)
    x = dm.draw_train(400, torch.Generator().manual_seed(0))
    k = model_to_bytes(x, centered=False)
    images = torch.from_numpy(np.moveaxis(_ramps(), 3, 1))
    flipped = 0
    for patch in k:
        found = [(i, f) for i in (0, 2) for f in (False, True)
                 for r in range(9) for c in range(9)
                 if torch.equal((patch.flip(-1) if f else patch), images[i, :, r:r + 4, c:c + 4])]
        assert found, "a training draw that is no crop of a training image"
        flipped += found[0][1]
    assert 150 < flipped < 250  # ~Binomial(400, 1/2)
    # random crops reach positions off the stride grid; the stream is a function of the generator
    assert torch.equal(x, dm.draw_train(400, torch.Generator().manual_seed(0)))
    grid = _dm(array_file, random_crop=False, val_sources=["ramps[1]"], test_sources=["ramps[3]"], centered=False)
    corners = {int(p[0, 0, 0]) % 40 for p in model_to_bytes(grid.draw_train(200, torch.Generator()), centered=False)}
    assert corners <= {3 * r + c for r in (0, 4, 8) for c in (0, 4, 8)}


def test_evaluation_batches_are_uint8_levels_with_their_indices(array_file):
    dm = _dm(array_file, eval_batch_size=4)
    batches = list(dm.test_dataloader())
    assert batch_tensor(batches[0]).dtype == torch.uint8
    assert torch.cat([batch_index(b) for b in batches]).tolist() == list(range(len(dm.split_images("test")[0])))
    spec = dm.data_spec()
    assert spec.discrete and spec.levels == 256 and spec.shape == (3, 4, 4)


def test_digits_have_17_levels_and_a_png_folder_reads_like_the_array(tmp_path):
    from PIL import Image

    src = read_digits()
    assert len(src.images) == 1797 and src.levels == 17 and max(int(x.max()) for x in src.images) == 16
    dm = ImageDataModule(source="digits")
    dm.setup()
    assert dm.data_spec().levels == 17 and dm.data_spec().shape == (1, 8, 8)
    for i, im in enumerate(_ramps(3)):
        Image.fromarray(im).save(tmp_path / f"img{i}.png")
    folder = ImageDataModule(source="folder", path=str(tmp_path), patch_size=4, val_sources=["img0", "img2"],
                             test_sources=["img1"])
    with pytest.raises(ImageDataError, match="the train split has no images"):
        folder.setup()
    np.save(tmp_path / "three.npy", _ramps(3))
    for dm in (ImageDataModule(source="folder", path=str(tmp_path), patch_size=4, val_sources=["img0"],
                               test_sources=["img1"]),
               ImageDataModule(source="array", path=str(tmp_path / "three.npy"), patch_size=4, val_sources=["three[0]"],
                               test_sources=["three[1]"])):
        dm.setup()
        assert torch.equal(dm.split_images("test")[0][0], torch.from_numpy(np.moveaxis(_ramps(3)[1], 2, 0))[:, :4, :4])


# -- L grey levels in bits/dim ----------------------------------------------------------------------
@pytest.mark.parametrize("levels", [17, 32, 256])
@pytest.mark.parametrize("centered", [False, True])
def test_a_model_uniform_on_the_unit_cube_has_exactly_log2_L_bits_per_dim(levels, centered):
    k = torch.randint(0, levels, (6, 1, 4, 4), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    dim = 16
    log_p = (lambda y: torch.full((len(y),), -dim * math.log(2.0), dtype=torch.float64)) if centered else \
        (lambda y: torch.zeros(len(y), dtype=torch.float64))  # uniform on [-1, 1]^D or [0, 1]^D
    out = bits_per_dim(log_p, k, centered=centered, levels=levels, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out.bpd, torch.full((6,), math.log2(levels), dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("levels", [17, 256])
def test_dequantized_points_stay_in_their_level_bins(levels):
    k = torch.arange(levels, dtype=torch.uint8).reshape(-1, 1)
    y, _ = dequantization_draws(k, centered=False, levels=levels, num_importance=64, generator=torch.Generator())
    assert bool(((y >= k.float() / levels) & (y < (k.float() + 1) / levels)).all())  # uniform: bins [k/L, (k+1)/L)
    sde = VPSDE()
    eps = 0.02  # σ(eps) ≈ 0.045: comparable to the half bin of 17 levels, so the truncation at ±τ is visible
    y, log_q = dequantization_draws(k, centered=True, levels=levels, dequantization="tn", sde=sde, eps=eps,
                                    num_importance=64, generator=torch.Generator())
    a, sigma = (float(v) for v in sde.marginal(torch.tensor([eps], dtype=torch.float64)))
    centre = bytes_to_model(k, True, torch.float64, levels)
    half = 1.0 / (levels - 1)  # half a bin in [-1, 1]
    assert bool(((y.double() - a * centre).abs() <= a * half * (1 + 1e-5) + 1e-7).all())
    assert bool(torch.isfinite(log_q).all())
    # the draws reach out to near the bin edge: τ follows L (with 256 levels' τ they would stay within a/255)
    assert float((y.double() - a * centre).abs().max()) > 0.5 * a * half


def test_levels_round_trip_and_values_outside_the_levels_are_refused():
    k = torch.arange(17, dtype=torch.uint8)
    assert torch.equal(model_to_bytes(bytes_to_model(k, True, levels=17), True, levels=17), k)
    with pytest.raises(ValueError, match="value 17 is outside the 17 grey levels"):
        bits_per_dim(lambda y: torch.zeros(len(y)), torch.tensor([[17]], dtype=torch.uint8), centered=True, levels=17)
    with pytest.raises(ValueError, match="levels must be an integer number of grey levels in 2..256"):
        bits_per_dim(lambda y: torch.zeros(len(y)), k[:, None], centered=True, levels=300)


# -- bad input --------------------------------------------------------------------------------------
@pytest.mark.parametrize("case, message", [
    ("missing", "image array file not found"),
    ("float", "images must hold integer grey levels \\(uint8\\), got dtype float32"),
    ("rank", "need a non-empty array \\[N, H, W\\]"),
    ("levels", "value 164 is outside the declared 17 grey levels 0..16; set levels to at least 165"),
    ("empty_split", "the val split has no images"),
    ("patch", "patch_size 32 is larger than an image of 12×12"),
    ("unknown_source", "name images that are not in the data: \\['nope'\\]"),
])
def test_bad_image_data_is_one_clear_error(tmp_path, case, message):
    path = tmp_path / "x.npy"
    arr = {"float": _ramps().astype(np.float32), "rank": np.zeros((4, 12), np.uint8)}.get(case, _ramps())
    if case != "missing":
        np.save(path, arr)
    kw = {"levels": 17} if case == "levels" else {}
    kw |= {"val_fraction": 0.0} if case == "empty_split" else {}
    kw |= {"patch_size": 32} if case == "patch" else {}
    kw |= {"test_sources": ["nope"]} if case == "unknown_source" else {}
    with pytest.raises(ImageDataError, match=message):
        _dm(path, **{"patch_size": 4, **kw})


def test_bad_settings_are_refused_when_the_module_is_built():
    with pytest.raises(ImageDataError, match="source must be one of"):
        ImageDataModule(source="imagenet")
    with pytest.raises(ImageDataError, match="source 'array' needs path"):
        ImageDataModule(source="array")
    with pytest.raises(ImageDataError, match="unknown scikit-image photograph 'lena'"):
        ImageDataModule(source="photographs", photos=["lena"], patch_size=8).setup()
    with pytest.raises(ImageDataError, match="the images mix grey and colour"):
        ImageDataModule(source="photographs", photos=["camera", "chelsea"], patch_size=8).setup()


@pytest.mark.slow
def test_the_cli_reports_missing_image_data_in_one_line_with_exit_status_2(tmp_path):
    cmd = [sys.executable, str(ROOT / "cli.py"), "fit", "--config", str(ROOT / "configs" / "digits.yaml"),
           "--data.init_args.source", "array", "--data.init_args.path", str(tmp_path / "missing.npz"),
           "--trainer.default_root_dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert lines == [f"hosm-lightning: error: image array file not found: {tmp_path / 'missing.npz'}; "
                     "set data.init_args.path to a .npy or .npz file"]

