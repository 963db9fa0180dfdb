"""Sample-quality metrics (FID, KID) for small real-image data sets, in the feature space of a small
classifier trained on the data set itself.

Inception-v3 is neither available offline nor meaningful for 8×8 digits or 16×16 photo patches, so,
as usual for MNIST-like data, the feature space is the penultimate layer of a tiny CNN
(:class:`FeatureNet`) trained to classify the training split (digit class, or source photograph of a
patch). FIDs and KIDs computed here are comparable ONLY between models evaluated with the same
feature network (same weights file); they are not comparable to the Inception FIDs of papers.

With μ, Σ the mean and (unbiased) covariance of the features of real (r) and generated (f) images,

    FID = ‖μ_r − μ_f‖² + tr(Σ_r + Σ_f − 2 (Σ_r Σ_f)^{1/2}),

and KID is the unbiased estimate of the squared maximum mean discrepancy with the cubic polynomial
kernel k(x, y) = (xᵀy/d + 1)³ (d the feature dimension), on m-sample subsets X, Y of each set:

    KID = Σ_{i≠j} k(x_i, x_j)/(m(m−1)) + Σ_{i≠j} k(y_i, y_j)/(m(m−1)) − 2 Σ_{i,j} k(x_i, y_j)/m²,

averaged over random subsets (mean and std over subsets as torchmetrics reports them). Both are
computed by torchmetrics (``FrechetInceptionDistance`` / ``KernelInceptionDistance`` with a custom
feature module, :class:`FeatureExtractor`) in float64. Images are uint8 tensors [N, C, H, W] of grey
levels k ∈ {0..L−1}; the networks see k/(L−1).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from .core.data_range import bytes_to_model

__all__ = [
    "FeatureExtractor",
    "FeatureNet",
    "fid_from_features",
    "fid_standard_error",
    "load_feature_net",
    "sample_quality",
    "save_feature_net",
    "train_feature_net",
]


def _check_images(x: Tensor, levels: int, channels: int, what: str = "images") -> None:
    if not isinstance(x, Tensor) or x.dtype != torch.uint8:
        raise ValueError(f"{what} must be a uint8 tensor of grey levels 0..{levels - 1}, got "
                         f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{what} must have shape [N, C, H, W], got {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(f"{what} have {x.shape[1]} channels but the feature network expects {channels}")
    if x.numel() and int(x.max()) >= levels:
        raise ValueError(f"{what} contain grey level {int(x.max())}, but levels={levels} (values must be < levels)")


class FeatureNet(nn.Module):
    """conv(C→w)-SiLU-conv(w→2w, stride 2)-SiLU-conv(2w→2w, stride 2)-SiLU-global average pool-
    linear(2w→feature_dim)-SiLU = ``features``, then linear(feature_dim→num_classes) = logits.
    Inputs are floats in [0, 1]; any H, W ≥ 1 (about 61k parameters at the defaults, C=1, 10 classes)."""

    def __init__(self, in_channels: int, num_classes: int, feature_dim: int = 64, width: int = 32,
                 levels: int | None = None):
        super().__init__()
        self.config = {"in_channels": in_channels, "num_classes": num_classes, "feature_dim": feature_dim,
                       "width": width, "levels": levels}
        self.in_channels, self.feature_dim, self.levels = in_channels, feature_dim, levels
        self.trunk = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, feature_dim), nn.SiLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.trunk(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.trunk(x))


class FeatureExtractor(nn.Module):
    """The feature module for torchmetrics' FID/KID: uint8 levels [N, C, H, W] → float64 features [N, d].

    torchmetrics (1.9) calls ``feature(imgs)`` on exactly what ``update`` was given (no casting for
    a custom module), reads the dimension from ``num_features`` (else it would run a dummy uint8
    3×299×299 batch), casts the output to float64 and returns FID in the output's dtype; KID keeps
    the features as they come. So: validate and scale the levels here, return float64, and stay in
    evaluation mode even when the metric is put into training mode."""

    def __init__(self, net: FeatureNet, levels: int | None = None, batch_size: int = 1024):
        super().__init__()
        levels = net.levels if levels is None else levels
        if levels is None or levels < 2:
            raise ValueError(f"levels must be an int ≥ 2 (the net does not record one), got {levels}")
        self.net, self.levels, self.batch_size = net.eval(), int(levels), batch_size
        self.num_features = net.feature_dim

    def train(self, mode: bool = True) -> FeatureExtractor:
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        _check_images(x, self.levels, self.net.in_channels)
        device = next(self.net.parameters()).device
        out = [self.net.features(bytes_to_model(b.to(device), False, levels=self.levels)).double()
               for b in x.split(self.batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.num_features, dtype=torch.float64, device=device)


def _augment(x: Tensor, gen: torch.Generator, flip: bool) -> Tensor:
    """Random shifts by −1, 0 or +1 pixel per axis (edge-replicated border), optional horizontal flips."""
    n, _, h, w = x.shape
    pad = F.pad(x, (1, 1, 1, 1), mode="replicate")
    dy, dx = (torch.randint(0, 3, (n,), generator=gen) for _ in range(2))
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, x.shape[1], h, w + 2)
    out = pad.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, x.shape[1], h, w)
    out = out.gather(3, cols)
    if flip:
        mirror = torch.rand(n, generator=gen) < 0.5
        out = torch.where(mirror[:, None, None, None], out.flip(3), out)
    return out


@torch.no_grad()
def _accuracy(net: FeatureNet, x: Tensor, y: Tensor, levels: int) -> float:
    pred = torch.cat([net(bytes_to_model(b, False, levels=levels)).argmax(1) for b in x.split(1024)])
    return float((pred == y).float().mean())


def train_feature_net(images: Tensor, labels: Tensor, *, levels: int, num_classes: int | None = None,
                      steps: int = 500, batch_size: int = 64, lr: float = 5e-3, seed: int = 0,
                      val: tuple[Tensor, Tensor] | None = None, augment: bool = True, flip: bool = False,
                      feature_dim: int = 64, width: int = 32) -> tuple[FeatureNet, dict]:
    """Train a :class:`FeatureNet` (Adam, cosine-decayed lr, cross-entropy) on uint8 ``images`` with
    int64 class ids ``labels``; CPU. Deterministic given ``seed`` (a private torch.Generator draws the
    batches and augmentations; the init runs in a forked CPU RNG, so the global RNG state is untouched).
    Returns the net (eval mode) and info: train_accuracy (un-augmented training set), val_accuracy
    (if ``val``), steps, seconds, final_loss, num_params."""
    _check_images(images, levels, images.shape[1] if isinstance(images, Tensor) and images.dim() == 4 else 0)
    images, labels = images.cpu(), labels.cpu()
    if labels.dtype != torch.int64 or labels.shape != (images.shape[0],):
        raise ValueError(f"labels must be int64 of shape [{images.shape[0]}], got {labels.dtype} {tuple(labels.shape)}")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")
    start, gen = time.perf_counter(), torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed would also (lazily) seed CUDA
        net = FeatureNet(images.shape[1], num_classes, feature_dim, width, levels)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    x = bytes_to_model(images, False, levels=levels)
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=gen)
        xb = _augment(x[idx], gen, flip) if augment else x[idx]
        loss = F.cross_entropy(net(xb), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    info = {"train_accuracy": _accuracy(net, images, labels, levels), "steps": steps,
            "final_loss": loss.item() if steps else float("nan"),
            "num_params": sum(p.numel() for p in net.parameters())}
    if val is not None:
        _check_images(val[0], levels, images.shape[1], "val images")
        info["val_accuracy"] = _accuracy(net, val[0], val[1], levels)
    info["seconds"] = time.perf_counter() - start
    return net, info


def sample_quality(real: Tensor, fake: Tensor, extractor: FeatureExtractor, *, kid_subset_size: int | None = None,
                   kid_subsets: int = 100, seed: int = 0) -> dict:
    """FID and KID (mean, std over ``kid_subsets`` random subsets of ``kid_subset_size``, default
    min(1000, n_real, n_fake)) of uint8 ``fake`` against uint8 ``real``, by torchmetrics in float64.
    The KID subsets are drawn from a forked CPU RNG seeded with ``seed`` (global RNG untouched)."""
    n_real, n_fake = real.shape[0], fake.shape[0]
    m = min(1000, n_real, n_fake) if kid_subset_size is None else kid_subset_size
    if not 2 <= m <= min(n_real, n_fake):
        raise ValueError(f"kid_subset_size must be in 2..min(n_real, n_fake)={min(n_real, n_fake)}, got {m}")
    fid = FrechetInceptionDistance(feature=extractor, normalize=False)
    kid = KernelInceptionDistance(feature=extractor, subsets=kid_subsets, subset_size=m, normalize=False)
    device = next(extractor.parameters()).device
    for metric in (fid.to(device), kid.to(device)):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std),
            "n_real": n_real, "n_fake": n_fake, "kid_subset_size": m, "kid_subsets": kid_subsets}


def fid_from_features(f_real: Tensor, f_fake: Tensor) -> Tensor:
    """The FID formula of torchmetrics (tr (Σ_r Σ_f)^{1/2} as the sum of the square roots of the
    eigenvalues of Σ_r Σ_f) on feature matrices [N, d], in float64."""
    f_real, f_fake = f_real.double(), f_fake.double()
    mu_r, mu_f = f_real.mean(0), f_fake.mean(0)
    s_r, s_f = torch.cov(f_real.T).reshape(mu_r.numel(), -1), torch.cov(f_fake.T).reshape(mu_f.numel(), -1)
    root = torch.linalg.eigvals(s_r @ s_f).sqrt().real.sum()
    return (mu_r - mu_f).square().sum() + s_r.trace() + s_f.trace() - 2 * root


def fid_standard_error(real: Tensor, fake: Tensor, extractor: FeatureExtractor, *, n_boot: int = 100,
                       seed: int = 0, resample_real: bool = False) -> dict:
    """Bootstrap standard error of the FID: the std (ddof=1) of the FID over ``n_boot`` resamples of
    the fake set with replacement (and of the real set too if ``resample_real``; by default it is
    held fixed because it is shared by the models being compared, so its noise largely cancels in
    their difference). Two models' FIDs differ beyond noise if |ΔFID| ≫ √(se₁² + se₂²). The bootstrap
    FIDs themselves are biased upward (duplicates), so only their spread is used.
    Cost: one feature extraction per set, then n_boot × (covariance O(n d²) + eigenvalues O(d³)).
    Returns fid (the full-sample FID), se, n_boot, method."""
    f_real, f_fake = extractor(real), extractor(fake)
    gen = torch.Generator().manual_seed(seed)
    boots = []
    for _ in range(n_boot):
        fr = f_real[torch.randint(0, len(f_real), (len(f_real),), generator=gen)] if resample_real else f_real
        boots.append(fid_from_features(fr, f_fake[torch.randint(0, len(f_fake), (len(f_fake),), generator=gen)]))
    return {"fid": float(fid_from_features(f_real, f_fake)), "se": float(torch.stack(boots).std()),
            "n_boot": n_boot, "method": "bootstrap over " + ("real and fake" if resample_real else "fake")}


def save_feature_net(net: FeatureNet, path: str | Path) -> None:
    torch.save({"format": "hosm-feature-net", "version": 1, "config": dict(net.config),
                "state_dict": net.state_dict()}, Path(path))


def load_feature_net(path: str | Path) -> FeatureNet:
    """The FeatureNet saved by :func:`save_feature_net` (eval mode, on CPU). FileNotFoundError if the
    file is missing; ValueError naming the file if it is not a readable feature-net file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature network file {path} does not exist")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != "hosm-feature-net":
            raise ValueError("not a feature-network file (no 'format': 'hosm-feature-net')")
        net = FeatureNet(**blob["config"])
        net.load_state_dict(blob["state_dict"])
    except Exception as err:
        raise ValueError(f"cannot load the feature network from {path}: {type(err).__name__}: {err}") from err
    return net.eval()
