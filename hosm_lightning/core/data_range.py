"""The one mapping between quantised data and the model's range (docs/design.md §6).

Data with L grey levels (L = 256 for 8-bit images, 17 for the scikit-learn digits, 32 for 5-bit
data) are integers k ∈ {0..L−1}; they sit at the bin centres k/(L−1) in [0, 1] (``centered=False``)
or 2k/(L−1) − 1 in [−1, 1] (``centered=True``). Every conversion of the project goes through these
functions.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["bytes_to_model", "model_to_unit", "model_to_bytes", "check_levels"]


def check_levels(levels) -> int:
    """L as an int in 2..256 (uint8 data); ValueError otherwise."""
    if isinstance(levels, bool) or int(levels) != levels or not 2 <= int(levels) <= 256:
        raise ValueError(f"levels must be an integer number of grey levels in 2..256, got {levels!r}")
    return int(levels)


def bytes_to_model(k: Tensor, centered: bool, dtype: torch.dtype = torch.float32, levels: int = 256) -> Tensor:
    """uint8 (or float) level values k → k/(L−1) ∈ [0, 1], or 2k/(L−1) − 1 ∈ [−1, 1] when ``centered``."""
    x = k.to(dtype) / (levels - 1)
    return 2 * x - 1 if centered else x


def model_to_unit(x: Tensor, centered: bool) -> Tensor:
    """Model-range values → [0, 1] (not clamped): (x + 1)/2 when ``centered``, else x."""
    return (x + 1) / 2 if centered else x


def model_to_bytes(x: Tensor, centered: bool, levels: int = 256) -> Tensor:
    """Model-range images → uint8 levels as a saved PNG: round((L−1) · unit), clamped to [0, L−1]; NaN → 0."""
    u = torch.nan_to_num(model_to_unit(x.detach().float(), centered), nan=0.0)
    return (u * (levels - 1)).round().clamp(0, levels - 1).to(torch.uint8)
