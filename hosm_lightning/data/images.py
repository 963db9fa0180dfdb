"""Real images as training and bits/dim data: arrays, PNG folders, scikit-image photographs, scikit-learn digits.

:class:`ImageDataModule` reads an :class:`~.image_sources.ImageSource` (uint8 images with L grey
levels), cuts square patches (``patch_size``, ``stride``) or keeps whole images, and splits them
into train / val / test either **by source** (``val_sources`` / ``test_sources`` name whole images,
e.g. photographs: no test patch comes from a training photograph) or by a seeded split of the items
(``val_fraction`` / ``test_fraction``).

* Training batches are floats in the model range (core/data_range.py with L levels), drawn fresh:
  batch i of an epoch is a pure function of (seed, rank, epoch, i) (``streams.FreshBatches``), so runs
  are reproducible and resumable mid-epoch, and fine-tunes started from one checkpoint see the same
  data stream. A draw picks a training image with probability proportional to its number of patch
  positions, a patch position (any position with ``random_crop``, else one of the stride grid), and
  flips it horizontally with probability ½ (``random_flip``). With ``train_dequantization='uniform'``
  the levels k become (k + u)/L, u ~ U[0, 1) (in the model range): the training data are then the
  density that the uniform bits/dim protocol scores. With few levels this is needed: trained on the
  bin centres k/(L−1) alone, the model learns spikes of width σ(eps) ≪ the bin at the L centres, and
  its uniform-protocol bits/dim grows as it learns them (17 levels: bins of width 2/17 in [−1, 1]).
* Validation and test batches are **uint8 levels** 0..L−1 on the stride grid, with their index, each
  point once across DDP ranks (``sharding.eval_loader``): ``test`` reports bits/dim with bins of
  width 1/L (core/dequantization.py).
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from ..core.data_range import bytes_to_model, check_levels
from ..core.dequantization import dequantization_draws
from .image_sources import (ImageDataError, ImageSource, check_levels_of, read_array, read_digits, read_folder,
                            read_photographs)
from .sharding import IndexedRows, eval_loader
from .spec import DataSpec
from .streams import FreshBatches, ResumableLoader, train_key

__all__ = ["ImageDataModule", "SOURCES", "patch_grid"]

SOURCES = ("digits", "photographs", "array", "folder")
SPLITS = ("train", "val", "test")


def patch_grid(height: int, width: int, patch: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners (row, col) of the patches on the stride grid of an image (the last row and column
    of patches end at the image border)."""
    if patch > height or patch > width:
        raise ImageDataError(f"patch_size {patch} is larger than an image of {height}×{width}; "
                             "use a smaller patch_size or larger images")
    rows = sorted(set(range(0, height - patch + 1, stride)) | {height - patch})
    cols = sorted(set(range(0, width - patch + 1, stride)) | {width - patch})
    return [(r, c) for r in rows for c in cols]


class ImageDataModule(L.LightningDataModule):
    """uint8 images with L grey levels: random patches (floats) for training, fixed patches (uint8) for bits/dim.

    Args:
        source: 'digits' (scikit-learn, 1×8×8, 17 levels), 'photographs' (scikit-image, ``photos``),
            'array' (``path`` to .npy/.npz) or 'folder' (``path`` to a folder of PNGs).
        path: the array file or folder.
        photos: scikit-image photograph names (source 'photographs').
        channels: 1 or 3 to convert photographs (grey ↔ colour); None keeps them.
        levels: L grey levels, values 0..L−1 (None: 17 for the digits, 256 otherwise). The bin width,
            the uniform protocol's log q and the truncated-normal τ follow L.
        patch_size: side of the square patches (None: whole images, which must then share one size).
        stride: grid step of the evaluation patches and of the non-random training patches (None: patch_size).
        val_sources, test_sources: names of the images held out as validation / test sets (split by
            source); when both are None the items are split at random (``val_fraction``, ``test_fraction``, ``seed``).
        val_fraction, test_fraction: fractions of the items for validation / test in the seeded split.
        val_size, test_size: at most this many evaluation patches (a seeded subset), None: all.
        random_crop: training patches at any position (True) or on the stride grid.
        random_flip: horizontal flips of training patches (off for digits and text).
        train_dequantization: 'none' (training points at the bin centres, the paper's CIFAR-10 setting)
            or 'uniform' (uniformly dequantized training points, as the uniform protocol scores them).
        centered: model range [−1, 1] (True) or [0, 1].
        batch_size, eval_batch_size: training / evaluation batch sizes per rank.
        steps_per_epoch: training batches per epoch.
        seed: base seed of the split, the evaluation subsets and the training stream.
    """

    def __init__(self, source: str = "digits", path: str | None = None, photos: list[str] | None = None,
                 channels: int | None = None, levels: int | None = None, patch_size: int | None = None,
                 stride: int | None = None, val_sources: list[str] | None = None, test_sources: list[str] | None = None,
                 val_fraction: float = 0.1, test_fraction: float = 0.2, val_size: int | None = None,
                 test_size: int | None = None, random_crop: bool = True, random_flip: bool = False,
                 train_dequantization: str = "none",
                 centered: bool = True, batch_size: int = 128, eval_batch_size: int = 256,
                 steps_per_epoch: int = 100, seed: int = 0):
        super().__init__()
        if source not in SOURCES:
            raise ImageDataError(f"source must be one of {list(SOURCES)}, got {source!r}")
        if source in ("array", "folder") and not path:
            raise ImageDataError(f"source {source!r} needs path: the {'.npy/.npz file' if source == 'array' else 'folder'}")
        for arg, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size),
                           ("steps_per_epoch", steps_per_epoch), ("patch_size", patch_size or 1), ("stride", stride or 1),
                           ("val_size", val_size or 1), ("test_size", test_size or 1)):
            if int(value) != value or int(value) <= 0:
                raise ImageDataError(f"{arg} must be a positive integer, got {value}")
        if train_dequantization not in ("none", "uniform"):
            raise ImageDataError(f"train_dequantization must be 'none' or 'uniform', got {train_dequantization!r}")
        if channels not in (None, 1, 3):
            raise ImageDataError(f"channels must be 1, 3 or None, got {channels}")
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ImageDataError(f"val_fraction and test_fraction must be in [0, 1) with a sum < 1, "
                                 f"got {val_fraction} and {test_fraction}")
        self.save_hyperparameters()
        self.source, self.path, self.photos, self.channels = source, path, list(photos or []), channels
        try:
            self.levels = check_levels(levels if levels is not None else (17 if source == "digits" else 256))
        except ValueError as err:
            raise ImageDataError(str(err)) from None
        self.patch_size, self.stride = patch_size, stride or patch_size
        self.patch = patch_size  # the side of the data's images (set from the images when patch_size is None)
        self.val_sources, self.test_sources = val_sources, test_sources
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self.val_size, self.test_size = val_size, test_size
        self.random_crop, self.random_flip, self.centered = bool(random_crop), bool(random_flip), bool(centered)
        self.train_dequantization = train_dequantization
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        self.steps_per_epoch, self.seed = int(steps_per_epoch), int(seed)
        self._splits: dict | None = None

    # -- reading and splitting ------------------------------------------------------------------
    def read(self) -> ImageSource:
        """The images of the configured source (ImageDataError naming the problem if they cannot be used)."""
        if self.source == "digits":
            src = read_digits()
            check_levels_of(src.images, self.levels, "digits")
            return ImageSource(src.images, src.names, src.labels, self.levels)
        if self.source == "photographs":
            return read_photographs(self.photos, self.levels, self.channels)
        reader = read_array if self.source == "array" else read_folder
        return reader(self.path, self.levels)

    def _items(self, src: ImageSource, which: list[int]) -> list[tuple[int, int, int]]:
        """(image, row, col) of every grid patch of the images ``which``."""
        out = []
        for i in which:
            _, h, w = src.images[i].shape
            out += [(i, r, c) for r, c in patch_grid(h, w, self.patch, self.stride or self.patch)]
        return out

    def _split(self) -> dict:
        """{'train'/'val'/'test': list of (image, row, col)}, and the source."""
        if self._splits is not None:
            return self._splits
        src = self.read()
        sizes = {tuple(im.shape[1:]) for im in src.images}
        if self.patch_size is None:
            (h, w), *rest = sorted(sizes)
            if rest or h != w:
                raise ImageDataError(f"whole images must be square and of one size, got {sorted(sizes)[:4]}; "
                                     "set patch_size to cut square patches")
            self.patch = h
        if self.val_sources is not None or self.test_sources is not None:
            groups = self._by_source(src)
        else:
            items = self._items(src, list(range(len(src.images))))
            perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(self.seed)).tolist()
            n_val, n_test = round(self.val_fraction * len(items)), round(self.test_fraction * len(items))
            groups = {"val": sorted(items[j] for j in perm[:n_val]),
                      "test": sorted(items[j] for j in perm[n_val:n_val + n_test]),
                      "train": sorted(items[j] for j in perm[n_val + n_test:])}
        for split, limit in (("val", self.val_size), ("test", self.test_size)):
            if limit is not None and len(groups[split]) > limit:
                g = torch.Generator().manual_seed(self.seed + SPLITS.index(split))
                keep = sorted(torch.randperm(len(groups[split]), generator=g)[:limit].tolist())
                groups[split] = [groups[split][j] for j in keep]
        for split in SPLITS:
            if not groups[split]:
                raise ImageDataError(f"the {split} split has no images; "
                                     + ("name other sources for it" if split != "train" and self.val_sources is not None
                                        else "use more images or other fractions"))
        images = sorted({i for i, _, _ in groups["train"]})
        room = torch.tensor([float((src.images[i].shape[1] - self.patch + 1) * (src.images[i].shape[2] - self.patch + 1))
                             for i in images])
        self._splits = {"source": src, **groups, "train_images": images, "train_room": room}
        return self._splits

    def _by_source(self, src: ImageSource) -> dict:
        held = {"val": list(self.val_sources or []), "test": list(self.test_sources or [])}
        unknown = [n for names in held.values() for n in names if n not in src.names]
        if unknown:
            raise ImageDataError(f"val_sources/test_sources name images that are not in the data: {unknown}; "
                                 f"the images are {src.names[:12]}{' ...' if len(src.names) > 12 else ''}")
        both = set(held["val"]) & set(held["test"])
        if both:
            raise ImageDataError(f"images named in both val_sources and test_sources: {sorted(both)}")
        index = {n: i for i, n in enumerate(src.names)}
        train = [i for i, n in enumerate(src.names) if n not in held["val"] and n not in held["test"]]
        return {"train": self._items(src, train), **{k: self._items(src, [index[n] for n in v]) for k, v in held.items()}}

    def split_images(self, split: str) -> tuple[Tensor, Tensor]:
        """uint8 levels [N, C, p, p] of a split's grid patches and int64 labels [N] (digit, or source image)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        s = self._split()
        src, p, items = s["source"], self.patch, s[split]
        images = torch.stack([src.images[i][:, r:r + p, c:c + p] for i, r, c in items])
        return images, torch.tensor([src.labels[i] for i, _, _ in items], dtype=torch.long)

    # -- the Lightning interface ----------------------------------------------------------------
    def data_spec(self) -> DataSpec:
        """uint8 levels [C, p, p] with L = ``levels``; the FID reference is the training patches as 8-bit images."""
        s = self._split()
        shape = (s["source"].channels, self.patch, self.patch)

        def reference() -> Tensor:
            k = self.split_images("train")[0]
            return (k.double() * 255 / (self.levels - 1)).round().to(torch.uint8)

        return DataSpec(shape=shape, discrete=True, levels=self.levels, centered=self.centered,
                        name=self.name, reference_images=reference)

    @property
    def name(self) -> str:
        detail = {"photographs": ",".join(self.photos), "digits": ""}.get(self.source, str(self.path))
        return f"{self.source}{f'({detail})' if detail else ''}" + (f" {self.patch_size}px" if self.patch_size else "")

    def setup(self, stage: str | None = None) -> None:
        self._split()

    def draw_train(self, n: int, generator: torch.Generator) -> Tensor:
        """n training patches in the model range, float32 [n, C, p, p] (see the module docstring)."""
        s = self._split()
        src, p, items = s["source"], self.patch, s["train"]
        if not self.random_crop:
            picks = [items[j] for j in torch.randint(len(items), (n,), generator=generator).tolist()]
        else:
            images = s["train_images"]
            which = torch.multinomial(s["train_room"], n, replacement=True, generator=generator).tolist()
            u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
            picks = []
            for j, (ur, uc) in zip(which, u.tolist()):
                _, h, w = src.images[images[j]].shape
                picks.append((images[j], math.floor(ur * (h - p + 1)), math.floor(uc * (w - p + 1))))
        flips = (torch.rand(n, generator=generator) < 0.5).tolist() if self.random_flip else [False] * n
        out = [src.images[i][:, r:r + p, c:c + p] for i, r, c in picks]
        out = torch.stack([x.flip(-1) if f else x for x, f in zip(out, flips)])
        if self.train_dequantization == "uniform":
            return dequantization_draws(out, centered=self.centered, levels=self.levels, generator=generator)[0][0]
        return bytes_to_model(out, self.centered, levels=self.levels)

    def train_dataloader(self) -> ResumableLoader:
        return ResumableLoader(FreshBatches(self.draw_train, self.batch_size, self.steps_per_epoch,
                                            lambda: train_key(self.trainer, self.seed)))

    def _eval(self, split: str) -> DataLoader:
        images = self.split_images(split)[0]
        return eval_loader(IndexedRows(images), min(self.eval_batch_size, len(images)), self.trainer)

    def val_dataloader(self) -> DataLoader:
        return self._eval("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval("test")
