"""LightningCLI: ``fit``/``validate``/``test`` plus ``sample`` and ``likelihood`` subcommands.

    python cli.py fit --config configs/mog1d.yaml
    python cli.py test --config configs/mog1d.yaml --ckpt_path runs/mog1d/checkpoints/last.ckpt
    python cli.py sample --config configs/mog1d.yaml --ckpt_path runs/mog1d/checkpoints/last.ckpt --num_samples 5000
    python cli.py likelihood --config configs/mog1d.yaml --ckpt_path runs/mog1d/checkpoints/last.ckpt --split test

Custom subcommands are methods of :class:`HOSMTrainer`; their arguments become CLI flags.

Run layout: ``trainer.default_root_dir`` (e.g. ``runs/mog1d``) holds everything of a run:
``checkpoints/``, the TensorBoard events, ``hparams.yaml`` and ``config.yaml`` (written by ``fit``),
``plots/``, ``samples/`` and ``likelihood/``. Without a ``trainer.logger`` in the config the CLI
creates a TensorBoard logger writing straight into that folder (no ``version_N``; ``test`` and
``validate`` add their metrics to the same event files). A fresh ``fit`` refuses a folder that
already holds checkpoints (resume it with ``--ckpt_path last`` or pick another folder). Every
command ends by printing where its outputs are.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import json
import logging
import os
import re
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from tqdm.auto import tqdm

from . import data as _data  # noqa: F401  (our DataModules must be imported for `--data` in --help)
from .core.likelihood import seeded_prior
from .data.spec import describe
from .lit.checkpoints import load_weights, verify_checkpoint
from .lit.evaluation import LikelihoodEvaluator
from .lit.fid import FIDCallback
from .lit.module import HOSMModule

__all__ = ["HOSMTrainer", "HOSMCLI", "main", "run_cli", "load_weights"]


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
        from .lit.plots import image_grid, samples_figure, save_figure  # matplotlib only when needed

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
        from .lit.diagnose import run_diagnose

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
            _print_table(res)
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


def _print_table(res: dict) -> None:
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


# -- command-line hygiene: one-line parse errors, quiet libraries, outputs printed at the end ------
def _quiet_library_noise() -> None:
    """Silence the library messages that say nothing about the user's run (each by its exact text).

    - Lightning 2.6's pytree helper builds torch's deprecated ``LeafSpec`` on every fit (an
      incompatibility between the two libraries, not in this project's code);
    - torch's forward-mode AD decompositions call ``torch.jit.script`` the first time an order-2/3
      loss runs (torch's own code; it printed into the progress bar when a stage started);
    - Lightning's advertisement for its cloud logger.
    """
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    lg = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropTips) for f in lg.filters):
        lg.addFilter(_DropTips())


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("\U0001f4a1 Tip:")


def _close_matches(word: str, candidates) -> list[str]:
    return difflib.get_close_matches(word, sorted(set(candidates)), n=1, cutoff=0.6)


def _class_params(class_path: str) -> list[str]:
    try:
        module, _, name = class_path.rpartition(".")
        return list(inspect.signature(getattr(importlib.import_module(module), name)).parameters)
    except Exception:
        return []


def _is_settings(class_path: str) -> bool:
    """A settings dataclass (HOSMObjective, ODEOptions, FitOptions): nested keys without ``init_args``."""
    try:
        module, _, name = class_path.rpartition(".")
        return dataclasses.is_dataclass(getattr(importlib.import_module(module), name))
    except Exception:
        return False


def _one_line_parse_error(message: str, parser) -> str:
    """A jsonargparse error as one line, with a "did you mean" for a mistyped key."""
    prog = (getattr(parser, "prog", "") or "").replace(" [options]", "")
    hint = f" (`{prog} --help` lists the options)" if prog else ""
    dests = [a.dest for a in getattr(parser, "_actions", []) if getattr(a, "dest", None)]
    m = re.search(r"[Uu]nrecognized arguments: (\S+)", message)
    if m:
        key = m.group(1).lstrip("-").split("=")[0]
        match = _close_matches(key, dests)
        mean = f"; did you mean --{match[0]}?" if match else ""
        return f"unknown option --{key}{mean}{hint}"
    m = re.search(r"Subcommand '[\w.]+' does not accept (?:option|nested key) '([\w.]+)'", message)
    if m:
        key = m.group(1)
        match = _close_matches(key, dests)
        mean = f"; did you mean {match[0]}?" if match else ""
        return f"unknown key {key}{mean}{hint}"
    m = re.search(r"Group '([\w.]+)' does not accept (?:option|nested key) '([\w.]+)'", message)
    if m:
        group, opt = m.groups()
        match = _close_matches(opt, [d[len(group) + 1:] for d in dests if d.startswith(group + ".")])
        mean = f"; did you mean {group}.{match[0]}?" if match else ""
        return f"unknown key {group}.{opt}{mean}{hint}"
    m = re.search(r"class_path '([\w.]+)':\s*(?:Key|Option) '([\w.]+)' is not (?:accepted|expected)", message)
    if m:
        class_path, opt = m.groups()
        keym = re.search(r'(?:Parser key|key) "([\w.]+)"', message)
        nested = ".init_args." if not _is_settings(class_path) else "."  # settings dataclasses have no init_args
        prefix = f"{keym.group(1)}{nested}" if keym else ("data.init_args." if "DataModule" in message else "")
        match = _close_matches(opt, _class_params(class_path))
        if any(arg.split("=")[0] == f"--{prefix}{opt}" for arg in sys.argv[1:]):  # typed on the command line
            mean = f"; did you mean --{prefix}{match[0]}?" if match else ""
            return f"unknown option --{prefix}{opt}{mean}{hint}"
        mean = f"; did you mean {prefix}{match[0]}?" if match else ""
        return f"unknown key {prefix}{opt} for {class_path.rsplit('.', 1)[-1]}{mean}{hint}"
    noise = ("Given value", "Subtypes:", "Errors:", "- Expected a <class 'NoneType'>")
    parts = [ln.strip() for ln in message.splitlines() if ln.strip() and not ln.strip().startswith(noise)]
    return " ".join(parts) + hint


class _HOSMParser(LightningArgumentParser):
    """Parse errors as one line ``hosm-lightning: error: ...`` (HOSM_DEBUG=1: jsonargparse's full output)."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error or os.environ.get("HOSM_DEBUG") or os.environ.get("JSONARGPARSE_DEBUG"):
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        sys.stderr.write(f"hosm-lightning: error: {_one_line_parse_error(message, parser)}\n")
        self.exit(2)


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
        self.parser_class = _HOSMParser
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
    _quiet_library_noise()
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
