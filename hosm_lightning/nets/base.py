"""The base class of every score network in this project (the type of ``model.net`` in configs)."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["ScoreNet"]


class ScoreNet(nn.Module):
    """A network called as ``net(x, t)`` that returns a tensor of x's shape (ε̂ or the score).

    Subclasses set ``self.dim`` (the flattened data dimension D). ``HOSMModule`` accepts any
    subclass; declaring it as the type of ``model.net`` is also what keeps ``--help`` short (it
    lists these networks instead of every ``torch.nn`` module).
    """

    dim: int

    def forward(self, x: Tensor, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
