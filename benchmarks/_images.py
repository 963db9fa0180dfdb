"""The paper's protocol on real images, as reusable steps (used by ``real_images.py``).

* :data:`SETTINGS`: data module and DDPM++ settings of each data set at a width that fits two CPU cores;
* :func:`fit`: one Lightning ``fit`` of :class:`HOSMModule` (VP SDE, ε-prediction, Adam, clip 1, the
  project's EMA ``HOSMEMA`` with its decay warm-up),
  resumed from the run's ``last.ckpt`` when it has one, so an interrupted stage continues;
* :func:`bpd`: per-point bits/dim of a checkpoint's EMA weights on fixed images, every point's
  dequantization noise and Hutchinson probe seeded by its index exactly as in the test loop
  (lit/evaluation.py), so two models are compared *paired*: same points, same noise;
* :func:`samples`: ODE samples from the same prior draws for every model.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from hosm_lightning.checkpoints import load_weights
from hosm_lightning.core import VPSDE, HOSMObjective
from hosm_lightning.core.data_range import model_to_bytes
from hosm_lightning.core.ode import seeded_prior
from hosm_lightning.core.seeding import make_generator
from hosm_lightning.data import ImageDataModule
from hosm_lightning.lit.ema import HOSMEMA
from hosm_lightning.lit.module import HOSMModule
from hosm_lightning.nets import DDPMpp
from hosm_lightning.options import FitOptions

from ._protocol import quiet

__all__ = ["SETTINGS", "datamodule", "build_model", "fit", "load", "bpd", "samples", "Cache", "quiet"]

#: the photographs: training photographs, one validation and one test photograph (split by source)
PHOTOS = {"train": ["astronaut", "chelsea", "immunohistochemistry", "hubble_deep_field", "retina"],
          "val": ["rocket"], "test": ["coffee"]}

#: per data set: the data module, the network and the evaluation sizes
SETTINGS = {
    "digits": {
        "data": {"source": "digits", "val_fraction": 0.1, "test_fraction": 0.2, "random_crop": False,
                 "random_flip": False, "train_dequantization": "uniform"},
        "net": {"image_size": 8, "in_channels": 1, "nf": 16, "ch_mult": [1, 2], "num_res_blocks": 1,
                "attn_resolutions": [], "dropout": 0.0},
    },
    "photos": {
        "data": {"source": "photographs", "photos": PHOTOS["train"] + PHOTOS["val"] + PHOTOS["test"],
                 "patch_size": 16, "stride": 16, "val_sources": PHOTOS["val"], "test_sources": PHOTOS["test"],
                 "random_crop": True, "random_flip": True},
        "net": {"image_size": 16, "in_channels": 3, "nf": 16, "ch_mult": [1, 2, 2], "num_res_blocks": 1,
                "attn_resolutions": [], "dropout": 0.0},
        # an ODE solve costs ~2.5× the digits' per point: fewer points and steps keep the run in budget
        "budget": {"test_points": 128, "conv_points": 64, "k8_points": 32, "max_pre": 3000, "finetune": 250},
    },
    # the CIFAR-10 shape and network (configs/cifar10_vp_ddpmpp.yaml, 61.8 M parameters) on 3x32x32 photograph
    # patches: a GPU run at reduced steps (benchmarks/gpu_check.sh)
    "photos32": {
        "data": {"source": "photographs", "photos": PHOTOS["train"] + PHOTOS["val"] + PHOTOS["test"],
                 "patch_size": 32, "stride": 32, "val_sources": PHOTOS["val"], "test_sources": PHOTOS["test"],
                 "random_crop": True, "random_flip": True},
        "net": {"image_size": 32, "in_channels": 3, "nf": 128, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 4,
                "attn_resolutions": [16], "dropout": 0.1},
        "budget": {"test_points": 64, "conv_points": 32, "k8_points": 8, "min_pre": 600, "max_pre": 900,
                   "chunk": 300, "finetune": 60, "samples": 256, "batch": 64},
    },
}
#: the network of ``--quick`` runs: the data set's, this narrow
QUICK_NET = {"nf": 8, "num_res_blocks": 1, "attn_resolutions": [], "ch_mult": [1, 2]}


def net_settings(name: str, quick: bool = False) -> dict:
    return {**SETTINGS[name]["net"], **(QUICK_NET if quick else {})}


def datamodule(name: str, batch: int = 64, steps: int = 100, seed: int = 0) -> ImageDataModule:
    return ImageDataModule(**SETTINGS[name]["data"], batch_size=batch, eval_batch_size=256, steps_per_epoch=steps,
                           seed=seed)


#: first-order recipes of a pre-training, each with every fine-tune of it: the network's parameterisation and
#: the HOSMObjective fields that go with it (the ε-prediction with σ² weighting is the paper's)
BASES = {"sigma2": {"parameterization": "eps", "objective": {}},
         "velocity": {"parameterization": "velocity",
                      "objective": {"weighting": "likelihood", "time_proposal": "velocity"}}}


def build_model(name: str, order: int = 1, lr: float = 2e-4, warmup: int = 0, init_from: str | None = None,
                objective: dict | None = None, quick: bool = False, base: str = "sigma2") -> HOSMModule:
    """DDPM++ under the VP SDE in ``base``'s parameterisation; order-2/3 terms with Hutchinson probes and
    λ₂ = λ₃ = 1 (the paper's image objective), ``base``'s then ``objective``'s HOSMObjective fields over them."""
    settings = {"lambda2": 1.0, "lambda3": 1.0, "eps": 1e-5, "divergence": "hutchinson",
                **BASES[base]["objective"], **(objective or {})}
    return HOSMModule(
        net=DDPMpp(**net_settings(name, quick)), sde=VPSDE(), parameterization=BASES[base]["parameterization"],
        stages=[{"order": order}], objective=HOSMObjective(**settings),
        optimizer=lambda p: torch.optim.Adam(p, lr=lr),
        fit=FitOptions(warmup_steps=warmup, val_likelihood=False, check_finite_every=100, init_from=init_from),
    )


def fit(name: str, root: Path, *, steps: int, order: int = 1, lr: float = 2e-4, warmup: int = 0, ema: float = 0.999,
        batch: int = 64, init_from: str | None = None, save_every: int | None = None, device: str = "cpu",
        objective: dict | None = None, quick: bool = False, base: str = "sigma2") -> dict:
    """Train to ``steps`` (continuing the run's last.ckpt if there is one); {'ckpt': final, 'seconds': the
    training seconds of this folder so far, recorded in seconds.txt (so a cached stage reports its own)}."""
    root.mkdir(parents=True, exist_ok=True)
    final, record = root / "ckpt" / f"step{steps:06d}.ckpt", root / "seconds.txt"
    spent = float(record.read_text()) if record.is_file() else 0.0
    if final.is_file():
        return {"ckpt": final, "seconds": spent}
    dm = datamodule(name, batch)
    torch.manual_seed(0)  # the network's initial weights (a fine-tune loads init_from over them)
    model = build_model(name, order, lr, warmup, init_from, objective, quick=quick, base=base)
    last = root / "ckpt" / "last.ckpt"
    trainer = L.Trainer(
        max_steps=steps, accelerator=device, devices=1, gradient_clip_val=1.0, default_root_dir=str(root), logger=False,
        callbacks=[HOSMEMA(decay=ema),
                   ModelCheckpoint(dirpath=str(root / "ckpt"), every_n_train_steps=save_every or steps, save_top_k=-1,
                                   save_last=True, filename="step{step:06d}", auto_insert_metric_name=False)],
        limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm, ckpt_path=str(last) if last.is_file() else None)
    if not final.is_file():
        raise RuntimeError(f"{root}: no checkpoint at step {steps}")
    spent = round(spent + time.perf_counter() - start, 1)
    record.write_text(f"{spent}")
    return {"ckpt": final, "seconds": spent}


def load(name: str, ckpt: Path, spec, device: str = "cpu", quick: bool = False, base: str = "sigma2") -> HOSMModule:
    """The EMA weights of ``ckpt`` (trained from ``base``) in evaluation mode on ``device``, with the data set's
    ``spec`` (levels, range)."""
    model = build_model(name, quick=quick, base=base)
    load_weights(model, ckpt)
    model.data_spec = spec
    return model.eval().to(device)


def bpd(model: HOSMModule, images: torch.Tensor, *, split: str, protocol: str = "uniform", k: int = 1, seed: int = 0,
        rtol: float = 1e-4, batch: int = 256) -> tuple[torch.Tensor, float]:
    """Per-point bits/dim [N] (float64) of uint8 ``images`` and the mean NFE per solve; point i's noise is
    seeded by (seed, 'likelihood', split, 0, i), as in ``test``."""
    ode, out, nfes = model.ode.replace(rtol=rtol, atol=rtol), [], []
    extra = () if protocol == "uniform" else ("tn",)
    for lo in range(0, len(images), batch):
        x = images[lo:lo + batch].to(model.device)
        gens = [make_generator(seed, "likelihood", split, 0, lo + i, *extra, device=model.device) for i in range(len(x))]
        bound, nfe = model.bits_per_dim(x, gens, protocol, k, ode)
        out.append(bound.bpd.detach().double().cpu())
        nfes.append(nfe / k)
    return torch.cat(out), sum(nfes) / len(nfes)


def samples(model: HOSMModule, n: int, *, seed: int = 0, rtol: float = 1e-4, batch: int = 256) -> torch.Tensor:
    """n ODE samples as uint8 levels [n, C, H, W]; sample i starts from the prior draw seeded by (seed, 'fid', i)."""
    spec, ode, out = model.data_spec, model.ode.replace(rtol=rtol, atol=rtol), []
    for lo in range(0, n, batch):
        x_T = seeded_prior(model.sde, range(lo, min(n, lo + batch)), spec.shape, seed, "fid", device=model.device)
        with torch.no_grad():
            x = model.sample(x_T, ode, denoise=True).x
        out.append(model_to_bytes(x, spec.centered, spec.levels).cpu())
    return torch.cat(out)


class Cache:
    """A JSON file of computed values (per-point lists) keyed by what they are: a rerun reuses them."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key: str, compute):
        if key not in self.data:
            self.data[key] = compute()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data))
            tmp.replace(self.path)
        return self.data[key]
