"""Toy score net and the score parameterisation wrapper (docs/design.md §2, §5)."""

import pytest
import torch
from torch import nn

from hosm_lightning.core import VESDE, VPSDE
from hosm_lightning.nets import ScoreModel, SinusoidalEmbedding, ToyScoreNet


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("dim, expected", [(1, 469_377), (2, 470_018)])
def test_toy_net_shapes_and_param_count(dim, expected):
    torch.manual_seed(0)
    net = ToyScoreNet(dim=dim)
    assert net.dim == dim
    assert _n_params(net) == expected
    out = net(torch.randn(7, dim), torch.rand(7))
    assert out.shape == (7, dim) and out.dtype == torch.float32
    # a scalar time is broadcast over the batch
    assert torch.allclose(net(torch.ones(3, dim), 0.5), net(torch.ones(3, dim), torch.full((3,), 0.5)))


def test_sinusoidal_embedding_formula():
    emb = SinusoidalEmbedding(64)
    t = torch.tensor([0.0, 0.3, 1.0])
    e = emb(t)
    assert e.shape == (3, 64)
    k = torch.arange(32, dtype=torch.float64)
    freqs = torch.exp(-k * torch.log(torch.tensor(10000.0, dtype=torch.float64)) / 31)
    ref = torch.cat([torch.sin(t.double()[:, None] * freqs), torch.cos(t.double()[:, None] * freqs)], 1)
    assert torch.allclose(e.double(), ref, atol=1e-6)
    assert freqs[0] == 1 and torch.isclose(freqs[-1], torch.tensor(1e-4, dtype=torch.float64))


class TinyConv(nn.Module):
    """A per-sample image net: conv + time-dependent bias."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, t):
        return torch.tanh(self.conv(x)) + t[:, None, None, None]


@pytest.mark.parametrize("sde", [VPSDE(), VESDE()], ids=["vp", "ve"])
def test_score_model_eps_on_images(sde):
    torch.manual_seed(0)
    net = TinyConv()
    model = ScoreModel(net, sde, "eps")
    x, t = torch.randn(4, 3, 8, 8), torch.rand(4) * 0.9 + 0.05
    sigma = sde.marginal(t)[1]
    assert torch.allclose(model(x, t), -net(x, t) / sigma[:, None, None, None], rtol=1e-6, atol=0)
    assert torch.equal(ScoreModel(net, sde, "score")(x, t), net(x, t))


def test_score_model_per_sample_and_jvp():
    torch.manual_seed(0)
    model = ScoreModel(ToyScoreNet(dim=2), VESDE())
    x, t, v = torch.randn(5, 2), torch.rand(5), torch.randn(5, 2)
    # batch independence: evaluating one sample alone gives the same result
    assert torch.allclose(model(x, t)[2:3], model(x[2:3], t[2:3]), atol=1e-6)
    out, jv = torch.func.jvp(lambda y: model(y, t), (x,), (v,))
    assert torch.allclose(out, model(x, t))
    jac = torch.autograd.functional.jacobian(lambda y: model(y, t), x)  # [5,2,5,2]
    ref = torch.einsum("bibj,bj->bi", jac, v)
    assert torch.allclose(jv, ref, rtol=1e-4, atol=1e-5)


def test_score_model_bad_parameterization():
    with pytest.raises(ValueError, match="'x0'"):
        ScoreModel(ToyScoreNet(), VPSDE(), parameterization="x0")
