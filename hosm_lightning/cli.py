"""LightningCLI: ``fit``/``validate``/``test`` plus the ``sample``, ``likelihood`` and ``diagnose`` subcommands.

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
from lightning.pytorch.callbacks import Checkpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from . import data as _data  # noqa: F401  (our DataModules must be imported for `--data` in --help)
from .checkpoint_io import AtomicCheckpointIO, saved_step
from .checkpoints import find_resume_point, verify_checkpoint
from .cli_console import HOSMParser, quiet_library_noise
from .core.settings import find_settings_error
from .lit.checkpointing import HOSMCheckpoint
from .lit.module import HOSMModule
from .lit.progress import HOSMProgressBar
from .lit.trainer import HOSMTrainer
from .results import write_results

__all__ = ["HOSMCLI", "main", "run_cli", "CONFIG_KEYS"]

#: where each settings object sits in the config: an error of ``HOSMObjective.lambda2`` is reported as
#: ``model.objective.lambda2``, the key the user typed
CONFIG_KEYS = {"HOSMObjective": "model.objective", "ODEOptions": "model.ode", "FitOptions": "model.fit",
               "EvalOptions": "model.evaluation"}


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


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def _default_callbacks_and_plugins(cfg) -> dict:
    """What every trainer gets unless its config names its own: the atomic checkpoint writer
    (``AtomicCheckpointIO``), a progress bar that also works in logs (``HOSMProgressBar``, when
    ``enable_progress_bar`` is on), and a resumable ``HOSMCheckpoint`` (when checkpointing is on)."""
    out, callbacks, plugins = {}, _as_list(cfg.get("callbacks")), _as_list(cfg.get("plugins"))
    extra = []
    if cfg.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
        extra.append(HOSMProgressBar())
    if cfg.get("enable_checkpointing") is not False and not any(isinstance(c, Checkpoint) for c in callbacks):
        extra.append(HOSMCheckpoint())
    if extra:
        out["callbacks"] = callbacks + extra
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        out["plugins"] = plugins + [AtomicCheckpointIO()]
    return out


class HOSMCLI(LightningCLI):
    """LightningCLI with ``sample`` and ``likelihood``; omegaconf parser mode (YAML interpolation).

    Checkpoints go to ``<trainer.default_root_dir>/checkpoints`` unless a ModelCheckpoint sets
    ``dirpath``: a fixed place (not inside a logger's ``version_N``) is what lets
    ``fit --ckpt_path last`` find the previous run's ``last.ckpt``. Every checkpoint given to a
    subcommand is checked by :func:`~hosm_lightning.checkpoints.verify_checkpoint` before
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
        kwargs.update(_default_callbacks_and_plugins(cfg))
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
        if ckpt == "last":  # the run's newest readable checkpoint, named explicitly for Lightning
            root = os.path.join(self.trainer.default_root_dir, "checkpoints")
            point = find_resume_point([cb.dirpath or root for cb in self.trainer.checkpoint_callbacks] or [root])
            if point is None:
                return  # Lightning says that there is nothing to resume and starts a new run
            if point.note:
                rank_zero_info(point.note)
            ckpt = self.config_init[self.subcommand]["ckpt_path"] = point.path
        verify_checkpoint(self.model, ckpt, for_resume=for_resume)

    def _refuse_finished_run(self) -> None:
        """Resuming a checkpoint at or past ``trainer.max_steps`` would end at once, training nothing."""
        ckpt, max_steps = self._ckpt_arg(), self.trainer.max_steps
        step = saved_step(ckpt) if ckpt not in (None, "last") and os.path.isfile(str(ckpt)) else None
        if step is not None and 0 < max_steps <= step:
            raise ValueError(f"{_show(ckpt)} is at step {step} and trainer.max_steps is {max_steps}: nothing is left "
                             f"to train; raise --trainer.max_steps above {step} to train on, or evaluate the "
                             "checkpoint with test / likelihood")

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
        self._refuse_finished_run()
        self._refuse_second_fresh_fit()
        n = self.trainer.num_sanity_val_steps
        if n and self.model.fit_options.val_likelihood and self.trainer.limit_val_batches != 0:
            rank_zero_info(f"sanity check: {n} validation batch(es) before step 1, with an exact ODE likelihood solve "
                           "(can take tens of seconds; trainer.num_sanity_val_steps=0 skips it)")

    def before_validate(self) -> None:
        self._default_checkpoint_dirs()
        self._verify_ckpt()

    before_likelihood = before_validate

    before_test = before_validate

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

    def after_test(self) -> None:
        """Writes the test likelihood (summary JSON, per-point values) to ``<run folder>/likelihood``."""
        files = []
        res = self.model.test_results
        if res is not None and self.trainer.is_global_zero:
            files = write_results(res, os.path.join(self.trainer.default_root_dir, "likelihood"))
        self._print_outputs([(f.name, str(f)) for f in files] + [("metrics (TensorBoard)", d) for d in
                                                                   self._tensorboard_dirs()])

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


def error_message(err: BaseException) -> str:
    """The one-line message of a user error; a bad settings field is named by its config key."""
    bad = find_settings_error(err)
    if bad is not None and bad.owner in CONFIG_KEYS:
        return f"{CONFIG_KEYS[bad.owner]}.{bad.field} {bad.problem}"
    return str(bad if bad is not None else err)


#: exit status of a run stopped by a signal, after its checkpoint is written: the shell's 128 + signal
#: number (SIGINT 2, SIGTERM 15), so wrappers tell an interrupted run from a finished (0) or failed one
EXIT_SIGINT, EXIT_SIGTERM = 130, 143


def _interrupted(signame: str, code: int) -> None:
    print(f"hosm-lightning: interrupted by {signame} (exit status {code})", file=sys.stderr)
    sys.exit(code)


def run_cli() -> None:
    """Console entry point: user errors (bad config values, missing data, wrong checkpoint)
    print one clear line instead of a traceback; set HOSM_DEBUG=1 to see the traceback.

    Exit status: 0 finished; 2 bad input; 130 interrupted by Ctrl-C (SIGINT) and 143 by SIGTERM,
    both after the interrupt checkpoint (``last.ckpt``) is on disk; 1 anything else.
    """
    try:
        main()
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        if os.environ.get("HOSM_DEBUG"):
            raise
        print(f"hosm-lightning: error: {error_message(err)}", file=sys.stderr)
        sys.exit(2)
    except SIGTERMException:  # Lightning's stop after SIGTERM (a SystemExit with status 0)
        _interrupted("SIGTERM", EXIT_SIGTERM)
    except KeyboardInterrupt:
        _interrupted("SIGINT", EXIT_SIGINT)
    except SystemExit as exit_:
        if isinstance(exit_.__context__, KeyboardInterrupt):  # Lightning's sys.exit(1) after its Ctrl-C shutdown
            _interrupted("SIGINT", EXIT_SIGINT)
        raise
