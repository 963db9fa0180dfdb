"""DDPM++ / NCSN++ U-Nets (docs/design.md §6): FIR resampling, parameterisations, third-order
differentiability through every layer, a finite-difference check of the order-3 loss gradient,
activation checkpointing, score_sde_pytorch checkpoint import, parameter counts.

Tiny configurations (nf 16, ch_mult (1, 2), one block per level, 8×8 images, batch 2), except the
parameter counts of the paper's configurations (built on the meta device: no memory, no compute).
"""

import math
import sys

import pytest
import torch
import torch.nn.functional as F

from hosm_lightning.core import VESDE, VPSDE, HOSMObjective
from hosm_lightning.nets.checkpoint_import import load_score_sde_checkpoint, save_score_sde_checkpoint
from hosm_lightning.nets.ddpmpp import DDPMpp
from hosm_lightning.nets.fir import (
    fir_conv_downsample_2d,
    fir_downsample_2d,
    fir_upsample_2d,
    naive_downsample_2d,
    naive_upsample_2d,
)
from hosm_lightning.nets.ncsnpp import NCSNpp
from hosm_lightning.nets.score import ScoreModel


pytestmark = pytest.mark.usefixtures("one_thread")


TINY = dict(image_size=8, nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))
NETS = {
    "ddpmpp": (DDPMpp, VPSDE, "eps"),
    "ncsnpp": (NCSNpp, VESDE, "score"),
}


def make(name, seed=0, **kw):
    """A tiny net with every weight perturbed (the zero-initialised output convs would hide bugs)."""
    cls, _, _ = NETS[name]
    torch.manual_seed(seed)
    net = cls(**{**TINY, **kw})
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def score_model(name, net):
    _, sde_cls, par = NETS[name]
    sde = sde_cls()
    return ScoreModel(net, sde, par), sde


def call(name, net, x, t):
    """``net(x, t, σ(t))`` with σ = the marginal std of the net's default SDE, as ScoreModel calls it
    (DDPM++ ignores σ; NCSN++ conditions on it)."""
    t = torch.as_tensor(t, dtype=x.dtype)
    return net(x, t, NETS[name][1]().marginal(t)[1].to(x.dtype))


def images(b=2, seed=1, dtype=torch.float32):
    return torch.rand(b, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ------------------------------------------------------------------------------------------------
# FIR resampling against explicit 1-D operators (Y = A X Aᵀ per channel)
# ------------------------------------------------------------------------------------------------
def _up_matrix(n):
    """y[2i] = (x[i-1] + 3x[i])/4, y[2i+1] = (3x[i] + x[i+1])/4, zero outside."""
    a = torch.zeros(2 * n, n, dtype=torch.float64)
    for i in range(n):
        a[2 * i, i], a[2 * i + 1, i] = 0.75, 0.75
        if i > 0:
            a[2 * i, i - 1] = 0.25
        if i + 1 < n:
            a[2 * i + 1, i + 1] = 0.25
    return a


def _blur_matrix(n, pad, stride):
    """Correlation with [1,3,3,1]/8 on x zero-padded by ``pad`` on both sides, every ``stride``-th output."""
    k = torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=torch.float64) / 8
    n_out = (n + 2 * pad - 4) // stride + 1
    b = torch.zeros(n_out, n, dtype=torch.float64)
    for j in range(n_out):
        for m in range(4):
            src = stride * j + m - pad
            if 0 <= src < n:
                b[j, src] += k[m]
    return b


def test_fir_resampling_matches_explicit_reference():
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    up, down = _up_matrix(6), _blur_matrix(6, pad=1, stride=2)
    torch.testing.assert_close(fir_upsample_2d(x), up @ x @ up.T)
    torch.testing.assert_close(fir_downsample_2d(x), down @ x @ down.T)
    # FIR blur (pad 2) then a stride-2 3×3 convolution
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    blur = _blur_matrix(6, pad=2, stride=1)
    torch.testing.assert_close(fir_conv_downsample_2d(x, w), F.conv2d(blur @ x @ blur.T, w, stride=2))
    # constant images stay constant away from the border
    ones = torch.ones(1, 1, 6, 6, dtype=torch.float64)
    assert (fir_upsample_2d(ones)[..., 1:-1, 1:-1] - 1).abs().max() < 1e-12
    # plain resampling
    torch.testing.assert_close(naive_upsample_2d(x), F.interpolate(x, scale_factor=2, mode="nearest"))
    torch.testing.assert_close(naive_downsample_2d(x), F.avg_pool2d(x, 2))


# ------------------------------------------------------------------------------------------------
# shapes and score parameterisations
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(NETS))
def test_shapes_and_batch_independence(name):
    net = make(name).eval()
    assert net.dim == 3 * 8 * 8
    x, t = images(3), torch.tensor([0.1, 0.5, 0.9])
    out = call(name, net, x, t)
    assert out.shape == x.shape and torch.isfinite(out).all()
    torch.testing.assert_close(call(name, net, x[1:2], t[1:2]), out[1:2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(call(name, net, x, 0.5), call(name, net, x, torch.full((3,), 0.5)))  # scalar time broadcasts
    with pytest.raises(ValueError, match="expected images"):
        call(name, net, torch.rand(2, 3, 16, 16), t[:2])


def test_ddpmpp_eps_parameterisation():
    net = make("ddpmpp").eval()
    model, sde = score_model("ddpmpp", net)
    x, t = images(), torch.tensor([0.2, 0.7])
    sigma = sde.marginal(t)[1]
    torch.testing.assert_close(model(x, t), -net(x, t) / sigma[:, None, None, None])
    # the noise label is 999 t: a net with time_scale 1 fed 999 t gives the same output
    net1 = DDPMpp(**TINY, time_scale=1.0).eval()
    net1.load_state_dict(net.state_dict())
    torch.testing.assert_close(net1(x, 999 * t), net(x, t))


def test_ncsnpp_score_parameterisation_and_data_range():
    net = make("ncsnpp").eval()
    model, sde = score_model("ncsnpp", net)
    x, t = images(), torch.tensor([0.2, 0.7])
    sigma = sde.marginal(t)[1]  # σ_min (σ_max/σ_min)^t, the VE marginal std
    torch.testing.assert_close(model(x, t), net(x, t, sigma))  # 'score': the net output is the score
    unscaled = NCSNpp(**TINY, scale_by_sigma=False).eval()
    unscaled.load_state_dict(net.state_dict())
    torch.testing.assert_close(net(x, t, sigma) * sigma[:, None, None, None], unscaled(x, t, sigma),
                               rtol=1e-5, atol=1e-6)
    centered = NCSNpp(**TINY, centered=True).eval()
    centered.load_state_dict(net.state_dict())
    torch.testing.assert_close(centered(2 * x - 1, t, sigma), net(x, t, sigma))  # [0,1] data are mapped to [-1,1]


# ------------------------------------------------------------------------------------------------
# the noise level σ(t) comes from the SDE through ScoreModel (net(x, t, sigma))
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ncsnpp_through_score_model_is_the_unet_on_log_sigma_divided_by_sigma(dtype):
    """ScoreModel(NCSNpp, VESDE(0.01, 50)) hands the net σ(t) = σ_min (σ_max/σ_min)^t, and the net is
    the U-Net on (2x - 1, log σ) divided by σ: the same numbers as that formula written out."""
    net = make("ncsnpp").to(dtype).eval()
    x = images(4, dtype=dtype)
    t = torch.tensor([1e-5, 0.2, 0.7, 1.0], dtype=dtype)
    wrapped = ScoreModel(net, VESDE(0.01, 50.0), "score")(x, t)
    log_sigma = math.log(0.01) + t * math.log(50.0 / 0.01)
    direct_call = net(x, t, sigma=torch.exp(log_sigma))
    # the forward pass spelled out: Fourier embedding of log σ(t), U-Net, output divided by σ(t)
    spelled_out = net.forward_label(2 * x - 1, log_sigma) / torch.exp(log_sigma).reshape(-1, 1, 1, 1)
    rtol = 2e-6 if dtype == torch.float32 else 1e-9
    for expected in (direct_call, spelled_out):
        torch.testing.assert_close(wrapped, expected, rtol=rtol, atol=0)


def test_ncsnpp_without_sigma_raises_a_clear_error():
    net = make("ncsnpp").eval()
    with pytest.raises(ValueError, match=r"NCSNpp conditions on the noise level σ\(t\): call it through ScoreModel "
                                         r"\(which passes sigma = sde.marginal\(t\)\[1\]\) or pass sigma"):
        net(images(), torch.tensor([0.2, 0.7]))
    with pytest.raises(TypeError, match="sigma_max"):  # no schedule of its own to keep in sync with the SDE
        NCSNpp(**TINY, sigma_max=50.0)
    assert not hasattr(net, "sigma_min") and not hasattr(net, "sigma_max")


def test_ncsnpp_follows_the_sde_it_is_wrapped_with():
    """Another VE schedule changes the score through σ(t) alone: the net holds no copy of σ_min/σ_max.
    (float64: the Fourier features of log σ amplify float32 rounding of σ between the two formulas.)"""
    net = make("ncsnpp").double().eval()
    x, t = images(dtype=torch.float64), torch.tensor([0.2, 0.7], dtype=torch.float64)
    default = ScoreModel(net, VESDE(0.01, 50.0), "score")(x, t)
    other = ScoreModel(net, VESDE(0.02, 10.0), "score")(x, t)
    expected = net(x, t, sigma=0.02 * (10.0 / 0.02) ** t)  # σ(t) of VESDE(0.02, 10)
    torch.testing.assert_close(other, expected, rtol=1e-9, atol=0)
    assert not torch.allclose(other, default, rtol=1e-3, atol=0)
    # the net sees σ only: at the same σ the two wrappers agree, whatever t that σ belongs to
    t_other = torch.log(VESDE(0.01, 50.0).sigma(t) / 0.02) / math.log(10.0 / 0.02)
    torch.testing.assert_close(ScoreModel(net, VESDE(0.02, 10.0), "score")(x, t_other), default, rtol=1e-9, atol=0)


# ------------------------------------------------------------------------------------------------
# third-order DSM through the nets
# ------------------------------------------------------------------------------------------------
#: the objective with unit weights, as the reference image code: loss = dsm1 + dsm2 + dsm3 per sample
HUTCHINSON = HOSMObjective(lambda2=1.0, lambda3=1.0, divergence="hutchinson")


@pytest.mark.parametrize("name", list(NETS))
def test_third_order_loss_gradients_finite_nonzero(name):
    """JVP, ∇ₓ(vᵀJv) and the parameter gradient go through every layer: every parameter gets a
    finite, non-zero gradient of the order-3 loss."""
    net = make(name, dropout=0.1).train()
    model, sde = score_model(name, net)
    loss, terms = HUTCHINSON(model, sde, images(), 3, torch.Generator().manual_seed(3))
    assert set(terms.terms()) == {"dsm1", "dsm2", "dsm3"} and loss.shape == (2,)
    torch.testing.assert_close(loss, terms.dsm1 + terms.dsm2 + terms.dsm3)
    loss.mean().backward()
    for n, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, n


class _FrozenStopGradients:
    """Record the values that the objective stop-gradients (``.detach()`` calls made in
    hosm_lightning.core.dsm) at θ₀, then replay them at perturbed θ.

    Autograd differentiates the order-3 loss with ĉ, Jv, vᵀJv inside r held fixed, so the matching
    finite difference is that of θ ↦ L(θ; stop-gradient values at θ₀), not of the loss value itself.
    """

    def __init__(self, monkeypatch):
        self.values, self.mode, self.i = [], "record", 0
        original = torch.Tensor.detach

        def detach(tensor):
            out = original(tensor)
            if sys._getframe(1).f_globals.get("__name__") != "hosm_lightning.core.dsm":
                return out
            if self.mode == "record":
                self.values.append(out.clone())
                return out
            frozen = self.values[self.i]
            self.i += 1
            assert frozen.shape == out.shape
            return frozen.clone()

        monkeypatch.setattr(torch.Tensor, "detach", detach)

    def replay(self):
        self.mode, self.i = "replay", 0


@pytest.mark.parametrize("name", list(NETS))
def test_third_order_gradient_matches_finite_differences(name, monkeypatch):
    """d/dh L(θ + h d) at h = 0: autograd vs central differences, float64 net, fixed t, z, v."""
    net = make(name, dropout=0.0).double().train()
    _, sde = score_model(name, net)
    wrapped = ScoreModel(net, sde, NETS[name][2])

    def score_fn(x, t):  # run the net in float64 whatever precision the objective works in
        return wrapped(x.double(), t.double())

    g = torch.Generator().manual_seed(7)
    x0 = images(dtype=torch.float64)
    t = torch.tensor([0.05, 0.6], dtype=torch.float64)
    z = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    v = torch.randint(0, 2, x0.shape, generator=g).double() * 2 - 1

    def loss():
        return HUTCHINSON(score_fn, sde, x0, 3, t=t, z=z, v=v)[0].mean()

    params = [p for p in net.parameters() if p.requires_grad]
    direction = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
    frozen = _FrozenStopGradients(monkeypatch)
    net.zero_grad()
    loss().backward()
    analytic = sum((p.grad * d).sum() for p, d in zip(params, direction)).item()
    frozen.replay()
    h, values = 1e-4, []
    for sign in (1, -1):
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(sign * h * d)
        frozen.replay()
        values.append(loss().item())  # the loss itself differentiates w.r.t. x: grad mode stays on
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.sub_(sign * h * d)
    numeric = (values[0] - values[1]) / (2 * h)
    assert analytic != 0
    assert abs(analytic - numeric) <= 1e-3 * abs(numeric), (analytic, numeric)


# ------------------------------------------------------------------------------------------------
# activation checkpointing
# ------------------------------------------------------------------------------------------------
def test_checkpoint_blocks_give_the_same_first_order_gradients():
    grads = []
    for flag in (False, True):
        net = make("ddpmpp", dropout=0.1, checkpoint_blocks=flag).train()
        model, sde = score_model("ddpmpp", net)
        torch.manual_seed(11)  # same dropout masks in both runs (checkpoint replays the RNG state)
        HUTCHINSON(model, sde, images(), 1, torch.Generator().manual_seed(3))[0].mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


# ------------------------------------------------------------------------------------------------
# score_sde_pytorch checkpoints
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(NETS))
def test_score_sde_checkpoint_round_trip(name, tmp_path):
    src = make(name, seed=0).eval()
    ema = [p.detach() + 0.01 * torch.randn_like(p) for p in src.parameters() if p.requires_grad]
    path = tmp_path / "checkpoint_26.pth"
    save_score_sde_checkpoint(src, path, step=123, ema_decay=0.999, ema_params=ema)
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt) == {"model", "ema", "optimizer", "step"} and ckpt["step"] == 123
    assert all(k.startswith("module.all_modules.") for k in ckpt["model"])
    x, t = images(), torch.tensor([0.3, 0.8])

    dst = make(name, seed=1).eval()
    info = load_score_sde_checkpoint(dst, path, use_ema=False)
    assert info["step"] == 123 and not info["used_ema"]
    assert torch.equal(call(name, dst, x, t), call(name, src, x, t))

    info = load_score_sde_checkpoint(dst, path, use_ema=True)
    assert info["used_ema"] and info["ema_decay"] == 0.999
    for p, e in zip((p for p in dst.parameters() if p.requires_grad), ema):
        assert torch.equal(p, e)
    with torch.no_grad():
        for p, e in zip((p for p in src.parameters() if p.requires_grad), ema):
            p.copy_(e)
    assert torch.equal(call(name, dst, x, t), call(name, src, x, t))

    # positional mapping of renamed keys gives the same weights
    other = make(name, seed=2).eval()
    load_score_sde_checkpoint(other, path, use_ema=True, key_map=lambda k: "renamed." + k, match="order")
    assert torch.equal(call(name, other, x, t), call(name, src, x, t))


def test_score_sde_checkpoint_errors(tmp_path):
    path = tmp_path / "ddpmpp.pth"
    save_score_sde_checkpoint(make("ddpmpp"), path)
    wrong = DDPMpp(**{**TINY, "num_res_blocks": 2})
    with pytest.raises(ValueError, match=r"missing keys .*unexpected keys .*shape mismatches"):
        load_score_sde_checkpoint(wrong, path)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_score_sde_checkpoint(DDPMpp(**{**TINY, "nf": 32}), path, match="order")
    with pytest.raises(ValueError, match="missing keys"):
        load_score_sde_checkpoint(make("ncsnpp"), path)  # the other architecture
    junk = tmp_path / "notes.txt"
    junk.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.txt"):
        load_score_sde_checkpoint(make("ddpmpp"), junk)
    other = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(ValueError, match="plain.pt.*not a score_sde_pytorch checkpoint"):
        load_score_sde_checkpoint(make("ddpmpp"), other)


# ------------------------------------------------------------------------------------------------
# parameter counts of the paper's configurations (README "CIFAR-10 networks")
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls, kw, expected", [(DDPMpp, {}, 61_804_419), (DDPMpp, {"num_res_blocks": 8}, 106_632_579),
                                               (NCSNpp, {}, 62_758_787)], ids=["ddpmpp", "ddpmpp_deep", "ncsnpp"])
def test_paper_configuration_parameter_counts(cls, kw, expected):
    with torch.device("meta"):
        net = cls(**kw)
    assert (net.image_size, net.nf, net.ch_mult, net.num_res_blocks) == (32, 128, (1, 2, 2, 2), kw.get("num_res_blocks", 4))
    assert sum(p.numel() for p in net.parameters()) == expected
