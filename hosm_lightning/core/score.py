"""The score function interface shared by the objective and the ODE: its type, its output check,
Rademacher probes and the choice between exact and Hutchinson divergences."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["ScoreFn", "DIVERGENCES", "resolve_divergence", "check_score_output", "check_batch", "rademacher", "working_dtype"]

#: ``score_fn(x, t) -> ∇ₓ log p_t(x)`` with x [B, ...] and t [B]; differentiable in x (and θ)
ScoreFn = Callable[[Tensor, Tensor], Tensor]

#: 'exact' (D derivatives), 'hutchinson' (one Rademacher probe) or 'auto' (exact if D <= 4)
DIVERGENCES = ("auto", "exact", "hutchinson")


def resolve_divergence(divergence: str, dim: int) -> str:
    """'exact' or 'hutchinson' for data of dimension ``dim``: 'auto' is exact for D <= 4."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {', '.join(map(repr, DIVERGENCES))}, got {divergence!r}")
    if divergence == "auto":
        return "exact" if dim <= 4 else "hutchinson"
    return divergence


def check_score_output(s: Tensor, x: Tensor) -> Tensor:
    """Return s if it is a tensor of the shape of the score's input x, else raise a ValueError."""
    if not isinstance(s, Tensor) or s.shape != x.shape:
        got = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
        raise ValueError(f"score_fn output must have the shape of its input {tuple(x.shape)}, got {got}")
    return s


def rademacher(shape, like: Tensor, generator=None) -> Tensor:
    """A probe v ∈ {±1}^shape (vᵀv = D per sample) on the device and in the dtype of ``like``.

    ``generator`` is one torch.Generator, or a list of B generators for a batch laid out [K·B, ...]
    (or [B, ...]): sample b takes its K probes from generator b, so a sample's probe does not depend
    on its batch mates (the per-sample seeds of evaluation)."""
    shape = tuple(shape)
    if not isinstance(generator, (list, tuple)):
        return torch.randint(0, 2, shape, generator=generator, device=like.device).to(like.dtype) * 2 - 1
    k = shape[0] // len(generator)
    parts = [rademacher((k, 1, *shape[1:]), like, g) for g in generator]
    return torch.cat(parts, 1).reshape(shape)


def check_batch(x: Tensor, name: str = "x") -> None:
    """ValueError unless ``x`` is a batch tensor [B, ...] with B >= 1 and (if floating) finite values."""
    if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[0] == 0:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a batch tensor [B, ...] with B >= 1, got {shape}")
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf values")


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 at least (float64 stays float64): the precision of every derivative of the score."""
    return torch.promote_types(dtype, torch.float32)
