"""Discrete 8-bit data with an exact entropy: a test bed for bits/dim protocols.

Every dimension d is an independent byte k_d ∈ {0..255} with probabilities P_m(k) of one of a few
*marginals* m (one per channel). P_m(k) is a smooth 1-D Gaussian mixture ρ_m on [0, 1] quantised
over the bins [(k − ½)/255, (k + ½)/255) (the end bins take the tails), so P_m(k) = CDF differences
and the exact entropy is H = −(1/D) Σ_d Σ_k P(k) log₂ P(k) bits/dim.

Two kinds of data, the same bytes and P(k), different continuous distributions q_0 behind them:

* ``discrete``: point masses at the bin centres x̄_k = k/255 (2k/255 − 1 if centered):
  q_0 = Π_d Σ_k P(k) δ(x_d − x̄_k). Diffused, each dimension is a 256-component Gaussian mixture
  q_t(x_d) = Σ_k P(k) N(x_d; a x̄_k, σ²), with exact score ∂_d log q_t at every t > 0. The joint
  score is the product of these 1-D mixtures' scores (never a 256^D joint mixture). p_eps has
  spikes of width σ(eps) ≪ the bin: the regime of a real model of 8-bit images.
* ``smooth``: q_0 = Π_d ρ_m(x_d), the smooth density before quantisation (in model space), with
  q_t(x_d) = Σ_j w_j N(x_d; a μ_j, a² s_j² + σ²).

Training batches are floats on the grid x̄_k (the model range); validation/test batches are
**uint8** like :class:`CIFAR10DataModule`, so `test` reports bits/dim.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.data_range import bytes_to_model
from ..core.sde import SDE
from .spec import DataSpec
from .streams import SampledDataModule

__all__ = ["QuantizedMarginal", "DiscreteProduct", "DiscreteDataModule", "MARGINALS", "SHAPES", "KINDS"]

#: three 1-D base densities on [0, 1]: (means, standard deviations, weights)
MARGINALS = (
    ((0.3, 0.7), (0.06, 0.10), (0.5, 0.5)),
    ((0.5,), (0.15,), (1.0,)),
    ((0.2, 0.5, 0.85), (0.04, 0.05, 0.06), (0.3, 0.4, 0.3)),
)
#: data shape -> (sample shape, marginal index per dimension)
SHAPES = {"1d": ((1,), [2]), "2d": ((2,), [0, 2]), "image": ((3, 8, 8), [c for c in range(3) for _ in range(64)])}
KINDS = ("discrete", "smooth")
_CHUNK = 1 << 22  # elements of the [B, D, components] work tensors


class QuantizedMarginal:
    """A 1-D Gaussian mixture ρ on [0, 1] and its 8-bit quantisation P(k) (float64, [256])."""

    def __init__(self, means, stds, weights):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.stds = torch.as_tensor(stds, dtype=torch.float64)
        w = torch.as_tensor(weights, dtype=torch.float64)
        if not (self.means.shape == self.stds.shape == w.shape) or (self.stds <= 0).any() or (w < 0).any():
            raise ValueError("means, stds and weights must have the same length, stds > 0, weights >= 0")
        self.weights = w / w.sum()
        edges = (torch.arange(257, dtype=torch.float64) - 0.5) / 255
        z = (edges[:, None] - self.means) / self.stds
        cdf = (self.weights * torch.special.ndtr(z)).sum(1)
        cdf[0], cdf[-1] = 0.0, 1.0  # the end bins take the tails
        self.probs = (cdf[1:] - cdf[:-1]).clamp_min(0)

    @property
    def entropy_bits(self) -> float:
        """−Σ_k P(k) log₂ P(k)."""
        p = self.probs[self.probs > 0]
        return float(-(p * torch.log2(p)).sum())


def _ax(t, x: Tensor, sde: SDE):
    t = torch.as_tensor(t, dtype=torch.float64, device=x.device).reshape(-1).expand(x.shape[0])
    a, sigma = sde.marginal(t)
    return a[:, None, None], sigma[:, None, None]


class DiscreteProduct:
    """Independent bytes, dimension d distributed as marginal ``index[d]``; exact q_t, score, entropy.

    Args:
        marginals: list of :class:`QuantizedMarginal`.
        index: marginal of each (flattened) dimension, length D.
        kind: 'discrete' (point masses at the bin centres) or 'smooth' (the density ρ).
        centered: model space [−1, 1] (True) or [0, 1].
    """

    def __init__(self, marginals, index, kind: str = "discrete", centered: bool = True):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
        self.marginals, self.kind, self.centered = list(marginals), kind, bool(centered)
        self.index = torch.as_tensor(index, dtype=torch.long)
        self.probs = torch.stack([m.probs for m in self.marginals])  # [M, 256]

    @property
    def dim(self) -> int:
        return len(self.index)

    @property
    def entropy_bits(self) -> float:
        """Exact entropy of the bytes, bits per dimension."""
        return sum(self.marginals[int(m)].entropy_bits for m in self.index) / self.dim

    def grid(self) -> Tensor:
        """Bin centres x̄_k in model space, float64 [256]."""
        k = torch.arange(256, dtype=torch.float64)
        return bytes_to_model(k, self.centered, torch.float64)

    def sample_bytes(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n i.i.d. draws, uint8 [n, D]."""
        cols = [torch.multinomial(self.probs[int(m)], n, replacement=True, generator=generator) for m in self.index]
        return torch.stack(cols, 1).to(torch.uint8)

    def log_prob_bytes(self, k: Tensor) -> Tensor:
        """log P(k) in nats, [B], for uint8 k [B, ...]."""
        k = k.reshape(k.shape[0], -1).long()
        return torch.log(self.probs[self.index[None, :].expand_as(k), k]).sum(1)

    def _components(self, m: int):
        """(log weights [C], means [C], variances [C]) of marginal m's q_0 in model space."""
        if self.kind == "discrete":
            p = self.probs[m]
            return torch.log(p), self.grid(), torch.zeros(256, dtype=torch.float64)
        mg = self.marginals[m]
        scale = 2.0 if self.centered else 1.0
        shift = -1.0 if self.centered else 0.0
        return torch.log(mg.weights), scale * mg.means + shift, (scale * mg.stds) ** 2

    def _per_dim(self, x: Tensor, t, sde: SDE | None, want_score: bool, want_dscore: bool = False):
        """log q_t per dimension [B, D], and optionally the score and its diagonal derivative
        ∂s_d/∂x_d = Σ_k r_k u_k² − s_d² − Σ_k r_k / v_k ([B, D], float64; r: responsibilities, u_k = −(x − a μ_k)/v_k)."""
        x = x.reshape(x.shape[0], -1).double()
        if x.shape[1] != self.dim:
            raise ValueError(f"x must have {self.dim} dimensions per sample, got {x.shape[1]}")
        logq, score = torch.empty_like(x), torch.empty_like(x) if want_score else None
        dscore = torch.empty_like(x) if want_dscore else None
        for m in self.index.unique().tolist():
            cols = (self.index == m).nonzero().squeeze(1).to(x.device)
            logw, mu, var = (c.to(x.device) for c in self._components(m))
            if sde is None:
                if self.kind == "discrete":
                    raise ValueError("the discrete kind has no density at t = 0: pass t > 0 and sde")
                a = torch.ones(x.shape[0], 1, 1, dtype=x.dtype, device=x.device)
                sig2 = torch.zeros_like(a)
            else:
                a, sigma = _ax(t, x, sde)
                sig2 = sigma**2
            step = max(1, _CHUNK // (len(cols) * len(mu)))
            for lo in range(0, x.shape[0], step):
                xs = x[lo:lo + step][:, cols, None]  # [b, S, 1]
                aa, s2 = a[lo:lo + step], sig2[lo:lo + step]
                v = aa * aa * var + s2  # [b, 1, C]
                diff = xs - aa * mu
                lj = logw - 0.5 * (torch.log(2 * math.pi * v) + diff * diff / v)  # [b, S, C]
                logq[lo:lo + step, cols] = torch.logsumexp(lj, -1)
                if want_score:
                    r, u = torch.softmax(lj, -1), -diff / v
                    s = (r * u).sum(-1)
                    score[lo:lo + step, cols] = s
                    if want_dscore:
                        dscore[lo:lo + step, cols] = (r * (u * u - 1 / v)).sum(-1) - s * s
        return (logq, score, dscore) if want_dscore else (logq, score)

    def log_prob(self, x: Tensor, t=None, sde: SDE | None = None) -> Tensor:
        """log q_t(x) in nats, [B] (model-space x [B, ...]; q_0 for the smooth kind when sde is None)."""
        return self._per_dim(x, t, sde, False)[0].sum(1)

    def score(self, x: Tensor, t, sde: SDE) -> Tensor:
        """∇ log q_t(x), shape of x, float64 (product of the 1-D mixtures' scores)."""
        return self._per_dim(x, t, sde, True)[1].reshape(x.shape)

    def score_fn(self, sde: SDE):
        """Exact score as ``score_fn(x, t)`` (dtype of x). Its Jacobian is diagonal, so a fixed probe
        v = 1 gives the exact divergence vᵀJv = tr J in one backward pass. Gradients with respect to
        x use the closed-form diagonal (no graph through the 256-component mixtures); the score is
        not differentiable with respect to t."""
        dist = self

        class _Score(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, t):
                _, s, ds = dist._per_dim(x, t, sde, True, True)
                ctx.save_for_backward(ds.reshape(x.shape).to(x.dtype))
                return s.reshape(x.shape).to(x.dtype)

            @staticmethod
            def backward(ctx, grad):
                (ds,) = ctx.saved_tensors
                return grad * ds, None

        def fn(x: Tensor, t: Tensor) -> Tensor:
            if not x.requires_grad:
                return self.score(x, t, sde).to(x.dtype)
            return _Score.apply(x, t.detach() if torch.is_tensor(t) else t)

        return fn


class DiscreteDataModule(SampledDataModule):
    """8-bit data with exact entropy; train floats on the grid, val/test uint8.

    Args:
        shape: '1d' ([B, 1]), '2d' ([B, 2]) or 'image' ([B, 3, 8, 8], one marginal per channel).
        kind: 'discrete' (q_0 = point masses at the bin centres) or 'smooth' (q_0 = the density
            before quantisation); the bytes and P(k) are the same for both.
        centered: model range [−1, 1] (True) or [0, 1].
        batch_size, eval_batch_size: train / val-and-test batch sizes.
        steps_per_epoch: fresh training batches per epoch.
        val_size, test_size: sizes of the fixed uint8 validation / test sets.
        seed: base seed (train (seed, rank, epoch, batch); val seed + 1; test seed + 2).
    """

    def __init__(self, shape: str = "1d", kind: str = "discrete", centered: bool = True, batch_size: int = 256,
                 eval_batch_size: int = 256, steps_per_epoch: int = 100, val_size: int = 1000, test_size: int = 2000,
                 seed: int = 0):
        if shape not in SHAPES:
            raise ValueError(f"shape must be one of {list(SHAPES)}, got {shape!r}")
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, steps_per_epoch=steps_per_epoch,
                         val_size=val_size, test_size=test_size, seed=seed)
        self.save_hyperparameters()
        self.shape, self.kind, self.centered = shape, kind, bool(centered)
        self.sample_shape, index = SHAPES[shape]
        self.distribution = DiscreteProduct([QuantizedMarginal(*m) for m in MARGINALS], index, kind, centered)
        if shape == "image":
            self.image_shape = self.sample_shape

    @property
    def dim(self) -> int:
        return self.distribution.dim

    @property
    def entropy_bits(self) -> float:
        """Exact entropy of the bytes in bits/dim: the best achievable bits/dim."""
        return self.distribution.entropy_bits

    @property
    def entropy(self) -> float:
        """The exact entropy in the unit of this data's metric, bits/dim (see ``entropy_bits``)."""
        return self.entropy_bits

    def sample_bytes(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """uint8 [n, *sample_shape]."""
        return self.distribution.sample_bytes(n, generator).reshape(n, *self.sample_shape)

    def to_model_range(self, k: Tensor) -> Tensor:
        return bytes_to_model(k, self.centered)

    def data_spec(self) -> DataSpec:
        """uint8 evaluation data with exact byte probabilities and entropy (bits/dim)."""
        return DataSpec(shape=tuple(self.sample_shape), discrete=True, centered=self.centered,
                        name=f"discrete-{self.shape}-{self.kind}", entropy=self.entropy,
                        log_prob_bytes=self.distribution.log_prob_bytes)

    def draw_train(self, n: int, generator: torch.Generator) -> Tensor:
        return self.to_model_range(self.sample_bytes(n, generator))

    def draw_eval(self, n: int, generator: torch.Generator) -> Tensor:
        return self.sample_bytes(n, generator)  # uint8: the module dequantizes the evaluation points
