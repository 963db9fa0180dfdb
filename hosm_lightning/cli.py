"""LightningCLI: ``fit``/``validate``/``test`` plus ``sample`` and ``likelihood`` subcommands.

    python cli.py fit --config configs/mog1d.yaml
    python cli.py test --config configs/mog1d.yaml --ckpt_path runs/mog1d/.../last.ckpt
    python cli.py sample --config configs/mog1d.yaml --ckpt_path ... --num_samples 5000
    python cli.py likelihood --config configs/mog1d.yaml --ckpt_path ... --split test

Custom subcommands are methods of :class:`HOSMTrainer`; their arguments become CLI flags.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.cli import LightningCLI
from tqdm.auto import tqdm

from .core.likelihood import ode_sample, seeded_prior
from .lit.checkpoints import load_weights
from .lit.evaluation import LikelihoodEvaluator
from .lit.module import HOSMModule

__all__ = ["HOSMTrainer", "HOSMCLI", "main", "run_cli", "load_weights"]


class HOSMTrainer(L.Trainer):
    """Trainer with the ``sample`` and ``likelihood`` subcommands."""

    def _prepare(self, model: HOSMModule, ckpt_path):
        if ckpt_path is not None:
            load_weights(model, ckpt_path)
        device = self.strategy.root_device
        return model.to(device).eval(), device

    def _out_dir(self, out_dir, name: str) -> Path:
        out = Path(out_dir) if out_dir else Path(self.default_root_dir) / name
        out.mkdir(parents=True, exist_ok=True)
        return out

    def sample(
        self,
        model: HOSMModule,
        datamodule: L.LightningDataModule | None = None,
        ckpt_path: str | None = None,
        num_samples: int = 1000,
        batch_size: int = 1000,
        rtol: float = 1e-5,
        atol: float = 1e-5,
        seed: int = 0,
        out_dir: str | None = None,
    ) -> Path:
        """Draw probability-flow ODE samples; write samples.npz and a PNG (grid / histogram / scatter)."""
        from .lit.plots import image_grid, samples_figure, save_figure  # matplotlib only when needed

        if num_samples <= 0 or batch_size <= 0:
            raise ValueError("--num_samples and --batch_size must be positive")
        model, device = self._prepare(model, ckpt_path)
        shape = tuple(getattr(datamodule, "image_shape", None) or (getattr(datamodule, "dim", None) or model.net.dim,))
        chunks, nfes, start = [], [], time.perf_counter()
        for lo in tqdm(range(0, num_samples, batch_size), desc="sampling", unit="batch"):
            ids = range(lo, min(lo + batch_size, num_samples))
            x_T = seeded_prior(model.sde, ids, shape, seed, "sample", device=device)  # per-sample seeds
            x, info = ode_sample(model.score_model, model.sde, x_T=x_T, rtol=rtol, atol=atol)
            chunks.append(x.cpu())
            nfes.append(info["nfe"])
        samples = torch.cat(chunks)
        out = self._out_dir(out_dir, "samples")
        np.savez(out / "samples.npz", samples=samples.numpy(), nfe=np.array(nfes))
        if len(shape) == 3:
            import torchvision

            torchvision.io.write_png(image_grid(samples[:64], model.data_centered), str(out / "samples.png"))
        else:
            data = getattr(datamodule, "mixture", None)
            ref = data.sample(num_samples) if data is not None else None
            save_figure(samples_figure(samples, ref), out / "samples.png")
        secs = time.perf_counter() - start
        print(f"wrote {num_samples} samples to {out}/samples.npz and samples.png (mean NFE {np.mean(nfes):.0f}, {secs:.1f} s)")
        return out

    def likelihood(
        self,
        model: HOSMModule,
        datamodule: L.LightningDataModule,
        ckpt_path: str | None = None,
        split: str = "test",
        num_repeats: int = 1,
        max_samples: int | None = None,
        out_dir: str | None = None,
    ) -> dict:
        """Exact ODE NLL (nats) or bits/dim of a data split (per sample, each sample once across
        ranks, ``num_repeats`` fresh dequantization/probe draws); prints a table, writes JSON and
        per-sample values."""
        if split not in ("val", "test"):
            raise ValueError(f"--split must be 'val' or 'test', got {split!r}")
        if num_repeats <= 0:
            raise ValueError(f"--num_repeats must be positive, got {num_repeats}")
        out = self._out_dir(out_dir, "likelihood")
        evaluator = LikelihoodEvaluator(num_repeats=num_repeats, splits=[split], max_samples=max_samples,
                                        per_sample_path=str(out / "{split}_per_sample.npz"))
        # Set aside configured evaluators (ours replaces them) and weight averaging: after a `fit` in
        # the same process, EMAWeightAveraging would load the checkpoint's *raw* weights
        # (current_model_state); without it the checkpoint's state_dict, the EMA weights, is used.
        configured = [cb for cb in self.callbacks
                      if getattr(cb, "computes_test_likelihood", False) or isinstance(cb, WeightAveraging)]
        self.callbacks[:] = [cb for cb in self.callbacks if cb not in configured] + [evaluator]
        try:
            self.test(model, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
        finally:
            self.callbacks[:] = [cb for cb in self.callbacks if cb is not evaluator] + configured
        res = {**evaluator.results[split], "entropy": getattr(datamodule, "entropy", None)}
        if self.is_global_zero:
            _print_table(res)
            (out / f"{split}_{res['metric']}.json").write_text(json.dumps(res, indent=2))
        return res


def _print_table(res: dict) -> None:
    unit = "bits/dim" if res["metric"] == "bpd" else "nats"
    print(f"\n| split | N | {res['metric']} ({unit}) | ± s.e. | exact entropy | gap | NFE | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    ent = res["entropy"]
    gap = f"{res['mean'] - ent:.4f}" if ent is not None else "n/a"
    ent_s = f"{ent:.4f}" if ent is not None else "n/a"
    print(f"| {res['split']} | {res['n']} | {res['mean']:.4f} | {res['se']:.4f} | {ent_s} | {gap} | {res['nfe']:.0f} | {res['seconds']:.1f} |")


class HOSMCLI(LightningCLI):
    """LightningCLI with ``sample`` and ``likelihood``; omegaconf parser mode (YAML interpolation).

    Checkpoints go to ``<trainer.default_root_dir>/checkpoints`` unless a ModelCheckpoint sets
    ``dirpath``: a fixed place (not inside the logger's ``version_N``) is what lets
    ``fit --ckpt_path last`` find the previous run's ``last.ckpt``.
    """

    # The configuration given on the command line is the source of truth. LightningCLI would merge
    # the checkpoint's saved hyper-parameters over it when --ckpt_path is given, silently undoing
    # e.g. `fit --ckpt_path last --model.stages ...`; a checkpoint that does not fit the configured
    # model (architecture, SDE, parameterisation) fails with a clear error instead.
    def _parse_ckpt_path(self) -> None:
        return None

    def _default_checkpoint_dirs(self) -> None:
        for cb in self.trainer.checkpoint_callbacks:
            if getattr(cb, "dirpath", None) is None:
                cb.dirpath = os.path.realpath(os.path.join(self.trainer.default_root_dir, "checkpoints"))

    before_fit = before_validate = before_test = before_likelihood = _default_checkpoint_dirs

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {
            **LightningCLI.subcommands(),
            "sample": {"model", "datamodule"},
            "likelihood": {"model", "datamodule"},
        }


def main(args=None, run: bool = True) -> HOSMCLI:
    torch.set_float32_matmul_precision("high")
    return HOSMCLI(
        HOSMModule,
        L.LightningDataModule,
        subclass_mode_data=True,
        trainer_class=HOSMTrainer,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )


def run_cli() -> None:
    """Console entry point: user errors (bad config values, missing data, wrong checkpoint)
    print one clear line instead of a traceback; set HOSM_DEBUG=1 to see the traceback."""
    import sys

    try:
        main()
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        if os.environ.get("HOSM_DEBUG"):
            raise
        print(f"hosm-lightning: error: {err}", file=sys.stderr)
        sys.exit(2)
