"""Score networks: the toy MLP, the calling convention ``net(x, t, sigma)`` of every ScoreNet, and the
score parameterisation wrapper ScoreModel (docs/design.md §2, §5, §6). The U-Nets are in test_unets.py."""

import math

import pytest
import torch
from torch import nn

import hosm_lightning.nets  # noqa: F401 - registers every ScoreNet subclass
from helpers import tiny_net
from hosm_lightning.core import GaussianMixture, SubVPSDE, VESDE, VPSDE
from hosm_lightning.nets import DDPMpp, NCSNpp, ScoreModel, ScoreNet, SinusoidalEmbedding, SmallConvNet, ToyScoreNet


pytestmark = pytest.mark.usefixtures("one_thread")


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
    with pytest.raises(ValueError, match="dim"):
        ToyScoreNet(dim=0)


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


# ------------------------------------------------------------------------------------------------
# the calling convention of every network: net(x, t, sigma=None), sigma = σ(t) of the SDE
# ------------------------------------------------------------------------------------------------
TINY_UNET = dict(image_size=8, nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))
#: every ScoreNet of the package at test size: (constructor, sample shape, what it conditions on)
EVERY_NET = {
    "ToyScoreNet": (lambda: tiny_net(2), (2,), "t"),
    "SmallConvNet": (lambda: SmallConvNet(image_size=8, channels=8, depth=1), (3, 8, 8), "t"),
    "DDPMpp": (lambda: DDPMpp(**TINY_UNET), (3, 8, 8), "t"),
    "NCSNpp": (lambda: NCSNpp(**TINY_UNET), (3, 8, 8), "sigma"),
}


def _all_subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_subclasses(sub)


def test_every_score_net_is_covered_by_the_calling_convention_test():
    nets = {c.__name__ for c in _all_subclasses(ScoreNet) if c.__module__.startswith("hosm_lightning.nets")}
    assert nets == set(EVERY_NET)


@pytest.mark.parametrize("name", list(EVERY_NET))
def test_every_score_net_follows_the_calling_convention(name):
    """net(x, t, sigma) positionally or by keyword, output of x's shape; a t-conditioned net ignores
    sigma (so net(x, t) works), a σ-conditioned one follows it and refuses to run without it."""
    make, shape, conditioning = EVERY_NET[name]
    torch.manual_seed(0)
    net = make().eval()
    with torch.no_grad():  # the U-Nets' zero-initialised output convs would make every output 0
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, t = torch.randn(3, *shape), torch.tensor([0.1, 0.5, 0.9])
    sigma = VESDE().marginal(t)[1]
    out = net(x, t, sigma)
    assert out.shape == x.shape and torch.isfinite(out).all() and net.dim == math.prod(shape)
    assert torch.equal(net(x, t, sigma=sigma), out)
    other = torch.tensor([5.0, 0.1, 2.0])
    if conditioning == "t":
        assert torch.equal(net(x, t, other), out)
        assert torch.equal(net(x, t), out) and torch.equal(net(x, t, sigma=None), out)
    else:
        assert not torch.allclose(net(x, t, other), out)
        torch.testing.assert_close(net(x, t, 0.5), net(x, t, torch.full((3,), 0.5)))  # a scalar σ broadcasts
        with pytest.raises(ValueError, match="sigma"):
            net(x, t)


# ------------------------------------------------------------------------------------------------
# ScoreModel: the score from the net's output, σ(t) handed to the net
# ------------------------------------------------------------------------------------------------
class TinyConv(nn.Module):
    """A per-sample image net: conv + time-dependent bias."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, t, sigma=None):
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
    model = ScoreModel(tiny_net(2), VESDE())
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
        ScoreModel(tiny_net(1), VPSDE(), parameterization="x0")


class RecordingNet(ScoreNet):
    """Records the (t, sigma) it is called with; output x·σ + t, so σ reaches the result."""

    def __init__(self):
        super().__init__()
        self.dim, self.calls = 2, []

    def forward(self, x, t, sigma=None):
        self.calls.append((t, sigma))
        return x * sigma[:, None] + t[:, None]


SDES = [VPSDE(), SubVPSDE(), VESDE(), VESDE(0.02, 10.0)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sde", SDES, ids=["vp", "subvp", "ve", "ve_other"])
def test_score_model_passes_exactly_the_sde_marginal_std(sde, dtype):
    net = RecordingNet()
    x, t = torch.randn(5, 2, dtype=dtype), torch.tensor([1e-5, 0.1, 0.4, 0.8, 1.0], dtype=dtype)
    for par in ("eps", "score", "velocity"):
        net.calls.clear()
        out = ScoreModel(net, sde, par)(x, t)
        assert len(net.calls) == 1  # σ(t) computed once, the net called once
        t_seen, sigma_seen = net.calls[0]
        a, sigma = sde.marginal(t)
        assert torch.equal(t_seen, t)
        assert sigma_seen.shape == (5,) and sigma_seen.dtype == dtype
        assert torch.equal(sigma_seen, sigma)
        raw = x * sigma[:, None] + t[:, None]
        if par == "velocity":  # ε̂ = (a v̂ + σ x)/(a² + σ²), s = −ε̂/σ
            a, sigma = a[:, None], sigma[:, None]
            torch.testing.assert_close(out, -(a * raw + sigma * x) / ((a * a + sigma * sigma) * sigma))
        else:
            assert torch.equal(out, raw if par == "score" else -raw / sigma[:, None])  # eps: s = -net/σ, same σ
    # a scalar time is broadcast to [B] before σ(t) is taken
    net.calls.clear()
    ScoreModel(net, sde, "score")(x, 0.3)
    assert torch.equal(net.calls[0][1], sde.marginal(torch.full((5,), 0.3, dtype=dtype))[1])


def test_score_model_sigma_is_differentiable_and_per_sample():
    """σ(t) is computed from t inside the graph: d/dt reaches the net through σ as well (jvp, vmap,
    create_graph), as for a σ-conditioned net such as NCSN++."""
    sde = VESDE(0.01, 50.0)
    model = ScoreModel(RecordingNet(), sde, "score")  # s = x σ(t) + t
    x, t = torch.randn(4, 2, dtype=torch.float64), torch.rand(4, dtype=torch.float64)
    sigma = sde.marginal(t)[1]
    # ∂s/∂t = x σ(t) log(σ_max/σ_min) + 1
    _, ds_dt = torch.func.jvp(lambda tt: model(x, tt), (t,), (torch.ones_like(t),))
    torch.testing.assert_close(ds_dt, x * (sigma * math.log(5000.0))[:, None] + 1)
    # per sample under vmap
    per_sample = torch.func.vmap(lambda xi, ti: model(xi[None], ti[None])[0])(x, t)
    torch.testing.assert_close(per_sample, model(x, t))
    # second derivative in t through create_graph
    tt = t.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(x, tt).sum(), tt, create_graph=True)
    (g2,) = torch.autograd.grad(g.sum(), tt)
    torch.testing.assert_close(g2, x.sum(1) * sigma * math.log(5000.0) ** 2)


# ------------------------------------------------------------------------------------------------
# the velocity parameterisation: the exact velocity of a mixture gives its exact score
# ------------------------------------------------------------------------------------------------
MIX = GaussianMixture(means=[[1.0, 0.0], [-1.0, 0.5], [0.0, -1.0]],
                      variances=[[0.1, 0.2], [0.05, 0.3], [0.2, 0.2]], weights=[0.3, 0.3, 0.4])


class ExactVelocityNet(nn.Module):
    """net(x, t, sigma) = E[a ε − σ x0 | x_t = x] of MIX (from its posterior mean, not its score)."""

    def __init__(self, sde):
        super().__init__()
        self.sde = sde

    def forward(self, x, t, sigma=None):
        return MIX.velocity(x, t, self.sde)


@pytest.mark.parametrize("sde", SDES[:3], ids=["vp", "subvp", "ve"])
def test_velocity_parameterization_of_the_exact_velocity_is_the_exact_score(sde):
    """From t = 0.01 (σ ≈ 4e-3 for subVP, 1e-2 for VP and VE) to T (σ = 50 for VE, a ≈ 7e-3 for VP) in
    float64; at smaller σ the velocity itself loses digits (x − a E[x0|x] = −σ² s cancels), not the wrapper.
    The same net read as an ε-prediction gives another score, so the wrapper's formula makes the match."""
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0.01, 0.05, 0.3, 0.7, 1.0], dtype=torch.float64).repeat_interleave(20)
    a, sigma = sde.marginal(t)
    x = a[:, None] * MIX.sample(100, g, dtype=torch.float64) + sigma[:, None] * torch.randn(100, 2, generator=g,
                                                                                          dtype=torch.float64)
    net = ExactVelocityNet(sde)
    score = MIX.score(x, t, sde)
    out = ScoreModel(net, sde, "velocity")(x, t)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, score, rtol=1e-10, atol=1e-10 * float(score.abs().max()))
    as_eps = ScoreModel(net, sde, "eps")(x, t)
    assert (as_eps - score).abs().max() > 0.1 * score.abs().max()
