"""CIFAR-10 from the standard python-pickle directory ``<root>/cifar-10-batches-py/`` (docs/design.md §6).

Train batches are float32 [B, 3, 32, 32] in the model range ([-1, 1] if ``centered`` else [0, 1])
with optional random horizontal flips. Validation (the last ``val_size`` training images, held out
of training) and test batches are **uint8** [B, 3, 32, 32]: the LightningModule dequantizes and
scales them itself for bits/dim.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..core.data_range import bytes_to_model
from .sharding import IndexedRows, eval_loader
from .spec import DataSpec

__all__ = ["CIFAR10DataModule", "read_cifar10", "write_fake_cifar10"]

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE, META_FILE = "test_batch", "batches.meta"
LABEL_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# The only globals a genuine CIFAR-10 pickle (or ours) references: numpy arrays and py2 byte strings.
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
}


def _how_to_get(root) -> str:
    return (f"point --data.init_args.root at the folder that holds {FOLDER}/ (now {root}), "
            f"or download {URL} and extract it so that {Path(root) / FOLDER / TRAIN_FILES[0]} exists, "
            "or set --data.init_args.download=true once")


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def _load_pickle(path: Path, root) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 file not found: {path}. {_how_to_get(root)}")
    try:
        with open(path, "rb") as fh:
            obj = _SafeUnpickler(fh, encoding="bytes").load()
    except Exception as err:  # truncated / not a pickle / foreign objects
        raise ValueError(f"corrupt CIFAR-10 file {path} ({type(err).__name__}: {err}). {_how_to_get(root)}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"corrupt CIFAR-10 file {path}: expected a dict, got {type(obj).__name__}. {_how_to_get(root)}")
    return obj


def _load_batch(path: Path, root) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (uint8 [N, 3, 32, 32], int64 [N]); ValueError naming ``path`` if malformed."""
    obj = _load_pickle(path, root)
    data, labels = obj.get(b"data"), obj.get(b"labels")
    ok = (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072
          and labels is not None and len(labels) == data.shape[0])
    if not ok:
        shape = getattr(data, "shape", None)
        raise ValueError(f"corrupt CIFAR-10 file {path}: need b'data' uint8 [N, 3072] and N b'labels', "
                         f"got data shape {shape}. {_how_to_get(root)}")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def read_cifar10(root: str | Path, train: bool = True) -> tuple[Tensor, Tensor]:
    """Read ``<root>/cifar-10-batches-py``: (uint8 images [N, 3, 32, 32], int64 labels [N]).

    Raises FileNotFoundError (missing directory/file) or ValueError (corrupt file), naming the path.
    """
    folder = Path(root) / FOLDER
    if not folder.is_dir():
        raise FileNotFoundError(f"CIFAR-10 directory not found: {folder}. {_how_to_get(root)}")
    meta = _load_pickle(folder / META_FILE, root)
    if b"label_names" not in meta:
        raise ValueError(f"corrupt CIFAR-10 file {folder / META_FILE}: no b'label_names'. {_how_to_get(root)}")
    parts = [_load_batch(folder / f, root) for f in (TRAIN_FILES if train else (TEST_FILE,))]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)


def write_fake_cifar10(root: str | Path, n_train: int = 50, n_test: int = 20, seed: int = 0) -> Path:
    """Write random images in the exact on-disk format (5 data batches, test_batch, batches.meta).

    Returns the ``cifar-10-batches-py`` folder. For tests and smoke runs only.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)

    def dump(name: str, obj: dict) -> None:
        with open(folder / name, "wb") as fh:
            pickle.dump(obj, fh, protocol=2)

    def batch(name: str, label: str, n: int) -> None:
        dump(name, {
            b"batch_label": label.encode(),
            b"labels": rng.integers(0, 10, n).tolist(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"fake_{name}_{i}.png".encode() for i in range(n)],
        })

    for i, chunk in enumerate(np.array_split(np.arange(n_train), 5)):
        batch(TRAIN_FILES[i], f"training batch {i + 1} of 5", len(chunk))
    batch(TEST_FILE, "testing batch 1 of 1", n_test)
    dump(META_FILE, {b"label_names": [s.encode() for s in LABEL_NAMES],
                     b"num_cases_per_batch": max(1, -(-n_train // 5)), b"num_vis": 3072})
    return folder


class _TrainImages(Dataset):
    """uint8 images -> float32 in [0, 1] (or [-1, 1]), flipped horizontally with probability 1/2."""

    def __init__(self, images: Tensor, centered: bool, random_flip: bool):
        self.images, self.centered, self.random_flip = images, centered, random_flip

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        x = bytes_to_model(self.images[i], self.centered)
        if self.random_flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x


class CIFAR10DataModule(L.LightningDataModule):
    """CIFAR-10 for training (float, flipped) and evaluation (uint8).

    Args:
        root: folder containing ``cifar-10-batches-py/``.
        batch_size: training batch size per rank (paper: 128 in total; 48 for order 3).
        eval_batch_size: validation and test batch size per rank.
        centered: train data in [-1, 1] (True; DDPM++/NCSN++ convention) or [0, 1].
        random_flip: random horizontal flips of training images.
        download: fetch the archive with torchvision if missing (never otherwise).
        num_workers: DataLoader worker processes per rank.
        val_size: last ``val_size`` training images held out as validation set (>= 1).
        test_subset: evaluate on the first ``test_subset`` test images only (None: all 10 000).
    """

    dim = 3 * 32 * 32
    image_shape = (3, 32, 32)

    def __init__(self, root: str = "data/cifar10", batch_size: int = 128, eval_batch_size: int = 256,
                 centered: bool = True, random_flip: bool = True, download: bool = False,
                 num_workers: int = 2, val_size: int = 1000, test_subset: int | None = None):
        super().__init__()
        for arg, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size), ("val_size", val_size)):
            if int(value) <= 0:
                raise ValueError(f"{arg} must be a positive integer, got {value}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if test_subset is not None and test_subset <= 0:
            raise ValueError(f"test_subset must be a positive integer or None, got {test_subset}")
        self.save_hyperparameters()
        self.root, self.batch_size, self.eval_batch_size = str(root), int(batch_size), int(eval_batch_size)
        self.centered, self.random_flip, self.download = bool(centered), bool(random_flip), bool(download)
        self.num_workers, self.val_size, self.test_subset = int(num_workers), int(val_size), test_subset
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def data_spec(self) -> DataSpec:
        """uint8 images 3×32×32 (bits/dim); the FID reference is all 50 000 training images."""
        return DataSpec(shape=self.image_shape, discrete=True, centered=self.centered, name="CIFAR-10",
                        reference_images=lambda: read_cifar10(self.root, train=True)[0])

    def prepare_data(self) -> None:
        """Download with torchvision only when ``download=True`` and the files are not there yet."""
        if self.download and not (Path(self.root) / FOLDER / TEST_FILE).is_file():
            from torchvision.datasets import CIFAR10

            CIFAR10(self.root, train=True, download=True)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self.val_set is None:
            images, _ = read_cifar10(self.root, train=True)
            if self.val_size >= len(images):
                raise ValueError(f"val_size={self.val_size} must be smaller than the {len(images)} training images")
            cut = len(images) - self.val_size
            self.train_set = _TrainImages(images[:cut], self.centered, self.random_flip)
            self.val_set = IndexedRows(images[cut:])
        if stage in (None, "test") and self.test_set is None:
            images, _ = read_cifar10(self.root, train=False)
            self.test_set = IndexedRows(images[: self.test_subset] if self.test_subset else images)

    def _workers(self) -> dict:
        return {"num_workers": self.num_workers, "pin_memory": torch.cuda.is_available(),
                "persistent_workers": self.num_workers > 0}

    def _eval(self, ds: Dataset | None) -> DataLoader:
        if ds is None:
            raise RuntimeError("call setup() (Lightning does) before asking for dataloaders")
        return eval_loader(ds, self.eval_batch_size, self.trainer, **self._workers())  # each image once across ranks

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise RuntimeError("call setup() (Lightning does) before asking for dataloaders")
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True, **self._workers())

    def val_dataloader(self) -> DataLoader:
        return self._eval(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval(self.test_set)
