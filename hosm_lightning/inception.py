"""Files of the FID evaluation: the Inception-v3 weights (found locally, never downloaded), digests
that key the real-statistics cache, and sample PNGs for cross-checks with torch-fidelity."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["INCEPTION_WEIGHTS_FILE", "inception_weights_file", "file_digest", "module_digest", "tensor_digest",
           "write_pngs"]

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILE


def inception_weights_file(weights_path: str | None) -> Path:
    """The Inception weights file the default extractor will read; FileNotFoundError (one clear
    message naming the file and both places) if it is not there. Never downloads."""
    hub = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    if weights_path is not None:
        path = Path(os.path.expanduser(weights_path))
        if path.is_file():
            return path
        where = f"the configured feature_extractor_weights_path {path} does not exist"
    elif hub.is_file():
        return hub
    else:
        where = f"no feature_extractor_weights_path is configured and the torch hub cache has no {hub}"
    raise FileNotFoundError(
        f"FID needs the Inception-v3 weights file {INCEPTION_WEIGHTS_FILE} (torch-fidelity's "
        f"'inception-v3-compat', {INCEPTION_WEIGHTS_URL}), but {where}. Place the file at "
        f"{path if weights_path is not None else hub} "
        "(either set FIDCallback.feature_extractor_weights_path to a local copy, or put the file into "
        "$TORCH_HOME/hub/checkpoints/, i.e. "
        f"{hub.parent}/); compute nodes without internet cannot download it"
    )


def file_digest(path: Path, n: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


def module_digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()[:16]


def tensor_digest(x: Tensor) -> str:
    return hashlib.sha256(x.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def write_pngs(u8: Tensor, ids: range, folder: Path) -> None:
    # Pillow (a matplotlib dependency), not torchvision.io: torchvision deprecates its image IO
    from PIL import Image

    for img, i in zip(u8.cpu(), ids):
        arr = img.permute(1, 2, 0).numpy()
        Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(folder / f"{i:06d}.png")
