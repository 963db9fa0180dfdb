"""The base class of every score network in this project (the type of ``model.net`` in configs)."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["ScoreNet"]


class ScoreNet(nn.Module):
    """A network called as ``net(x, t, sigma=None)`` that returns a tensor of x's shape (ε̂ or the score).

    Calling convention (docs/design.md §6):

    * ``x`` [B, ...]: the noisy data x_t;
    * ``t`` [B] (or a scalar, broadcast over the batch): the time;
    * ``sigma`` [B] (or a scalar) or None: the marginal std σ(t) = ``sde.marginal(t)[1]`` of the
      SDE, i.e. the noise level. :class:`~.score.ScoreModel` computes it once and hands it over, so a
      net that conditions on σ (NCSNpp) follows the SDE without keeping its own copy of the schedule.
      Nets that condition on t (ToyScoreNet, SmallConvNet, DDPMpp) ignore it, so ``net(x, t)`` works
      for them; a σ-conditioned net raises a ValueError when called without it.

    Subclasses set ``self.dim`` (the flattened data dimension D). ``HOSMModule`` accepts any
    subclass; declaring it as the type of ``model.net`` is also what keeps ``--help`` short (it
    lists these networks instead of every ``torch.nn`` module).
    """

    dim: int

    def forward(self, x: Tensor, t: Tensor, sigma: Tensor | None = None) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
