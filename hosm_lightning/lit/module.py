"""LightningModule: a score network trained with a staged 1st/2nd/3rd-order DSM objective.

total = dsm1 + lambda2 dsm2 + lambda3 dsm3 (batch means of the per-sample terms of
:func:`hosm_lightning.core.losses.dsm_losses`), with the order taken from the stage active at the
current optimizer step. Validation reports held-out DSM terms and, when enabled, the exact ODE
likelihood; test reports ``test/nll`` (nats, low-D data) or ``test/bpd`` (8-bit images).
The math lives in ``hosm_lightning.core``; this layer composes, weights and logs.
"""

from __future__ import annotations

import dataclasses
import functools

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
import torch
from torchmetrics import MeanMetric
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from ..core.likelihood import bits_per_dim, ode_log_likelihood
from ..core.losses import DSM2_FORMS, dsm_losses, resolve_divergence
from ..core.sde import SDE, VESDE
from ..core.seeding import make_generator
from ..nets.base import ScoreNet
from ..nets.score import ScoreModel
from .checkpoints import check_signature, init_from_checkpoint
from .stages import Stage, lr_factor, stage_at, validate_stages

__all__ = ["HOSMModule"]


def batch_tensor(batch) -> Tensor:
    """The data tensor of a batch (tensor, or (tensor, labels) tuple/list)."""
    return batch[0] if isinstance(batch, (list, tuple)) else batch


class HOSMModule(L.LightningModule):
    """Score-based diffusion ODE trained by high-order DSM (Lu et al. 2022).

    Args:
        net: the score network (``class_path``/``init_args``), a ``hosm_lightning.nets.ScoreNet``
            (ToyScoreNet, SmallConvNet, DDPMpp, NCSNpp); called as ``net(x, t)``.
        sde: forward SDE (default ``VESDE()``, the paper's toy setting).
        parameterization: 'eps' (s = -net/sigma) or 'score' (s = net).
        stages: schedule of DSM orders, e.g. ``[{order: 1, steps: 2000}, {order: 3}]``.
        lambda2: weight of the second-order term dsm2 (reference image code 1; toy code 0.5).
        lambda3: weight of the third-order term dsm3 (reference image code 1; toy code 0.1).
        eps: smallest training time (default: the SDE's, 1e-5 VE/VP, 1e-2 subVP).
        divergence: 'auto' | 'exact' | 'hutchinson' for the high-order derivatives.
        dsm2_form: terms of the second-order loss: 'both' (paper), 'frobenius' or 'trace'.
        probe_product: Hutchinson probes by 'jvp' (J v, forward mode, as the reference) or 'vjp'
            (Jᵀ v, reverse mode: faster on CPU, same optimum; see ``dsm_losses``).
        importance_sampling: t ~ p(t) ∝ g²/σ² (VP/subVP) instead of U(eps, T).
        optimizer: optimizer factory (LightningCLI ``class_path``), default Adam.
        warmup_steps: linear learning-rate warmup over this many optimizer steps.
        seed: base seed; each rank/step derives its own generator from (seed, rank, step).
        data_centered: image data scaled to [-1, 1] (True) or [0, 1] (False) for the model.
        val_likelihood: compute the exact ODE NLL (or bpd for images) in validation.
        test_likelihood: compute it in ``test_step`` (per-batch means; skipped automatically when a
            ``LikelihoodEvaluator`` callback does the exact, DDP-correct per-sample evaluation).
        likelihood_rtol: relative ODE solver tolerance of validation/test likelihoods (reference 1e-5).
        likelihood_atol: absolute ODE solver tolerance of validation/test likelihoods (reference 1e-5).
        check_finite_every: 0 turns the non-finite guard off; any positive value checks before every
            update that the gradient norm (after the DDP all-reduce, so every rank decides the same) is
            finite, and stops with the step, stage and term otherwise (one scalar host sync per step).
            No update is ever applied with NaN/Inf gradients, so no checkpoint holds NaN weights.
        init_from: start ``fit`` from these weights (our Lightning checkpoint or a score_sde_pytorch
            checkpoint): weights only, not the optimizer or step counter; ignored when resuming with
            ``--ckpt_path``.
        init_from_ema: take the checkpoint's EMA weights (True) or its raw weights.
        grad_norm_every: every this many steps, also log ``train/grad_norm_dsm1..3`` = ‖∇_θ dsm_k‖
            of each unweighted term before clipping (one extra backward pass per term; this rank's
            gradient, before the DDP all-reduce); 0 turns it off.
    """

    def __init__(
        self,
        net: ScoreNet,
        sde: SDE | None = None,
        parameterization: str = "eps",
        stages: list[Stage] | None = None,
        lambda2: float = 1.0,
        lambda3: float = 1.0,
        eps: float | None = None,
        divergence: str = "auto",
        dsm2_form: str = "both",
        probe_product: str = "jvp",
        importance_sampling: bool = False,
        optimizer: OptimizerCallable = torch.optim.Adam,
        warmup_steps: int = 0,
        seed: int = 0,
        data_centered: bool = True,
        val_likelihood: bool = True,
        test_likelihood: bool = True,
        likelihood_rtol: float = 1e-5,
        likelihood_atol: float = 1e-5,
        check_finite_every: int = 1,
        init_from: str | None = None,
        init_from_ema: bool = True,
        grad_norm_every: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["net", "sde", "optimizer"])
        self.sde = sde if sde is not None else VESDE()
        self.stages = validate_stages(stages if stages is not None else [Stage(order=1)])
        self.hparams["stages"] = [dataclasses.asdict(st) for st in self.stages]  # plain data: weights_only loads
        self.eps = self.sde.default_eps if eps is None else eps
        _check_config(self.eps, lambda2, lambda3, divergence, dsm2_form, warmup_steps, likelihood_rtol, likelihood_atol,
                      check_finite_every)
        if grad_norm_every < 0:
            raise ValueError(f"model.grad_norm_every must be >= 0, got {grad_norm_every!r}")
        self.grad_norm_every = int(grad_norm_every)
        _check_net(net, self.sde, parameterization, self.stages)
        self.score_model = ScoreModel(net, self.sde, parameterization)
        self.lambda2, self.lambda3 = float(lambda2), float(lambda3)
        self.divergence, self.dsm2_form, self.importance = divergence, dsm2_form, importance_sampling
        if probe_product not in ("jvp", "vjp"):
            raise ValueError(f"model.probe_product must be 'jvp' or 'vjp', got {probe_product!r}")
        self.probe_product = probe_product
        self.optimizer_factory, self.warmup_steps, self.seed = optimizer, warmup_steps, seed
        self.data_centered, self.val_likelihood, self.check_every = data_centered, val_likelihood, check_finite_every
        self.ode_kwargs = {"eps": self.eps, "rtol": likelihood_rtol, "atol": likelihood_atol}
        self.init_from, self.init_from_ema = init_from, init_from_ema
        self.test_likelihood = test_likelihood
        # Validation/test means as metrics: torchmetrics sums (value × batch size) and counts across
        # ranks, so uneven shards (each point once, no sampler padding) give the exact global mean.
        self.eval_means = nn.ModuleDict({f"{split}_{k}": MeanMetric() for split, keys in _EVAL_KEYS.items()
                                         for k in keys})

    # -- helpers --------------------------------------------------------------------------------
    @property
    def net(self) -> nn.Module:
        """The raw network (registered once, under ``score_model.net``)."""
        return self.score_model.net

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """The score s_theta(x, t)."""
        return self.score_model(x, t)

    def generator(self, *tag) -> torch.Generator:
        """Generator derived from (seed, global rank, *tag) on this module's device."""
        return make_generator(self.seed, self.global_rank, *tag, device=self.device)

    def current_stage(self) -> tuple[int, Stage]:
        return stage_at(self.stages, self.global_step)

    def to_model_range(self, x: Tensor) -> Tensor:
        """uint8 images → floats k/255 in [0, 1] or [-1, 1]; other data unchanged."""
        if x.dtype != torch.uint8:
            return x
        x = x.float() / 255
        return 2 * x - 1 if self.data_centered else x

    def _losses(self, x0: Tensor, order: int, generator, check_finite: bool = True,
                term_grad_norms: bool = False) -> dict[str, Tensor]:
        per_sample = dsm_losses(
            self.score_model, x0, self.sde, order=order, eps=self.eps, generator=generator,
            divergence=self.divergence, dsm2_form=self.dsm2_form, importance=self.importance,
            probe_product=self.probe_product, check_finite=check_finite,
        )
        means = {k: v.mean() for k, v in per_sample.items()}
        weights = {"dsm1": 1.0, "dsm2": self.lambda2, "dsm3": self.lambda3}
        means["loss"] = sum(weights[k] * means[k] for k in per_sample)
        if term_grad_norms:
            params = [p for p in self.parameters() if p.requires_grad]
            for k in per_sample:
                grads = torch.autograd.grad(means[k], params, retain_graph=True, allow_unused=True)
                norms = [g.detach().norm() for g in grads if g is not None]
                means[f"grad_norm_{k}"] = torch.stack(norms).norm() if norms else torch.zeros((), device=self.device)
        return means

    def log_likelihood(self, x: Tensor, generator=None) -> tuple[Tensor, dict]:
        """Exact ODE log-likelihood (nats) on the unwrapped score model (never the DDP wrapper)."""
        return ode_log_likelihood(self.score_model, self.sde, x, generator=generator, **self.ode_kwargs)

    def bits_per_dim(self, x: Tensor, generator=None) -> tuple[Tensor, dict]:
        """bits/dim of uint8 images with uniform dequantization."""
        fn = functools.partial(ode_log_likelihood, self.score_model, self.sde, generator=generator, **self.ode_kwargs)
        return bits_per_dim(fn, x, centered=self.data_centered, generator=generator)

    # -- setup checks ---------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if stage == "fit" and self.init_from and getattr(self._trainer, "ckpt_path", None) is None:
            fmt = init_from_checkpoint(self, self.init_from, ema=self.init_from_ema)
            rank_zero_info(f"initialised the network from {self.init_from} ({fmt} format, ema={self.init_from_ema})")
        data_dim, net_dim = getattr(dm, "dim", None), getattr(self.net, "dim", None)
        if data_dim is not None and net_dim is not None and data_dim != net_dim:
            raise ValueError(
                f"data dimension {data_dim} does not match the network dimension {net_dim}: "
                "set model.net.init_args.dim to the data's dimension"
            )
        centered = getattr(dm, "centered", None)
        if centered is not None and centered != self.data_centered:
            raise ValueError(
                f"data.init_args.centered={centered} but model.data_centered={self.data_centered}: "
                "set both to the same value"
            )

    def model_signature(self) -> dict:
        """What a checkpoint's weights mean: SDE and parameterisation (checked when loading)."""
        return {"sde": repr(self.sde), "parameterization": self.score_model.parameterization}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["hosm_signature"] = self.model_signature()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_signature(checkpoint, self.model_signature(), "the checkpoint")

    # -- training -------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> Tensor:
        x0 = self.to_model_range(batch_tensor(batch))
        idx, stage = self.current_stage()
        norms = self.grad_norm_every > 0 and self.global_step % self.grad_norm_every == 0
        # no finiteness check here: a per-rank raise would leave the other DDP ranks waiting in the
        # gradient all-reduce; non-finite values reach the (all-reduced) gradients and are caught in
        # on_before_optimizer_step on every rank at once
        out = self._losses(x0, stage.order, self.generator("train", self.global_step, batch_idx), check_finite=False,
                           term_grad_norms=norms)
        self._step_info = (idx, stage.order, {k: v.detach() for k, v in out.items() if k.startswith("dsm")},
                           torch.isfinite(x0).all())
        bs = x0.shape[0]
        for k, v in out.items():
            self.log(f"train/{k}", v.detach() if k != "loss" else v, batch_size=bs, prog_bar=k == "loss")
        self.log("train/order", float(stage.order), batch_size=bs)
        self.log("train/stage", float(idx), batch_size=bs)
        return out["loss"]

    def on_before_optimizer_step(self, optimizer) -> None:
        norms = [p.grad.detach().norm() for p in self.parameters() if p.grad is not None]
        if norms:
            total = torch.stack(norms).norm()
            self.log("train/grad_norm", total)
            if self.check_every > 0 and not bool(torch.isfinite(total)):
                raise FloatingPointError(self._non_finite_message())
        self.log("train/lr", optimizer.param_groups[0]["lr"])

    def _non_finite_message(self) -> str:
        idx, order, terms, x0_finite = getattr(self, "_step_info", (None, None, {}, torch.tensor(True)))
        bad = [k for k, v in terms.items() if not bool(torch.isfinite(v))]
        where = (f"term(s) {', '.join(bad)} are NaN/Inf" if bad else
                 "the training batch contains NaN/Inf" if not bool(x0_finite) else
                 "the loss terms of this rank are finite (a finite loss with non-finite gradients, or another "
                 "rank's batch)")
        return (f"non-finite gradients at step {self.global_step} (stage {idx}, order {order}): {where}. Training "
                "stopped before the update, so checkpoints already written keep finite weights; lower the learning "
                "rate, raise eps or check the data, then resume with --ckpt_path last.")

    def configure_optimizers(self):
        opt = self.optimizer_factory(self.parameters())
        if self.warmup_steps <= 0 and all(st.lr is None for st in self.stages):
            return opt
        base, stages, warm = opt.param_groups[0]["lr"], self.stages, self.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(stages, step, base, warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- evaluation -----------------------------------------------------------------------------
    def validation_step(self, batch, batch_idx: int) -> None:
        x = batch_tensor(batch)
        xm = self.to_model_range(x)
        bs = x.shape[0]
        order = self.current_stage()[1].order  # the objective being trained right now
        with torch.inference_mode(False), torch.enable_grad():
            out = self._losses(xm.clone(), order, self.generator("val", batch_idx))
        for k, v in out.items():
            self._log_mean("val", k, v.detach(), bs)
        if self.val_likelihood:
            self._log_likelihood("val", x, self.generator("val-ll", batch_idx))

    def test_step(self, batch, batch_idx: int) -> None:
        callbacks = self.trainer.callbacks if self._trainer is not None else []
        if not self.test_likelihood or any(getattr(cb, "computes_test_likelihood", False) for cb in callbacks):
            return None  # the evaluator callback does it (each sample once, across ranks)
        self._log_likelihood("test", batch_tensor(batch), self.generator("test", batch_idx))

    def _log_mean(self, split: str, key: str, value: Tensor, batch_size: int) -> None:
        """Log the exact mean over all points of the epoch and all ranks (weights = batch sizes)."""
        metric = self.eval_means[f"{split}_{key}"]
        metric.update(value.detach().float(), weight=float(batch_size))
        self.log(f"{split}/{key}", metric, on_step=False, on_epoch=True, batch_size=batch_size)

    def _log_likelihood(self, split: str, x: Tensor, generator) -> None:
        bs = x.shape[0]
        with torch.inference_mode(False):
            x = x.clone()
            if x.dtype == torch.uint8:
                bpd, info = self.bits_per_dim(x, generator)
                self._log_mean(split, "bpd", bpd.mean(), bs)
            else:
                logp, info = self.log_likelihood(x, generator)
                nll = -logp.mean()
                self._log_mean(split, "nll", nll, bs)
                entropy = getattr(getattr(self.trainer, "datamodule", None), "entropy", None)
                if entropy is not None:
                    self._log_mean(split, "nll_gap", nll - entropy, bs)
        self._log_mean(split, "nfe", torch.tensor(float(info["nfe"]), device=x.device), bs)


#: metrics of validation_step / test_step (see HOSMModule._log_mean)
_EVAL_KEYS = {"val": ("dsm1", "dsm2", "dsm3", "loss", "nll", "nll_gap", "bpd", "nfe"),
              "test": ("nll", "nll_gap", "bpd", "nfe")}


def _check_net(net: nn.Module, sde: SDE, parameterization: str, stages: list[Stage]) -> None:
    """Network/SDE/objective combinations that would silently train the wrong thing."""
    if getattr(net, "scale_by_sigma", False) and parameterization != "score":
        raise ValueError(
            f"{type(net).__name__} divides its output by sigma and returns the score: set "
            f"model.parameterization: score (got {parameterization!r})"
        )
    for name in ("sigma_min", "sigma_max"):
        if hasattr(net, name) and hasattr(sde, name) and abs(getattr(net, name) - getattr(sde, name)) > 1e-12:
            raise ValueError(
                f"model.net.init_args.{name}={getattr(net, name)} differs from the SDE's {name}="
                f"{getattr(sde, name)}: set both to the same value"
            )
    if getattr(net, "checkpoint_blocks", False) and any(st.order > 1 for st in stages):
        raise ValueError(
            "model.net.init_args.checkpoint_blocks=true works for first-order DSM only (activation "
            "checkpointing does not replay forward-mode JVPs); use gradient accumulation "
            "(trainer.accumulate_grad_batches) to fit orders 2 and 3 in memory"
        )


def _check_config(eps, lambda2, lambda3, divergence, dsm2_form, warmup_steps, rtol, atol, check_every) -> None:
    if not (0.0 < eps < 1.0):
        raise ValueError(f"model.eps must lie in (0, 1), got {eps!r}")
    for name, lam in (("lambda2", lambda2), ("lambda3", lambda3)):
        if lam < 0:
            raise ValueError(f"model.{name} must be >= 0, got {lam!r}")
    resolve_divergence(divergence, 1)
    if dsm2_form not in DSM2_FORMS:
        raise ValueError(f"model.dsm2_form must be one of {DSM2_FORMS}, got {dsm2_form!r}")
    if check_every < 0:
        raise ValueError(f"model.check_finite_every must be >= 0, got {check_every!r}")
    if warmup_steps < 0:
        raise ValueError(f"model.warmup_steps must be >= 0, got {warmup_steps!r}")
    if not (rtol > 0 and atol > 0):
        raise ValueError("model.likelihood_rtol and likelihood_atol must be positive")
