"""LightningCLI: ``fit``/``validate``/``test`` plus ``sample`` and ``likelihood`` subcommands.

    python cli.py fit --config configs/mog1d.yaml
    python cli.py test --config configs/mog1d.yaml --ckpt_path runs/mog1d/checkpoints/last.ckpt
    python cli.py sample --config configs/mog1d.yaml --ckpt_path runs/mog1d/checkpoints/last.ckpt --num_samples 5000
    python cli.py likelihood --config configs/mog1d.yaml --ckpt_path runs/mog1d/checkpoints/last.ckpt --split test

Custom subcommands are methods of :class:`~hosm_lightning.lit.trainer.HOSMTrainer`; their arguments
become CLI flags. Parse errors and library noise: ``cli_console.py``.

Run layout: ``trainer.default_root_dir`` (e.g. ``runs/mog1d``) holds everything of a run:
``checkpoints/``, the TensorBoard events, ``hparams.yaml`` and ``config.yaml`` (written by ``fit``),
``plots/``, ``samples/`` and ``likelihood/``. Without a ``trainer.logger`` in the config the CLI
creates a TensorBoard logger writing straight into that folder (no ``version_N``; ``test`` and
``validate`` add their metrics to the same event files). A fresh ``fit`` refuses a folder that
already holds checkpoints (resume it with ``--ckpt_path last`` or pick another folder). Every
command ends by printing where its outputs are.
"""

from __future__ import annotations

import os
import sys

import lightning as L
import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from . import data as _data  # noqa: F401  (our DataModules must be imported for `--data` in --help)
from .cli_console import HOSMParser, quiet_library_noise
from .lit.checkpoints import load_weights, verify_checkpoint
from .lit.evaluation import LikelihoodEvaluator
from .lit.fid import FIDCallback
from .lit.module import HOSMModule
from .lit.trainer import HOSMTrainer, print_likelihood_table as _print_table  # noqa: F401  (re-exported)

__all__ = ["HOSMTrainer", "HOSMCLI", "main", "run_cli", "load_weights"]


class _SaveFitConfig(SaveConfigCallback):
    """config.yaml of the run, written by ``fit`` only (evaluations do not overwrite the training config)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            super().setup(trainer, pl_module, stage)


def _show(path) -> str:
    """A path as the user typed it: relative to the working directory when inside it."""
    path = os.path.normpath(str(path))
    rel = os.path.relpath(path) if os.path.isabs(path) else path
    return rel if not rel.startswith("..") else path


class HOSMCLI(LightningCLI):
    """LightningCLI with ``sample`` and ``likelihood``; omegaconf parser mode (YAML interpolation).

    Checkpoints go to ``<trainer.default_root_dir>/checkpoints`` unless a ModelCheckpoint sets
    ``dirpath``: a fixed place (not inside a logger's ``version_N``) is what lets
    ``fit --ckpt_path last`` find the previous run's ``last.ckpt``. Every checkpoint given to a
    subcommand is checked by :func:`~hosm_lightning.lit.checkpoints.verify_checkpoint` before
    Lightning reads it (one-line errors naming the file and the mismatch).
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

    def init_parser(self, **kwargs) -> LightningArgumentParser:
        self.parser_class = HOSMParser
        return super().init_parser(**kwargs)

    def instantiate_classes(self) -> None:
        """The default TensorBoard logger (``save_dir: ''``) writes into ``trainer.default_root_dir``.

        The folder is filled in for instantiation only: config.yaml keeps ``''``, so a run started
        from a saved config with another ``--trainer.default_root_dir`` logs there, not to the old run.
        """
        cfg = self.config.get(self.subcommand) if self.subcommand else self.config
        logger = (cfg.get("trainer") or {}).get("logger") if cfg is not None else None
        derive = (hasattr(logger, "class_path") and str(logger.class_path).endswith("TensorBoardLogger")
                  and logger.get("init_args") is not None and logger.init_args.get("save_dir") in ("", None))
        if derive:
            logger.init_args.save_dir = cfg.trainer.get("default_root_dir") or os.getcwd()
        try:
            super().instantiate_classes()
        finally:
            if derive:
                logger.init_args.save_dir = ""

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        """``trainer.logger: true``: TensorBoard writes into ``trainer.default_root_dir`` itself."""
        # explicit checkpoint paths are checked before the Trainer prints anything ("last": in before_fit)
        self._verify_ckpt(for_resume=self.subcommand == "fit", last=False)
        cfg = self._get(self.config_init, "trainer", default={}) or {}
        if cfg.get("logger") in (None, True) and "logger" not in kwargs:
            root = cfg.get("default_root_dir") or os.getcwd()
            kwargs["logger"] = TensorBoardLogger(save_dir=root, name="", version="", default_hp_metric=False)
        return super().instantiate_trainer(**kwargs)

    # -- checkpoints: one check before anything reads them ---------------------------------------
    def _ckpt_arg(self):
        return (self.config_init.get(self.subcommand) or {}).get("ckpt_path") if self.subcommand else None

    def _verify_ckpt(self, for_resume: bool = False, last: bool = True) -> None:
        ckpt = self._ckpt_arg()
        if ckpt is None or ckpt in ("best", "hpc", "registry") or str(ckpt).startswith("registry:"):
            return
        if ckpt == "last" and not last:
            return
        if ckpt != "last" and last:
            return  # checked already in instantiate_trainer
        if ckpt == "last":
            found = []
            for cb in self.trainer.checkpoint_callbacks:
                if cb.dirpath and os.path.isdir(cb.dirpath):
                    found += [os.path.join(cb.dirpath, f) for f in os.listdir(cb.dirpath)
                              if f.startswith("last") and f.endswith(".ckpt")]
            if not found:
                return  # Lightning says that there is nothing to resume and starts a new run
            ckpt = max(found, key=os.path.getmtime)
        verify_checkpoint(self.model, ckpt, for_resume=for_resume)

    def _refuse_second_fresh_fit(self) -> None:
        """A fresh fit into a folder with checkpoints would write last-v1.ckpt beside the old run."""
        if self._ckpt_arg() is not None:
            return
        for cb in self.trainer.checkpoint_callbacks:
            if cb.dirpath and os.path.isdir(cb.dirpath):
                old = sorted(f for f in os.listdir(cb.dirpath) if f.endswith(".ckpt"))
                if old:
                    shown = ", ".join(old[:3]) + (", ..." if len(old) > 3 else "")
                    raise ValueError(
                        f"{_show(cb.dirpath)} already holds checkpoints of an earlier run ({shown}): resume it with "
                        "--ckpt_path last, or start a new run in another folder with --trainer.default_root_dir "
                        f"(or delete {_show(cb.dirpath)})"
                    )

    def before_fit(self) -> None:
        self._default_checkpoint_dirs()
        self._verify_ckpt(for_resume=True)
        self._refuse_second_fresh_fit()
        n = self.trainer.num_sanity_val_steps
        if n and self.model.fit_options.val_likelihood and self.trainer.limit_val_batches != 0:
            rank_zero_info(f"sanity check: {n} validation batch(es) before step 1, with an exact ODE likelihood solve "
                           "(can take tens of seconds; trainer.num_sanity_val_steps=0 skips it)")

    def before_validate(self) -> None:
        self._default_checkpoint_dirs()
        self._verify_ckpt()

    before_likelihood = before_validate

    def before_test(self) -> None:
        """``test`` without a configured evaluator still reports the exact NLL / bits/dim (the module's
        test_step computes nothing: whole-split metrics come from callbacks)."""
        self.before_validate()
        if not self.trainer.likelihood_evaluators and not any(isinstance(cb, FIDCallback) for cb in self.trainer.callbacks):
            self.trainer.callbacks.append(LikelihoodEvaluator())

    def before_sample(self) -> None:
        self._verify_ckpt()

    # -- where the outputs are ------------------------------------------------------------------
    def _tensorboard_dirs(self) -> list[str]:
        dirs = []
        for lg in self.trainer.loggers:
            if isinstance(lg, TensorBoardLogger) and lg.log_dir and os.path.isdir(lg.log_dir):
                dirs.append(_show(lg.log_dir))
        return dirs

    def _print_outputs(self, lines: list[tuple[str, str]]) -> None:
        if not self.trainer.is_global_zero:
            return
        lines = [(label, path) for label, path in lines if path and os.path.exists(path)]
        if lines:
            width = max(len(label) for label, _ in lines)
            print("\noutputs:")
            for label, path in lines:
                print(f"  {label + ':':<{width + 1}} {_show(path)}")

    def after_fit(self) -> None:
        from .lit.callbacks import DensityPlotCallback

        lines = [("run folder", str(self.trainer.default_root_dir))]
        for cb in self.trainer.checkpoint_callbacks:
            lines.append(("last checkpoint", cb.last_model_path))
            if cb.monitor:  # without a monitored metric "best" is merely the latest periodic checkpoint
                lines.append((f"best {cb.monitor}", cb.best_model_path))
        lines += [("TensorBoard", d) for d in self._tensorboard_dirs()]
        for cb in self.trainer.callbacks:
            if isinstance(cb, DensityPlotCallback):
                lines += [("density plot", cb.last_density_path), ("samples plot", cb.last_samples_path)]
        self._print_outputs(lines)
        if self.trainer.is_global_zero and self._tensorboard_dirs():
            print(f"  (view: tensorboard --logdir {self._tensorboard_dirs()[0]})")

    def after_validate(self) -> None:
        self._print_outputs([("metrics (TensorBoard)", d) for d in self._tensorboard_dirs()])

    after_test = after_validate

    def after_sample(self) -> None:
        out = getattr(self.trainer, "hosm_out_dir", None)
        if out is not None:
            self._print_outputs([("samples", str(out / "samples.npz")), ("samples plot", str(out / "samples.png"))])

    def after_likelihood(self) -> None:
        out = getattr(self.trainer, "hosm_out_dir", None)
        if out is not None:
            split = (self.config_init.get("likelihood") or {}).get("split", "test")
            self._print_outputs([(f.name, str(f)) for f in sorted(out.glob(f"{split}_*"))])

    def after_diagnose(self) -> None:
        out = getattr(self.trainer, "hosm_out_dir", None)
        if out is not None:
            self._print_outputs([("diagnostics", str(out / "diagnose.json")), ("figure", str(out / "diagnose.png"))])

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # `predict` is not offered: this project has no predict_step (use `likelihood` or `sample`).
        builtin = {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}
        return {
            **builtin,
            "sample": {"model", "datamodule"},
            "likelihood": {"model", "datamodule"},
            "diagnose": {"model", "datamodule"},
        }


#: The logger when a config names none: TensorBoard in trainer.default_root_dir itself (save_dir ''
#: is filled in by HOSMCLI.instantiate_classes), no version_N subfolder, no hp_metric placeholder.
DEFAULT_LOGGER = {
    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
    "init_args": {"save_dir": "", "name": "", "version": "", "default_hp_metric": False},
}


def main(args=None, run: bool = True) -> HOSMCLI:
    torch.set_float32_matmul_precision("high")
    quiet_library_noise()
    return HOSMCLI(
        HOSMModule,
        L.LightningDataModule,
        subclass_mode_data=True,
        trainer_class=HOSMTrainer,
        parser_kwargs={"parser_mode": "omegaconf"},
        trainer_defaults={"logger": DEFAULT_LOGGER},
        save_config_callback=_SaveFitConfig,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )


def run_cli() -> None:
    """Console entry point: user errors (bad config values, missing data, wrong checkpoint)
    print one clear line instead of a traceback; set HOSM_DEBUG=1 to see the traceback."""
    try:
        main()
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        if os.environ.get("HOSM_DEBUG"):
            raise
        print(f"hosm-lightning: error: {err}", file=sys.stderr)
        sys.exit(2)
