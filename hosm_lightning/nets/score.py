"""Score parameterisation: turn a network output into s_θ(x, t) = ∇ₓ log p_t(x).

``ScoreModel`` is the ``score_fn(x, t)`` that the losses and the likelihood call. It is per-sample
(no batch statistics) and uses only differentiable tensor ops, so it works under ``torch.func.jvp``
and repeated ``torch.autograd.grad(create_graph=True)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core.sde import SDE, bcast

__all__ = ["ScoreModel", "PARAMETERIZATIONS"]

PARAMETERIZATIONS = ("eps", "score")


class ScoreModel(nn.Module):
    """Wrap ``net`` so that ``forward(x, t)`` returns the score.

    Args:
        net: module called as ``net(x, t)`` with x [B, ...] and t [B].
        sde: supplies σ(t) through ``sde.marginal(t) -> (a, sigma)``.
        parameterization: ``'eps'`` (net predicts ε; s = -net(x,t)/σ(t), broadcast over x's shape)
            or ``'score'`` (net output is the score itself, e.g. NCSN++ that already divides by σ).
    """

    def __init__(self, net: nn.Module, sde: SDE, parameterization: str = "eps"):
        super().__init__()
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"unknown parameterization {parameterization!r}; choose one of {list(PARAMETERIZATIONS)}")
        self.net, self.sde, self.parameterization = net, sde, parameterization

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        out = self.net(x, t)
        if self.parameterization == "score":
            return out
        sigma = self.sde.marginal(t)[1].to(out.dtype)
        return -out / bcast(sigma, out)

    def extra_repr(self) -> str:
        return f"parameterization={self.parameterization!r}, sde={self.sde!r}"
