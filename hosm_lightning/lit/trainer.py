"""HOSMTrainer: Lightning's Trainer with the ``sample``, ``likelihood`` and ``diagnose`` subcommands.

LightningCLI turns each method's arguments into command-line flags (``python cli.py likelihood --help``).
Every subcommand goes through the module's one likelihood / sampling path with its ODE options;
``likelihood`` is ``test`` (the module's test loop) with its own options and a table.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L

from ..checkpoints import load_weights
from ..data.spec import describe
from ..results import print_likelihood_table, write_results
from ..sampling import draw_samples
from .module import HOSMModule
from .progress import HOSMProgressBar

__all__ = ["HOSMTrainer"]


class HOSMTrainer(L.Trainer):
    """Trainer with the ``sample``, ``likelihood`` and ``diagnose`` subcommands."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        #: the constructor's settings: ``likelihood`` runs its evaluation in a trainer of its own built from them
        self.init_kwargs = dict(kwargs)

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
        model, device = self._prepare(model, ckpt_path)
        return draw_samples(model, describe(datamodule), self._out_dir(out_dir, "samples"), num_samples=num_samples,
                            batch_size=batch_size, ode=model.ode.replace(rtol=rtol, atol=atol), seed=seed,
                            device=device, verbose=self.is_global_zero)

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
        Fisher divergence, KL integrand) of one or more checkpoints, on data with an exact density; on
        images, the paired DSM terms dsm1–3 per noise level against the first checkpoint (Hutchinson probes).

        Args:
            ckpt_path: the checkpoint to diagnose (its EMA weights).
            compare: more checkpoints drawn on the same figure (e.g. order 1, 1→2, 1→3).
            labels: one legend label per checkpoint (default: the file names).
            num_times: noise levels, equally spaced in log sigma(t) from eps to T.
            num_points: exact draws x_t ~ q_t per noise level (images: test images).
            identity_points: if > 0, also estimate both sides of the KL identity with this many points.
            rtol: ODE solver tolerance (rtol = atol) of the ODE-score solves (default: the model's ``ode``).
            seed: seed of the draws (the same points for every checkpoint).
            out_dir: output folder (default <trainer.default_root_dir>/diagnose).
        """
        from ..diagnose import run_diagnose

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
        num_repeats: int | None = None,
        max_samples: int | None = None,
        out_dir: str | None = None,
        dequantization: str | None = None,
        num_importance: int | None = None,
    ) -> dict:
        """Exact ODE NLL (nats) or bits/dim of every point of a split, each once across ranks (the module's
        test loop, ``model.evaluation`` with the options below); prints a table, writes JSON and per-point values.

        Args:
            ckpt_path: checkpoint to evaluate (its EMA weights); default: the model as configured.
            split: data split to evaluate: 'test' or 'val'.
            num_repeats: evaluations per point with fresh dequantization/probe noise (CIFAR-10 protocol: 5).
                Default: ``model.evaluation.num_repeats``.
            max_samples: evaluate only the points with index < this (default: all).
            out_dir: output folder (default <trainer.default_root_dir>/likelihood).
            dequantization: bits/dim protocol(s) for 8-bit data: 'uniform' (the paper's y = (k+u)/256),
                'truncated_normal' (or 'tn'; i-DODE's training-free truncated-normal dequantization at
                t = eps), or both, e.g. 'uniform,truncated_normal'. Default: ``model.evaluation.dequantization``.
            num_importance: K importance samples per point for the bits/dim bound (log-mean-exp over K
                draws; tighter as K grows, K times the cost). Default: ``model.evaluation.num_importance``.
        """
        if split not in ("val", "test"):
            raise ValueError(f"--split must be 'val' or 'test', got {split!r}")
        out = self._out_dir(out_dir, "likelihood")
        configured = model.evaluation
        if ckpt_path is not None:
            load_weights(model, ckpt_path)  # the checkpoint's state_dict: the EMA weights when averaging was on
        data = datamodule if split == "test" else _ValidationAsTest(datamodule)
        model.evaluation, model.test_split = configured.replace(
            num_repeats=num_repeats, max_samples=max_samples, dequantization=dequantization,
            num_importance=num_importance), split
        try:
            self._evaluation_trainer().test(model, datamodule=data, verbose=False)
        finally:
            model.evaluation, model.test_split = configured, "test"
        res = model.test_results
        if res is None:
            raise ValueError(f"the {split} split has no points to evaluate (max_samples={max_samples})")
        if self.is_global_zero:
            print_likelihood_table(res)
            write_results(res, out)
        return res

    def _evaluation_trainer(self) -> L.Trainer:
        """A trainer with this one's devices, strategy, precision and loggers, and no callbacks but the
        progress bar: the fit-time callbacks (weight averaging, plots, checkpoints, FID) take no part in
        the evaluation, and the checkpoint's ``state_dict`` (the EMA weights) is used."""
        keep = {k: v for k, v in self.init_kwargs.items() if k in _EVAL_TRAINER_KEYS}
        lg = logging.getLogger("lightning.pytorch.utilities.rank_zero")
        level = lg.level
        lg.setLevel(logging.WARNING)  # the device summary was printed once already
        try:
            bar = [HOSMProgressBar()] if keep.get("enable_progress_bar", True) is not False else []
            return L.Trainer(**keep, callbacks=bar, logger=self.loggers or False, enable_checkpointing=False,
                             enable_model_summary=False, default_root_dir=self.default_root_dir)
        finally:
            lg.setLevel(level)


class _ValidationAsTest(L.LightningDataModule):
    """A data module whose test split is another data module's validation split (``likelihood --split val``)."""

    def __init__(self, datamodule: L.LightningDataModule):
        super().__init__()
        self.inner = datamodule

    def setup(self, stage: str) -> None:
        self.inner.trainer = self.trainer  # its loaders shard by the trainer's ranks
        self.inner.setup("validate")

    def test_dataloader(self):
        return self.inner.val_dataloader()

    def data_spec(self):
        return describe(self.inner)


#: trainer settings the ``likelihood`` command's own evaluation trainer inherits
_EVAL_TRAINER_KEYS = ("accelerator", "strategy", "devices", "num_nodes", "precision", "enable_progress_bar", "plugins")
