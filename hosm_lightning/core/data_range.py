"""The one mapping between 8-bit data and the model's range (docs/design.md §6).

Bytes k ∈ {0..255} sit at the bin centres k/255 in [0, 1] (``centered=False``) or 2k/255 − 1 in
[−1, 1] (``centered=True``). Every conversion of the project goes through these three functions.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["bytes_to_model", "model_to_unit", "model_to_bytes"]


def bytes_to_model(k: Tensor, centered: bool, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 (or float byte values) k → k/255 ∈ [0, 1], or 2k/255 − 1 ∈ [−1, 1] when ``centered``."""
    x = k.to(dtype) / 255
    return 2 * x - 1 if centered else x


def model_to_unit(x: Tensor, centered: bool) -> Tensor:
    """Model-range values → [0, 1] (not clamped): (x + 1)/2 when ``centered``, else x."""
    return (x + 1) / 2 if centered else x


def model_to_bytes(x: Tensor, centered: bool) -> Tensor:
    """Model-range images → uint8 as a saved PNG: round(255 · unit), clamped to [0, 255]; NaN → 0."""
    u = torch.nan_to_num(model_to_unit(x.detach().float(), centered), nan=0.0)
    return (u * 255).round().clamp(0, 255).to(torch.uint8)
