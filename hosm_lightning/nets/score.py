"""Score parameterisation: turn a network output into s_θ(x, t) = ∇ₓ log p_t(x).

``ScoreModel`` is the ``score_fn(x, t)`` that the losses and the likelihood call. It computes the
noise level σ(t) once from the SDE (``a, sigma = sde.marginal(t)``) and hands it to the network,
as EDM's preconditioning does: the calling convention of every :class:`~.base.ScoreNet` is
``net(x, t, sigma=None)`` with t [B] the time and sigma [B] the marginal std σ(t) of the SDE
(docs/design.md §6). Nets that condition on t (ToyScoreNet, SmallConvNet, DDPMpp) ignore sigma;
NCSNpp conditions on log σ and divides by σ, so its noise schedule is the SDE's by construction
(no σ_min/σ_max of its own to keep in sync).

It is per-sample (no batch statistics) and uses only differentiable tensor ops (σ is computed from t
inside the graph, never detached), so it works under ``torch.func.jvp`` / ``vmap`` and repeated
``torch.autograd.grad(create_graph=True)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core.sde import SDE, bcast

__all__ = ["ScoreModel", "PARAMETERIZATIONS"]

PARAMETERIZATIONS = ("eps", "score", "velocity")


class ScoreModel(nn.Module):
    """Wrap ``net`` so that ``forward(x, t)`` returns the score.

    Args:
        net: module called as ``net(x, t, sigma)`` with x [B, ...], t [B] and sigma [B] = σ(t) =
            ``sde.marginal(t)[1]`` in x's dtype (networks that condition on t ignore sigma).
        sde: supplies σ(t) through ``sde.marginal(t) -> (a, sigma)``.
        parameterization: ``'eps'`` (net predicts ε; s = -net(x, t, σ)/σ, broadcast over x's shape),
            ``'score'`` (net output is the score itself, e.g. NCSN++ that already divides by σ) or
            ``'velocity'`` (net predicts v = a ε − σ x₀ of x_t = a x₀ + σ ε, i-DODE's:
            ε̂ = (a v̂ + σ x)/(a² + σ²), s = −ε̂/σ; any SDE, a² + σ² = 1 for VP).
    """

    def __init__(self, net: nn.Module, sde: SDE, parameterization: str = "eps"):
        super().__init__()
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"unknown parameterization {parameterization!r}; choose one of {list(PARAMETERIZATIONS)}")
        self.net, self.sde, self.parameterization = net, sde, parameterization

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        a, sigma = self.sde.marginal(t)
        sigma = sigma.to(x.dtype)
        out = self.net(x, t, sigma)
        if self.parameterization == "score":
            return out
        sigma = bcast(sigma.to(out.dtype), out)
        if self.parameterization == "velocity":
            a = bcast(a.to(out.dtype), out)
            out = (a * out + sigma * x) / (a * a + sigma * sigma)
        return -out / sigma

    def extra_repr(self) -> str:
        return f"parameterization={self.parameterization!r}, sde={self.sde!r}"
