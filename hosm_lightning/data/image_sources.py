"""Where real images come from: an array file, a folder of PNGs, scikit-image's photographs, scikit-learn's digits.

Every reader returns an :class:`ImageSource`: a list of uint8 images [C, H, W] (photographs may differ
in size), one name and one integer label per image, and the number of grey levels L. Nothing is
downloaded: scikit-image and scikit-learn ship their images inside their wheels. Bad input raises
:class:`ImageDataError` (a ValueError) with one line that names the problem and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["ImageDataError", "ImageSource", "read_array", "read_folder", "read_photographs", "read_digits",
           "check_levels_of", "PHOTOGRAPHS", "DIGIT_LEVELS"]

#: colour photographs shipped by scikit-image (skimage.data.<name>()), all offline
PHOTOGRAPHS = ("astronaut", "chelsea", "coffee", "rocket", "retina", "immunohistochemistry", "hubble_deep_field",
               "colorwheel")
#: grey photographs shipped by scikit-image
GREY_PHOTOGRAPHS = ("camera", "coins", "moon", "brick", "grass", "gravel")
#: scikit-learn's digits have 17 grey levels, 0..16
DIGIT_LEVELS = 17


class ImageDataError(ValueError):
    """Bad image data or settings (the CLI prints the message and exits with code 2)."""


@dataclass(frozen=True)
class ImageSource:
    """Images [C, H, W] uint8 (levels 0..L−1), one ``name`` and ``label`` per image, L = ``levels``."""

    images: list[Tensor]
    names: list[str]
    labels: list[int]
    levels: int

    @property
    def channels(self) -> int:
        return int(self.images[0].shape[0])


def _to_chw(a: np.ndarray, what: str) -> np.ndarray:
    """One image [H, W] or [H, W, C] (C in 1, 3) → [C, H, W]."""
    if a.ndim == 2:
        return a[None]
    if a.ndim == 3 and a.shape[2] in (1, 3):
        return np.moveaxis(a, 2, 0)
    if a.ndim == 3 and a.shape[2] == 4:
        return np.moveaxis(a[..., :3], 2, 0)  # RGBA: the alpha channel is dropped
    raise ImageDataError(f"{what}: an image must be [H, W] (grey) or [H, W, 3] (colour), got shape {list(a.shape)}")


def _as_levels(a: np.ndarray, what: str) -> np.ndarray:
    """Integer arrays → uint8 (values checked later against L); float/bool arrays are refused."""
    if a.dtype == np.uint8:
        return a
    if not np.issubdtype(a.dtype, np.integer):
        raise ImageDataError(f"{what}: images must hold integer grey levels (uint8), got dtype {a.dtype}; "
                             "quantise them first, e.g. np.round(x * 255).astype(np.uint8)")
    if a.size and (a.min() < 0 or a.max() > 255):
        raise ImageDataError(f"{what}: integer grey levels must lie in 0..255, got {a.min()}..{a.max()}")
    return a.astype(np.uint8)


def check_levels_of(images: list[Tensor], levels: int, what: str) -> None:
    """ImageDataError if any value is ≥ L (outside the declared grey levels 0..L−1)."""
    top = max(int(im.max()) for im in images) if images else 0
    if top >= levels:
        raise ImageDataError(f"{what}: value {top} is outside the declared {levels} grey levels 0..{levels - 1}; "
                             f"set levels to at least {top + 1}")


def read_array(path: str | Path, levels: int = 256) -> ImageSource:
    """Images from ``.npy`` ([N, H, W], [N, H, W, C] or [N, C, H, W], C in 1 or 3) or ``.npz`` (the array
    ``images``, or the only array; an optional ``labels`` array). An axis of size 1 or 3 in position 1
    is read as channels-first, otherwise channels-last."""
    path = Path(path)
    if not path.is_file():
        raise ImageDataError(f"image array file not found: {path}; set data.init_args.path to a .npy or .npz file")
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as err:
        raise ImageDataError(f"cannot read {path} as a numpy array ({type(err).__name__}: {err})") from None
    labels = None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        keys = list(loaded.keys())
        key = "images" if "images" in keys else (keys[0] if len(keys) == 1 else None)
        if key is None:
            raise ImageDataError(f"{path}: an .npz needs an array named 'images' (or exactly one array), has {keys}")
        arr, labels = loaded[key], (loaded["labels"] if "labels" in keys else None)
    else:
        arr = loaded
    arr = _as_levels(arr, str(path))
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4 and arr.shape[1] not in (1, 3) and arr.shape[3] in (1, 3):
        arr = np.moveaxis(arr, 3, 1)
    if arr.ndim != 4 or arr.shape[1] not in (1, 3) or len(arr) == 0:
        raise ImageDataError(f"{path}: need a non-empty array [N, H, W], [N, H, W, C] or [N, C, H, W] with C = 1 or 3, "
                             f"got shape {list(arr.shape)}")
    images = list(torch.from_numpy(np.ascontiguousarray(arr)))
    check_levels_of(images, levels, str(path))
    lab = [int(v) for v in labels] if labels is not None and len(labels) == len(arr) else [0] * len(arr)
    return ImageSource(images, [f"{path.stem}[{i}]" for i in range(len(arr))], lab, levels)


def read_folder(path: str | Path, levels: int = 256) -> ImageSource:
    """Every ``*.png`` of a folder (sorted by name; grey, RGB or RGBA, 8-bit), one source per file."""
    from PIL import Image

    folder = Path(path)
    if not folder.is_dir():
        raise ImageDataError(f"image folder not found: {folder}; set data.init_args.path to a folder of PNG files")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png")
    if not files:
        raise ImageDataError(f"no .png files in {folder}")
    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                if im.mode not in ("L", "RGB", "RGBA", "P", "LA"):
                    raise ImageDataError(f"{f}: PNG mode {im.mode} is not 8-bit grey or colour; save it as 8-bit")
                im = im.convert("RGB" if im.mode in ("P", "RGBA") else ("L" if im.mode == "LA" else im.mode))
                images.append(torch.from_numpy(np.ascontiguousarray(_to_chw(np.asarray(im), str(f)))))
        except ImageDataError:
            raise
        except Exception as err:
            raise ImageDataError(f"cannot read {f} as a PNG ({type(err).__name__}: {err})") from None
    _same_channels(images, [f.name for f in files])
    check_levels_of(images, levels, str(folder))
    return ImageSource(images, [f.stem for f in files], list(range(len(files))), levels)


def read_photographs(names: list[str], levels: int = 256, channels: int | None = None) -> ImageSource:
    """scikit-image's photographs ``skimage.data.<name>()`` (offline); ``channels`` 1 turns colour into grey
    (ITU-R 601 luma, rounded), 3 repeats grey; None keeps them as they are (all must then agree)."""
    import skimage.data

    if not names:
        raise ImageDataError("name at least one photograph, e.g. photos: [astronaut, chelsea, coffee]")
    images = []
    for name in names:
        reader = getattr(skimage.data, str(name), None) if not str(name).startswith("_") else None
        if reader is None or not callable(reader):
            raise ImageDataError(f"unknown scikit-image photograph {name!r}; choose from "
                                 f"{list(PHOTOGRAPHS + GREY_PHOTOGRAPHS)}")
        a = reader()
        a = _to_chw(_as_levels(np.asarray(a), f"skimage.data.{name}"), f"skimage.data.{name}")
        images.append(_convert(torch.from_numpy(np.ascontiguousarray(a)), channels))
    _same_channels(images, list(names))
    check_levels_of(images, levels, "photographs")
    return ImageSource(images, [str(n) for n in names], list(range(len(names))), levels)


def read_digits() -> ImageSource:
    """scikit-learn's 1,797 handwritten digits, 1×8×8, 17 grey levels; label = the digit."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    arr = torch.from_numpy(digits.images.astype(np.uint8))[:, None]
    return ImageSource(list(arr), [f"digit[{i}]" for i in range(len(arr))], [int(v) for v in digits.target],
                       DIGIT_LEVELS)


def _convert(image: Tensor, channels: int | None) -> Tensor:
    if channels is None or image.shape[0] == channels:
        return image
    if channels == 3:
        return image.expand(3, -1, -1).contiguous()
    luma = torch.tensor([0.299, 0.587, 0.114]).reshape(3, 1, 1)
    return (image.double() * luma).sum(0, keepdim=True).round().clamp(0, 255).to(torch.uint8)


def _same_channels(images: list[Tensor], names: list[str]) -> None:
    chans = {int(im.shape[0]) for im in images}
    if len(chans) > 1:
        grey = [n for n, im in zip(names, images) if im.shape[0] == 1]
        raise ImageDataError(f"the images mix grey and colour (grey: {grey}); use images with the same channels "
                             "or set channels: 1 (or 3)")
