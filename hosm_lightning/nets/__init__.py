"""Score networks (nn.Modules) and the score parameterisation wrapper.

Convention: ``net(x, t, sigma=None)`` with sigma = σ(t) = ``sde.marginal(t)[1]``, which
:class:`ScoreModel` computes and hands over. ToyScoreNet, SmallConvNet and DDPMpp condition on t
(they ignore sigma, so ``net(x, t)`` works) and predict the noise ε of x_t = a x_0 + σ z (use
``parameterization: eps``, s = -net/σ); NCSNpp conditions on log σ, divides its output by σ and
returns the score itself (use ``parameterization: score``). :class:`ScoreModel` applies it.
Every network subclasses :class:`ScoreNet` (the type of ``model.net`` in the configs).
"""

from .base import ScoreNet
from .checkpoint_import import load_score_sde_checkpoint, save_score_sde_checkpoint
from .conv import SmallConvNet
from .ddpmpp import DDPMpp
from .ncsnpp import NCSNpp
from .score import ScoreModel
from .toy import SinusoidalEmbedding, ToyScoreNet, mlp
from .unet import UNetBody

__all__ = [
    "ScoreNet", "ScoreModel", "ToyScoreNet", "SmallConvNet", "DDPMpp", "NCSNpp", "UNetBody", "SinusoidalEmbedding", "mlp",
    "load_score_sde_checkpoint", "save_score_sde_checkpoint",
]
