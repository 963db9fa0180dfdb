"""The one reader and the one writer of checkpoint files.

Reading: checkpoints are untrusted input, so always ``torch.load(weights_only=True)``. Used by
``checkpoints.py`` (our Lightning checkpoints, any subcommand's ``--ckpt_path``, ``init_from``)
and ``nets/checkpoint_import.py`` (score_sde_pytorch checkpoints); errors are one line naming the file.

Writing: :class:`AtomicCheckpointIO`, the CheckpointIO plugin the CLI gives every Trainer. A checkpoint
is written to a hidden temporary file in the same folder, flushed to disk, then renamed over the
target, so a write cut off half-way (a killed process, a full disk) leaves the previous file intact.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

__all__ = ["read_checkpoint", "AtomicCheckpointIO", "saved_step", "temporary_path"]


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


# -- writing ----------------------------------------------------------------------------------------
def temporary_path(path: str | Path, pid: int | None = None) -> Path:
    """Where :class:`AtomicCheckpointIO` writes ``path`` before renaming it: a hidden file beside it."""
    path = Path(path)
    return path.parent / f".{path.name}.{os.getpid() if pid is None else pid}.tmp"


def _is_local(path) -> bool:
    text = str(path)
    return "://" not in text or text.startswith("file://")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with atomic local writes and ``weights_only=True`` loads.

    ``save_checkpoint`` writes ``.<name>.<pid>.tmp`` in the target's folder, fsyncs it, and renames it
    over the target (``os.replace``: atomic on POSIX file systems), so readers see either the previous
    checkpoint or the complete new one. Temporary files left by a killed writer are removed by the
    next successful write of the same target and are never taken for checkpoints (they do not end
    in ``.ckpt``). Remote paths (``s3://`` ...) go through Lightning's writer unchanged.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(str(path).removeprefix("file://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_path(path)
        try:
            with open(tmp, "wb") as fh:
                torch.save(checkpoint, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only: bool | None = None):
        """Lightning's loader with ``weights_only=True`` unless the caller says otherwise."""
        return super().load_checkpoint(path, map_location=map_location,
                                       weights_only=True if weights_only is None else weights_only)


# -- the step of a checkpoint, even of a cut-off one ------------------------------------------------
class _Stub(dict):
    """Stands for every object of the pickle; nothing is imported or executed."""

    def __init__(self, *args, **kwargs):
        super().__init__()

    def __setstate__(self, state) -> None:
        pass

    def append(self, item) -> None:
        pass

    def extend(self, items) -> None:
        pass


class _StructureOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        return _Stub

    def persistent_load(self, pid):
        return None


_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # zip local file header (30 bytes)


def saved_step(path: str | Path, limit: int = 16 << 20) -> int | None:
    """``global_step`` recorded in a checkpoint file, or None when it cannot be found.

    Works on a cut-off file too: ``torch.save`` writes the pickled record (``data.pkl``, the
    dictionary with tensors by reference) first in its zip archive, so it is read from the first
    entry's bytes with an unpickler that builds placeholders for every object and loads no tensor.
    """
    size = 1 << 20
    while True:
        try:
            with open(path, "rb") as fh:
                head = fh.read(size)
            return _step_from_head(head)
        except (EOFError, pickle.UnpicklingError):  # the record may be longer than what was read
            if len(head) < size or size >= limit:
                return None
            size *= 4
        except Exception:
            return None


def _step_from_head(head: bytes) -> int | None:
    sig, *_, name_len, extra_len = _LOCAL_HEADER.unpack_from(head)
    start = _LOCAL_HEADER.size + name_len + extra_len
    if sig != 0x04034B50 or not head[_LOCAL_HEADER.size:start - extra_len].endswith(b"data.pkl"):
        return None
    record = _StructureOnly(io.BytesIO(head[start:])).load()
    step = record.get("global_step") if isinstance(record, dict) else None
    return int(step) if isinstance(step, int) else None
