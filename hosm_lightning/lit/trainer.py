"""HOSMTrainer: Lightning's Trainer with the ``sample``, ``likelihood`` and ``diagnose`` subcommands.

LightningCLI turns each method's arguments into command-line flags (``python cli.py likelihood --help``).
Every subcommand goes through the module's one likelihood / sampling path with its ODE options.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from tqdm.auto import tqdm

from ..core.likelihood import seeded_prior
from ..data.spec import describe
from .checkpoints import load_weights
from .evaluation import LikelihoodEvaluator
from .module import HOSMModule

__all__ = ["HOSMTrainer", "print_likelihood_table"]


class HOSMTrainer(L.Trainer):
    """Trainer with the ``sample``, ``likelihood`` and ``diagnose`` subcommands."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        #: the constructor's settings: ``likelihood`` runs its evaluation in a trainer of its own built from them
        self.init_kwargs = dict(kwargs)

    @property
    def likelihood_evaluators(self) -> list[LikelihoodEvaluator]:
        """The configured :class:`LikelihoodEvaluator` callbacks (as ``checkpoint_callbacks`` for checkpoints)."""
        return [cb for cb in self.callbacks if isinstance(cb, LikelihoodEvaluator)]

    def _prepare(self, model: HOSMModule, ckpt_path):
        if ckpt_path is not None:
            load_weights(model, ckpt_path)
        device = self.strategy.root_device
        return model.to(device).eval(), device

    def _out_dir(self, out_dir, name: str) -> Path:
        out = Path(out_dir) if out_dir else Path(self.default_root_dir) / name
        out.mkdir(parents=True, exist_ok=True)
        self.hosm_out_dir = out  # printed by HOSMCLI.after_<subcommand>
        return out

    def sample(
        self,
        model: HOSMModule,
        datamodule: L.LightningDataModule | None = None,
        ckpt_path: str | None = None,
        num_samples: int = 1000,
        batch_size: int = 1000,
        rtol: float | None = None,
        atol: float | None = None,
        seed: int = 0,
        out_dir: str | None = None,
    ) -> Path:
        """Draw probability-flow ODE samples; write samples.npz and a PNG (grid / histogram / scatter).

        Args:
            ckpt_path: checkpoint whose weights (the EMA weights when averaging was on) are sampled.
            num_samples: number of samples.
            batch_size: samples per ODE solve.
            rtol: relative tolerance of the ODE solver (default: the model's ``ode.rtol``).
            atol: absolute tolerance of the ODE solver (default: the model's ``ode.atol``).
            seed: seed of the prior draws (sample i starts from a draw seeded by (seed, i)).
            out_dir: output folder (default ``<trainer.default_root_dir>/samples``).
        """
        from .plots import image_grid, samples_figure, save_figure  # matplotlib only when needed

        if num_samples <= 0 or batch_size <= 0:
            raise ValueError("--num_samples and --batch_size must be positive")
        model, device = self._prepare(model, ckpt_path)
        spec = describe(datamodule)
        shape = tuple(spec.shape or (model.net.dim,))
        ode = model.ode.replace(rtol=rtol, atol=atol)
        chunks, nfes, start = [], [], time.perf_counter()
        for lo in tqdm(range(0, num_samples, batch_size), desc="sampling", unit="batch"):
            ids = range(lo, min(lo + batch_size, num_samples))
            x_T = seeded_prior(model.sde, ids, shape, seed, "sample", device=device)  # per-sample seeds
            x, info = model.sample(x_T, ode)
            chunks.append(x.cpu())
            nfes.append(info["nfe"])
        samples = torch.cat(chunks)
        out = self._out_dir(out_dir, "samples")
        np.savez(out / "samples.npz", samples=samples.numpy(), nfe=np.array(nfes))
        if len(shape) == 3:
            from matplotlib.image import imsave

            imsave(out / "samples.png", image_grid(samples[:64], spec.centered).permute(1, 2, 0).numpy())
        else:
            ref = spec.sample(num_samples) if spec.sample is not None else None
            save_figure(samples_figure(samples, ref), out / "samples.png")
        secs = time.perf_counter() - start
        if self.is_global_zero:
            print(f"{num_samples} samples (mean NFE {np.mean(nfes):.0f}, {secs:.1f} s)")
        return out

    def diagnose(
        self,
        model: HOSMModule,
        datamodule: L.LightningDataModule,
        ckpt_path: str | None = None,
        compare: list[str] | None = None,
        labels: list[str] | None = None,
        num_times: int = 12,
        num_points: int = 300,
        identity_points: int = 0,
        rtol: float | None = None,
        seed: int = 0,
        out_dir: str | None = None,
    ) -> dict:
        """Score diagnostics per noise level (first-order error, gap to the ODE model's own score, ODE
        Fisher divergence, KL integrand) of one or more checkpoints, on data with an exact density.

        Args:
            ckpt_path: the checkpoint to diagnose (its EMA weights).
            compare: more checkpoints drawn on the same figure (e.g. order 1, 1→2, 1→3).
            labels: one legend label per checkpoint (default: the file names).
            num_times: noise levels, equally spaced in log sigma(t) from eps to T.
            num_points: exact draws x_t ~ q_t per noise level.
            identity_points: if > 0, also estimate both sides of the KL identity with this many points.
            rtol: ODE solver tolerance (rtol = atol) of the ODE-score solves (default: the model's ``ode``).
            seed: seed of the draws (the same points for every checkpoint).
            out_dir: output folder (default <trainer.default_root_dir>/diagnose).
        """
        from .diagnose import run_diagnose

        ckpts = [c for c in [ckpt_path, *(compare or [])] if c]
        out = self._out_dir(out_dir, "diagnose")
        model = model.to("cpu")
        datamodule.setup("test")
        return run_diagnose(model, datamodule, ckpts, labels, num_times=num_times, num_points=num_points,
                            identity_points=identity_points, rtol=rtol, seed=seed, out=out,
                            loggers=self.loggers if self.is_global_zero else ())

    def likelihood(
        self,
        model: HOSMModule,
        datamodule: L.LightningDataModule,
        ckpt_path: str | None = None,
        split: str = "test",
        num_repeats: int = 1,
        max_samples: int | None = None,
        out_dir: str | None = None,
        dequantization: str | None = None,
        num_importance: int | None = None,
    ) -> dict:
        """Exact ODE NLL (nats) or bits/dim of a data split (per sample, each sample once across
        ranks, ``num_repeats`` fresh dequantization/probe draws); prints a table, writes JSON and
        per-sample values.

        Args:
            ckpt_path: checkpoint to evaluate (its EMA weights); default: the model as configured.
            split: data split to evaluate: 'test' or 'val'.
            num_repeats: evaluations per sample with fresh dequantization/probe noise (CIFAR-10 protocol: 5).
            max_samples: evaluate only the first this many samples of the split (default: all).
            out_dir: output folder (default <trainer.default_root_dir>/likelihood).
            dequantization: bits/dim protocol(s) for 8-bit data: 'uniform' (the paper's y = (k+u)/256),
                'truncated_normal' (alias 'tn'; i-DODE's training-free truncated-normal dequantization
                at t = eps), or both, e.g. 'uniform,truncated_normal'. The JSON records each protocol's
                mean, s.e. and NFE. Default: the configured LikelihoodEvaluator's, else 'uniform'.
            num_importance: K importance samples per datum for the bits/dim bound (log-mean-exp over K
                draws; tighter as K grows, K times the cost). Default: the configured evaluator's, else 1.
        """
        if split not in ("val", "test"):
            raise ValueError(f"--split must be 'val' or 'test', got {split!r}")
        if num_repeats <= 0:
            raise ValueError(f"--num_repeats must be positive, got {num_repeats}")
        out = self._out_dir(out_dir, "likelihood")
        conf = next(iter(self.likelihood_evaluators), None)
        if dequantization is None:
            dequantization = conf.protocols if conf is not None else "uniform"
        if num_importance is None:
            num_importance = conf.num_importance if conf is not None else 1
        evaluator = LikelihoodEvaluator(num_repeats=num_repeats, splits=[split], max_samples=max_samples,
                                        per_sample_path=str(out / "{split}_per_sample.npz"), ode=conf.ode if conf else None,
                                        dequantization=dequantization, num_importance=num_importance)
        if ckpt_path is not None:
            load_weights(model, ckpt_path)  # the checkpoint's state_dict: the EMA weights when averaging was on
        self._evaluation_trainer(evaluator).test(model, datamodule=datamodule, verbose=False)
        res = {**evaluator.results[split], "entropy": describe(datamodule).entropy}
        if self.is_global_zero:
            print_likelihood_table(res)
            (out / f"{split}_{res['metric']}.json").write_text(json.dumps(res, indent=2))
        return res

    def _evaluation_trainer(self, evaluator: LikelihoodEvaluator) -> L.Trainer:
        """A trainer with this one's devices, strategy, precision and loggers whose only callback is
        ``evaluator``: the fit-time callbacks (weight averaging, plots, checkpoints, other evaluators)
        take no part in the evaluation, and the checkpoint's ``state_dict`` (the EMA weights) is used."""
        keep = {k: v for k, v in self.init_kwargs.items() if k in _EVAL_TRAINER_KEYS}
        lg = logging.getLogger("lightning.pytorch.utilities.rank_zero")
        level = lg.level
        lg.setLevel(logging.WARNING)  # the device summary was printed once already
        try:
            return L.Trainer(**keep, callbacks=[evaluator], logger=self.loggers or False, enable_checkpointing=False,
                             enable_model_summary=False, default_root_dir=self.default_root_dir)
        finally:
            lg.setLevel(level)


#: trainer settings the ``likelihood`` command's own evaluation trainer inherits
_EVAL_TRAINER_KEYS = ("accelerator", "strategy", "devices", "num_nodes", "precision", "enable_progress_bar", "plugins")


def print_likelihood_table(res: dict) -> None:
    """One row per protocol (bits/dim) or one row (NLL); KL = mean of log q0 − log p when known."""
    unit = "bits/dim" if res["metric"] == "bpd" else "nats"
    ent = res.get("entropy")
    ent_s = f"{ent:.4f}" if ent is not None else "n/a"
    kl = f"{res['kl']:.4f} ± {res['kl_se']:.4f}" if "kl" in res else "n/a"
    rows = [(p, e["num_importance"], e) for p, e in res.get("protocols", {}).items()] or [("-", "-", res)]
    print(f"\n| split | N | dequantization | K | {res['metric']} ({unit}) | ± s.e. | exact entropy | gap | KL (nats) | NFE | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for proto, k, e in rows:
        gap = f"{e['mean'] - ent:.4f}" if ent is not None else "n/a"
        print(f"| {res['split']} | {res['n']} | {proto} | {k} | {e['mean']:.4f} | {e['se']:.4f} | {ent_s} | {gap} | {kl} "
              f"| {e['nfe']:.0f} | {res['seconds']:.1f} |")
