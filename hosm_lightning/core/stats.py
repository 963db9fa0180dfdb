"""Mean and standard error: the one summary of per-sample values used by evaluation, diagnostics and benchmarks."""

from __future__ import annotations

import math

import torch

__all__ = ["mean_se"]


def mean_se(values) -> tuple[float, float]:
    """(mean, standard error) of independent values [N] in float64: s.e. = std (unbiased) / √N, NaN for N < 2."""
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    n = v.numel()
    if n == 0:
        return float("nan"), float("nan")
    se = float(v.std() / math.sqrt(n)) if n > 1 else float("nan")
    return float(v.mean()), se
