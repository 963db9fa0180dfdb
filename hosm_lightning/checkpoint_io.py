"""The one reader of checkpoint files: untrusted input, so always ``torch.load(weights_only=True)``.

Used by ``lit/checkpoints.py`` (our Lightning checkpoints, any subcommand's ``--ckpt_path``,
``init_from``) and ``nets/checkpoint_import.py`` (score_sde_pytorch checkpoints); errors are one line
naming the file.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["read_checkpoint"]


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """``torch.load(path, weights_only=True)`` with one-line errors that name the file.

    ``mmap=True`` maps the tensors instead of reading them (cheap checks of large checkpoints).
    """
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} is a directory; pass the path of a .ckpt/.pth file in it")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass the path of a .ckpt/.pth file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # unpickling error, truncated or text file, foreign objects ...
        if mmap and "mmap" in str(err):  # legacy (non-zip) format: read it normally
            return read_checkpoint(path, mmap=False)
        raise ValueError(f"{path} is not a readable checkpoint ({_first_line(err)}); "
                         "pass a .ckpt file written by this project's fit (or a score_sde .pth)") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} is not a checkpoint dictionary (it holds a {type(ckpt).__name__})")
    return ckpt
