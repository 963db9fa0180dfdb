"""FID of probability-flow ODE samples at test time, sharded over ranks (docs/design.md §6, §7).

:class:`FIDCallback` is a Lightning callback. At the end of the test epoch it:

1. draws ``num_samples`` samples with the module's sampling path (``HOSMModule.sample``). The
   sample indices are split over the ranks by the project's one sharding rule
   (``data/sharding.py`` ``shard_indices``). Sample ``i`` starts from
   x_T drawn with its own generator seeded with (seed, 'fid', i), so the set of starting points
   does not depend on the number of GPUs or on the batch size. The adaptive solver controls
   its error over the whole batch, so the final samples agree across splits to about the
   solver tolerance, not bit for bit;
2. quantizes the samples like a saved PNG: model range → [0, 1] → ``(x*255).round().clamp(0, 255)``
   as uint8. With ``png_dir`` set it also writes them as ``{i:06d}.png``, so that
   torch-fidelity's ``calculate_metrics`` can cross-check the number;
3. feeds torchmetrics' ``FrechetInceptionDistance``. The metric is created here, at test time,
   and is not an attribute of the LightningModule, so it is never checkpointed or EMA-averaged.
   Every rank calls ``compute()``, which sum-allreduces the feature statistics;
4. takes the real statistics of the training images from a cache file keyed by the feature
   extractor and the data: the metric's own state (``persistent`` states, ``state_dict``), summed
   over the ranks. They are computed once, sharded over the ranks (``update(real=True)``), and
   written by rank 0; on a cache hit rank 0 loads them (``load_state_dict``) and the other ranks
   keep zeros, so the sum in ``compute()`` reproduces them exactly. Only torchmetrics' public
   interface is used;
5. logs ``test/fid`` and ``test/fid_n``, warns that FID with fewer than 50 000 samples is not
   comparable to published numbers, logs a sample grid (``test/samples``) to TensorBoard, and
   (rank 0) writes a JSON record with n, the reference set and the extractor.

Inception weights: with ``feature_module=None`` the metric uses torchmetrics' default extractor
(torch-fidelity's ``inception-v3-compat``). The weights come from ``feature_extractor_weights_path``
or from the torch hub cache. Nothing is downloaded implicitly: if neither is there, ``setup``
raises one error that names the file and where to put it.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from ..core.data_range import model_to_bytes
from ..core.ode import ODEOptions, seeded_prior
from ..data.sharding import shard_indices
from ..data.spec import describe
from ..inception import file_digest, inception_weights_file, module_digest, tensor_digest, write_pngs
from ..plots import image_grid

__all__ = ["FIDCallback"]

PAPER_N = 50_000


class FIDCallback(L.Callback):
    """FID of ODE samples against cached training-set statistics, computed at test time.

    Args:
        num_samples: number of generated samples N (the paper protocol: 50 000).
        batch_size: samples per ODE solve (per rank).
        feature_extractor_weights_path: local Inception weights file for the default extractor
            (None: the torch hub cache, ``$TORCH_HOME/hub/checkpoints/``).
        feature: Inception feature layer (64, 192, 768 or 2048; the standard is 2048).
        real_stats_cache: file of the real statistics (mean, cov, n, extractor key), written once
            and reused while the key matches; None recomputes them every time.
        ode: overrides of the model's ODE options (``model.ode``) for sampling, e.g. ``{rtol: 1.0e-3}``,
            ``{sample_eps: 1.0e-3}`` or ``{method: rk4, step_size: 0.01}`` (a fixed-step method's samples
            do not depend on the batch composition at all). Default: the model's options.
        seed: base seed; sample i starts from x_T drawn with a generator seeded (seed, 'fid', i).
        png_dir: also write every sample as ``{png_dir}/{i:06d}.png`` (a shared file system
            across nodes), e.g. for ``torch_fidelity.calculate_metrics(input1=png_dir, ...)``.
        feature_module: a custom extractor mapping uint8 [N, 3, H, W] to [N, d] (tests, other
            metrics). With it, neither the Inception weights nor torch-fidelity are needed.
        denoise: finish sampling with one Tweedie denoising step.
        grid_size: number of samples in the TensorBoard grid ``test/samples`` (0: none).
        results_path: JSON record written by rank 0 (default ``<log_dir>/fid.json``).

    After a test run, ``self.results`` holds ``fid``, ``n``, ``n_real``, ``extractor``,
    ``reference``, ``nfe`` and ``seconds``; ``self.real_stats_computed`` counts how many times
    the real statistics were computed (not read from the cache).
    """

    def __init__(
        self,
        num_samples: int = PAPER_N,
        batch_size: int = 250,
        feature_extractor_weights_path: str | None = None,
        feature: int = 2048,
        real_stats_cache: str | None = "fid_stats/cifar10_train.pt",
        ode: dict | None = None,
        seed: int = 0,
        png_dir: str | None = None,
        feature_module: nn.Module | None = None,
        denoise: bool = False,
        grid_size: int = 64,
        results_path: str | None = None,
    ):
        super().__init__()
        for name, value in (("num_samples", num_samples), ("batch_size", batch_size)):
            if int(value) < 1:
                raise ValueError(f"FIDCallback.{name} must be >= 1, got {value!r}")
        if int(num_samples) < 2:
            raise ValueError("FIDCallback.num_samples must be >= 2 (a covariance needs two samples)")
        if feature_module is None and feature not in (64, 192, 768, 2048):
            raise ValueError(f"FIDCallback.feature must be one of 64, 192, 768, 2048, got {feature!r}")
        self.ode = dict(ode or {})
        ODEOptions().replace(**self.ode)  # unknown keys or bad values fail here
        self.num_samples, self.batch_size = int(num_samples), int(batch_size)
        self.weights_path, self.feature = feature_extractor_weights_path, feature
        self.real_stats_cache, self.png_dir, self.seed = real_stats_cache, png_dir, int(seed)
        self.denoise = denoise
        self.feature_module = feature_module
        self.grid_size, self.results_path = int(grid_size), results_path
        self.results: dict = {}
        self.real_stats_computed = 0

    # -- hooks ----------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "test" and self.feature_module is None:
            inception_weights_file(self.weights_path)  # fail before any expensive work

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.num_samples < PAPER_N:
            rank_zero_warn(
                f"FID with N={self.num_samples} < {PAPER_N} samples is biased upwards and not comparable to "
                "published CIFAR-10 numbers (50 000 samples vs training-set statistics); use it for monitoring only"
            )
        with torch.no_grad():
            fid = self.evaluate(trainer, pl_module)
        pl_module.log("test/fid", fid, sync_dist=True)  # the same value on every rank
        pl_module.log("test/fid_n", float(self.num_samples), sync_dist=True)

    # -- the metric -----------------------------------------------------------------------------
    def extractor_key(self) -> str:
        """Describes the feature extractor (and its weights) that the real statistics belong to."""
        if self.feature_module is not None:
            m = self.feature_module
            name = getattr(m, "fid_key", None) or f"{type(m).__module__}.{type(m).__qualname__}"
            return f"custom:{name}:params={module_digest(m)}"
        weights = inception_weights_file(self.weights_path)
        return f"torch-fidelity:inception-v3-compat:feature={self.feature}:weights_sha256={file_digest(weights)}"

    def make_metric(self, image_shape: tuple, device) -> nn.Module:
        from torchmetrics.image.fid import FrechetInceptionDistance

        if self.feature_module is not None:
            metric = FrechetInceptionDistance(feature=self.feature_module, reset_real_features=False,
                                              input_img_size=tuple(image_shape))
        else:
            weights = inception_weights_file(self.weights_path)
            metric = FrechetInceptionDistance(feature=self.feature, reset_real_features=False,
                                              feature_extractor_weights_path=str(weights))
        return metric.to(device)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        """Sample, update the metric on every rank, compute (synced). Returns the same FID on every rank."""
        start = time.perf_counter()
        dm = trainer.datamodule
        spec = describe(dm)
        image_shape = tuple(spec.shape or ())
        if not spec.is_image:
            raise ValueError("FIDCallback needs image data: the data module's data_spec() must give an image "
                             "shape (C, H, W)")
        world, rank, device = max(int(trainer.world_size), 1), int(trainer.global_rank), pl_module.device
        if self.num_samples < world:
            raise ValueError(f"FIDCallback.num_samples={self.num_samples} must be >= the number of ranks ({world})")
        centered = spec.centered
        ode = pl_module.ode.replace(**self.ode)
        metric = self.make_metric(image_shape, device)
        key = self.extractor_key()
        real = _real_images(spec)
        data_key = f"n={len(real)}:shape={tuple(real.shape[1:])}:sha256={tensor_digest(real)}"
        self._real_stats(trainer, metric, real, key, data_key)
        shard = shard_indices(self.num_samples, world, rank)
        grid, nfes = self._generate(trainer, pl_module, metric, image_shape, centered, shard, ode)
        fid = float(metric.compute())  # every rank: sum-allreduce of the feature statistics
        n_real = len(real)
        nfe = trainer.strategy.reduce(torch.tensor([float(sum(nfes)), float(len(nfes))], dtype=torch.float64,
                                                   device=device), reduce_op="sum")
        self.results = {
            "fid": fid, "n": self.num_samples, "n_real": n_real, "extractor": key,
            "reference": f"{spec.name or type(dm).__name__} train ({data_key})", "nfe": float(nfe[0] / nfe[1].clamp_min(1)),
            "seconds": time.perf_counter() - start, "world_size": world, "ode": ode.as_dict(), "seed": self.seed, "comparable_to_papers": self.num_samples >= PAPER_N,
        }
        # trainer.log_dir broadcasts: every rank must ask (never inside a rank-zero-only branch)
        log_dir = trainer.log_dir if self.results_path is None else None
        if trainer.is_global_zero:
            if grid is not None:
                for logger in _tensorboards(trainer):
                    logger.experiment.add_image("test/samples", grid, global_step=trainer.global_step)
            out = Path(self.results_path or Path(log_dir or trainer.default_root_dir or ".") / "fid.json")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(self.results, indent=2))
            rank_zero_info(f"FID {fid:.3f} with N={self.num_samples} samples vs {self.results['reference']} "
                           f"({key}); mean NFE {self.results['nfe']:.0f}, {self.results['seconds']:.1f} s")
        del metric
        return fid

    def _generate(self, trainer, pl_module, metric, image_shape, centered: bool, shard: range, ode):
        """Sample this rank's indices, update the metric, write PNGs; (grid or None, NFE per solve)."""
        device, nfes, keep = pl_module.device, [], []
        png = Path(self.png_dir) if self.png_dir else None
        if png is not None:
            png.mkdir(parents=True, exist_ok=True)
        nonfinite = 0
        for lo in range(0, len(shard), self.batch_size):
            ids = shard[lo:lo + self.batch_size]
            x_T = seeded_prior(pl_module.sde, ids, image_shape, self.seed, "fid", device=device)
            out = pl_module.sample(x_T, ode, denoise=self.denoise)
            x = out.x
            nfes.append(out.nfe)
            nonfinite += int((~torch.isfinite(x.flatten(1)).all(1)).sum())
            u8 = model_to_bytes(x, centered)
            metric.update(u8, real=False)
            if png is not None:
                write_pngs(u8, ids, png)
            have = sum(len(k) for k in keep)
            if trainer.is_global_zero and have < self.grid_size:
                keep.append(x[: self.grid_size - have].cpu())
        if nonfinite:
            rank_zero_warn(f"FIDCallback: {nonfinite} sample(s) on rank {trainer.global_rank} had NaN/Inf pixels (set to 0)")
        grid = None
        if trainer.is_global_zero and self.grid_size > 0 and keep:
            samples = torch.cat(keep)[: self.grid_size]
            grid = image_grid(samples, centered, nrow=max(1, math.ceil(math.sqrt(len(samples)))))
        return grid, nfes

    # -- real statistics ------------------------------------------------------------------------
    def _real_stats(self, trainer, metric, real: Tensor, key: str, data_key: str) -> None:
        """Put the real images' feature statistics into ``metric``: from the cache (decided on rank 0 and
        broadcast, so all ranks take the same branch; loaded on rank 0 only) or computed sharded over
        the ranks and cached by rank 0."""
        cached = self._load_cache(key, data_key) if trainer.is_global_zero else None
        if trainer.strategy.broadcast(cached is not None, src=0):
            if cached is not None:
                metric.load_state_dict({k: v.to(metric.device) for k, v in cached.items()}, strict=False)
            return
        self.real_stats_computed += 1
        shard = shard_indices(len(real), max(int(trainer.world_size), 1), int(trainer.global_rank))
        for lo in range(0, len(shard), self.batch_size):
            metric.update(real[shard[lo:lo + self.batch_size]].to(metric.device), real=True)
        if self.real_stats_cache:
            with metric.sync_context():  # every rank joins the sum; rank 0 writes it
                if trainer.is_global_zero:
                    path = Path(self.real_stats_cache)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_suffix(path.suffix + ".tmp")
                    state = {k: v.detach().cpu() for k, v in metric.metric_state.items()}
                    torch.save({"state": state, "n": len(real), "key": key, "data": data_key}, tmp)
                    os.replace(tmp, path)
                    rank_zero_info(f"FID: wrote real statistics (n={len(real)}) to {path}")

    def _load_cache(self, key: str, data_key: str) -> dict | None:
        """The cached metric state if the file exists and matches the extractor and the data, else None."""
        if not self.real_stats_cache or not Path(self.real_stats_cache).is_file():
            return None
        try:
            obj = torch.load(self.real_stats_cache, map_location="cpu", weights_only=True)
        except Exception as err:  # unreadable: recompute and overwrite
            rank_zero_warn(f"FID: cannot read {self.real_stats_cache} ({err}); recomputing the real statistics")
            return None
        if not isinstance(obj, dict) or obj.get("key") != key or obj.get("data") != data_key or "state" not in obj:
            rank_zero_warn(f"FID: {self.real_stats_cache} was computed with another extractor or other data "
                           f"({obj.get('key') if isinstance(obj, dict) else '?'}); recomputing")
            return None
        return obj["state"]


def _real_images(spec) -> Tensor:
    """The reference images (uint8 [N, C, H, W]) of the data spec: for CIFAR-10 all 50 000 training
    images (the standard protocol, including the images the data module holds out for validation)."""
    images = spec.reference_images() if spec.reference_images is not None else None
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"FIDCallback: the data ({spec.name}) provides no uint8 [N, C, H, W] reference images "
                         "(DataSpec.reference_images of the data module's data_spec())")
    return images


def _tensorboards(trainer) -> list:
    return [lg for lg in getattr(trainer, "loggers", []) if isinstance(lg, TensorBoardLogger)]
