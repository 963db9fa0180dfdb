"""Score networks (nn.Modules) and the score parameterisation wrapper.

Convention for every net here: ``net(x, t)`` predicts the noise ε of x_t = a x_0 + σ z, and the
score is s_θ(x, t) = -net(x, t) / σ(t) (DESIGN.md §2); :class:`ScoreModel` applies it.
"""

from .conv import SmallConvNet
from .score import ScoreModel
from .toy import SinusoidalEmbedding, ToyScoreNet, mlp

__all__ = ["ScoreModel", "ToyScoreNet", "SmallConvNet", "SinusoidalEmbedding", "mlp"]
