"""LightningModule: a score network trained with a staged 1st/2nd/3rd-order DSM objective.

loss = dsm1 + λ₂ dsm2 + λ₃ dsm3 (docs/design.md (3.5)), computed by ``core.HOSMObjective`` with the
order of the stage active at the current optimizer step. Validation reports held-out DSM terms and,
when enabled, the exact ODE likelihood; ``test`` computes the exact likelihood of every test point
(``lit/evaluation.py``). The module owns the one likelihood path of the project
(:meth:`HOSMModule.log_likelihood` for model-space points, :meth:`HOSMModule.bits_per_dim` for 8-bit
data) and the one sampling path (:meth:`HOSMModule.sample`), all with the module's
:class:`ODEOptions`; validation, test, the plots, FID and the CLI call them.
The math lives in ``hosm_lightning.core``; this layer composes, weights and logs.
"""

from __future__ import annotations

import dataclasses

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import grad_norm, rank_zero_info
from torch import Tensor, nn
from torchmetrics import MeanMetric

from ..checkpoints import check_signature, init_from_checkpoint
from ..core.data_range import bytes_to_model
from ..core.dequantization import DequantizedBound, bits_per_dim
from ..core.objective import HOSMObjective
from ..core.ode import Likelihood, ODEOptions, Samples, ode_log_likelihood, ode_sample
from ..core.sde import SDE, VESDE
from ..core.seeding import make_generator
from ..core.stages import Stage, lr_factor, stage_at, validate_stages
from ..data.sharding import batch_index, batch_tensor
from ..data.spec import DataSpec, describe
from ..nets.base import ScoreNet
from ..nets.score import ScoreModel
from ..options import EvalOptions, FitOptions
from ..results import result_lines, test_metrics
from .evaluation import SplitEvaluation

__all__ = ["HOSMModule"]


class HOSMModule(L.LightningModule):
    """Score-based diffusion ODE trained by high-order DSM (Lu et al. 2022).

    Args:
        net: the score network (``class_path``/``init_args``), a ``hosm_lightning.nets.ScoreNet``
            (ToyScoreNet, SmallConvNet, DDPMpp, NCSNpp); the score wrapper calls it as
            ``net(x, t, sigma)`` with the SDE's noise level sigma = σ(t).
        sde: forward SDE (default ``VESDE()``, the paper's toy setting).
        parameterization: 'eps' (s = -net/sigma), 'score' (s = net) or 'velocity' (net predicts
            v = a ε − σ x₀; ``nets.ScoreModel``).
        objective: the objective: λ₂, λ₃, eps, divergence, second-order form, probe product, time
            weighting and proposal, DSM or flow-matching higher orders (``core.HOSMObjective``; e.g.
            ``objective: {lambda2: 0.5, lambda3: 0.1}``).
        stages: schedule of DSM orders, e.g. ``[{order: 1, steps: 2000}, {order: 3}]``.
        optimizer: optimizer factory (LightningCLI ``class_path``), default Adam.
        ode: probability-flow ODE solver settings of every solve (validation, test, plots, FID,
            ``sample``, ``likelihood``): eps, sample_eps, rtol, atol, method, divergence, step_size.
        fit: the fit loop's settings: warm-up, seed, finite check, per-term gradient norms,
            validation likelihood, ``init_from`` weights (``options.FitOptions``).
        evaluation: what ``test`` and the ``likelihood`` command compute for every test point: repeats,
            dequantization protocols, importance samples, max_samples, ODE overrides, seed (``options.EvalOptions``).
    """

    def __init__(
        self,
        net: ScoreNet,
        sde: SDE | None = None,
        parameterization: str = "eps",
        objective: HOSMObjective | None = None,
        stages: list[Stage] | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        ode: ODEOptions | None = None,
        fit: FitOptions | None = None,
        evaluation: EvalOptions | None = None,
    ):
        super().__init__()
        self.sde = sde if sde is not None else VESDE()
        self.stages = validate_stages(stages if stages is not None else [Stage(order=1)])
        self.objective = _as(HOSMObjective, objective)
        self.objective.check_sde(self.sde)
        self.ode = _as(ODEOptions, ode)
        self.fit_options = _as(FitOptions, fit)
        self.evaluation = _as(EvalOptions, evaluation)
        # plain data only (checkpoints are loaded with weights_only=True; loggers write these as YAML)
        self.save_hyperparameters({
            "parameterization": parameterization, "stages": [dataclasses.asdict(st) for st in self.stages],
            "objective": self.objective.as_dict(), "ode": self.ode.as_dict(), "fit": self.fit_options.as_dict(),
            "evaluation": self.evaluation.as_dict()})
        _check_net(net, parameterization, self.stages)
        self.score_model = ScoreModel(net, self.sde, parameterization)
        self.optimizer_factory = optimizer
        #: what the data module offers (set in ``setup``); 8-bit data in [-1, 1] until told otherwise
        self.data_spec = DataSpec()
        #: the name under which ``test`` logs and seeds its metrics; the ``likelihood`` command sets
        #: 'val' when it evaluates the validation split
        self.test_split = "test"
        #: summary of the latest test epoch (``SplitEvaluation.finish``), the same on every rank
        self.test_results: dict | None = None
        # Validation means as metrics: torchmetrics sums (value × batch size) and counts across ranks,
        # so uneven shards (each point once, no sampler padding) give the exact global mean.
        self.eval_means = nn.ModuleDict({f"val_{k}": MeanMetric() for k in _VAL_KEYS})
        if self.fit_options.init_from:
            # before any callback copies the model (the weight average), and before a resume, which
            # replaces these weights by the checkpoint's
            path, ema = self.fit_options.init_from, self.fit_options.init_from_ema
            fmt = init_from_checkpoint(self, path, ema=ema)
            rank_zero_info(f"initialised the network from {path} ({fmt} format, ema={ema})")

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
        return make_generator(self.fit_options.seed, self.global_rank, *tag, device=self.device)

    def current_stage(self) -> tuple[int, Stage]:
        return stage_at(self.stages, self.global_step)

    def to_model_range(self, x: Tensor) -> Tensor:
        """uint8 levels → the model range of the data spec ([0, 1] or [-1, 1]); float data unchanged."""
        spec = self.data_spec
        return bytes_to_model(x, spec.centered, levels=spec.levels) if x.dtype == torch.uint8 else x

    def losses(self, x0: Tensor, order: int, generator, term_grad_norms: bool = False) -> dict[str, Tensor]:
        """Batch means of the terms up to ``order`` (dsm1 and dsm2/dsm3 or fm2/fm3) and ``loss``, the mean
        of the per-sample loss (3.5); with ``term_grad_norms`` also ``grad_norm_<term>`` = ‖∇_θ term‖ of
        each unweighted term."""
        loss, terms = self.objective(self.score_model, self.sde, x0, order, generator)
        means = {k: v.mean() for k, v in terms.terms().items()}
        means["loss"] = loss.mean()
        if term_grad_norms:
            params = [p for p in self.parameters() if p.requires_grad]
            for k in terms.terms():
                grads = torch.autograd.grad(means[k], params, retain_graph=True, allow_unused=True)
                norms = [g.detach().norm() for g in grads if g is not None]
                means[f"grad_norm_{k}"] = torch.stack(norms).norm() if norms else torch.zeros((), device=self.device)
        return means

    # -- the one likelihood and sampling path ---------------------------------------------------
    def log_likelihood(self, x: Tensor, generator=None, ode: ODEOptions | None = None) -> Likelihood:
        """Exact ODE log-likelihood log p_eps(x) (4.1) in nats [B] of model-space points, on the unwrapped
        score model (never the DDP wrapper). ``generator``: one generator, or one per sample (each
        draws its sample's Hutchinson probe; a batch of K·B points takes K probes from each)."""
        return ode_log_likelihood(self.score_model, self.sde, x, ode or self.ode, generator=generator)

    def bits_per_dim(self, k: Tensor, generator=None, protocol: str = "uniform", num_importance: int = 1,
                     ode: ODEOptions | None = None) -> tuple[DequantizedBound, int]:
        """bits/dim of 8-bit data k (uint8) by dequantization ``protocol`` (4.2 uniform, 4.4 truncated
        normal) with ``num_importance`` samples, and the number of score evaluations; ``generator`` as
        in :meth:`log_likelihood` (the dequantization noise is drawn first, then the probes)."""
        opts, nfe = ode or self.ode, [0]

        def log_prob(y: Tensor) -> Tensor:
            lik = self.log_likelihood(y.contiguous(), generator, opts)
            nfe[0] += lik.nfe
            return lik.logp

        bound = bits_per_dim(log_prob, k, centered=self.data_spec.centered, generator=generator,
                             dequantization=protocol, num_importance=num_importance, sde=self.sde, eps=opts.eps,
                             levels=self.data_spec.levels)
        return bound, nfe[0]

    def sample(self, x_T: Tensor, ode: ODEOptions | None = None, denoise: bool = False) -> Samples:
        """Probability-flow ODE samples from prior draws x_T (integrated from T to sample_eps; with
        ``denoise`` a final Tweedie step)."""
        return ode_sample(self.score_model, self.sde, x_T, ode or self.ode, denoise=denoise)

    # -- setup checks ---------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        trainer = self.trainer
        self.data_spec = describe(trainer.datamodule)
        data_dim, net_dim = self.data_spec.dim, getattr(self.net, "dim", None)
        if data_dim is not None and net_dim is not None and data_dim != net_dim:
            raise ValueError(
                f"data dimension {data_dim} does not match the network dimension {net_dim}: "
                "set model.net.init_args.dim to the data's dimension"
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
        every = self.fit_options.grad_norm_every
        norms = every > 0 and self.global_step % every == 0
        # no finiteness check here: a per-rank raise would leave the other DDP ranks waiting in the
        # gradient all-reduce; non-finite values reach the (all-reduced) gradients and are caught in
        # on_before_optimizer_step on every rank at once
        out = self.losses(x0, stage.order, self.generator("train", self.global_step, batch_idx), term_grad_norms=norms)
        self.last_step = _StepRecord(idx, stage.order, {k: v.detach() for k, v in out.items() if k.startswith(("dsm", "fm"))},
                                     torch.isfinite(x0).all())
        bs = x0.shape[0]
        for k, v in out.items():
            self.log(f"train/{k}", v.detach() if k != "loss" else v, batch_size=bs, prog_bar=k == "loss")
        self.log("train/order", float(stage.order), batch_size=bs)
        self.log("train/stage", float(idx), batch_size=bs)
        return out["loss"]

    def on_before_optimizer_step(self, optimizer) -> None:
        total = grad_norm(self, norm_type=2).get("grad_2.0_norm_total")
        if total is not None:
            self.log("train/grad_norm", total)
            if self.fit_options.check_finite_every > 0 and not bool(torch.isfinite(total)):
                raise FloatingPointError(self._non_finite_message())
        self.log("train/lr", optimizer.param_groups[0]["lr"])

    def _non_finite_message(self) -> str:
        rec = getattr(self, "last_step", None) or _StepRecord(None, None, {}, torch.tensor(True))
        bad = [k for k, v in rec.terms.items() if not bool(torch.isfinite(v))]
        where = (f"term(s) {', '.join(bad)} are NaN/Inf" if bad else
                 "the training batch contains NaN/Inf" if not bool(rec.x0_finite) else
                 "the loss terms of this rank are finite (a finite loss with non-finite gradients, or another "
                 "rank's batch)")
        return (f"non-finite gradients at step {self.global_step} (stage {rec.stage}, order {rec.order}): {where}. "
                "Training stopped before the update, so checkpoints already written keep finite weights; lower the "
                "learning rate, raise eps or check the data, then resume with --ckpt_path last.")

    def configure_optimizers(self):
        opt = self.optimizer_factory(self.parameters())
        warm = self.fit_options.warmup_steps
        if warm <= 0 and all(st.lr is None for st in self.stages):
            return opt
        base, stages = opt.param_groups[0]["lr"], self.stages
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(stages, step, base, warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- evaluation -----------------------------------------------------------------------------
    def validation_step(self, batch, batch_idx: int) -> None:
        x = batch_tensor(batch)
        bs = x.shape[0]
        order = self.current_stage()[1].order  # the objective being trained right now
        with torch.inference_mode(False), torch.enable_grad():
            out = self.losses(self.to_model_range(x).clone(), order, self.generator("val", batch_idx))
        for k, v in out.items():
            self._log_mean(k, v.detach(), bs)
        if self.fit_options.val_likelihood:
            self._log_likelihood(x, self.generator("val-ll", batch_idx))

    def on_test_epoch_start(self) -> None:
        seed = self.fit_options.seed if self.evaluation.seed is None else self.evaluation.seed
        self._split_eval = SplitEvaluation(self.evaluation, self.data_spec, self.test_split, seed, self.ode)

    def test_step(self, batch, batch_idx: int) -> None:
        """Per-point NLL (nats) or bits/dim of every test point, each once across ranks (lit/evaluation.py)."""
        x = batch_tensor(batch)
        index = batch_index(batch)
        if index is None:  # a loader without indices: number the points by rank and position
            index = self._split_eval.positions(len(x), self.global_rank, self.trainer.world_size)
        with torch.inference_mode(False):
            self._split_eval.update(self, x.clone(), index.clone().cpu())

    def on_test_epoch_end(self) -> None:
        res = self._split_eval.finish(self)
        self.test_results = res
        if res is not None:
            for key, value in test_metrics(res).items():
                self.log(key, value, sync_dist=True)  # the same value on every rank
            for line in result_lines(res):
                rank_zero_info(line)

    def _log_mean(self, key: str, value: Tensor, batch_size: int) -> None:
        """Log the exact mean over all points of the epoch and all ranks (weights = batch sizes)."""
        metric = self.eval_means[f"val_{key}"]
        metric.update(value.detach().float(), weight=float(batch_size))
        self.log(f"val/{key}", metric, on_step=False, on_epoch=True, batch_size=batch_size)

    def _log_likelihood(self, x: Tensor, generator) -> None:
        bs = x.shape[0]
        with torch.inference_mode(False):
            x = x.clone()
            if x.dtype == torch.uint8:
                bound, nfe = self.bits_per_dim(x, generator)
                self._log_mean("bpd", bound.bpd.mean(), bs)
            else:
                lik = self.log_likelihood(x, generator)
                nfe, nll = lik.nfe, -lik.logp.mean()
                self._log_mean("nll", nll, bs)
                if self.data_spec.entropy is not None:
                    self._log_mean("nll_gap", nll - self.data_spec.entropy, bs)
        self._log_mean("nfe", torch.tensor(float(nfe), device=x.device), bs)


#: metrics of validation_step (see HOSMModule._log_mean)
_VAL_KEYS = ("dsm1", "dsm2", "dsm3", "fm2", "fm3", "loss", "nll", "nll_gap", "bpd", "nfe")


@dataclasses.dataclass
class _StepRecord:
    """What the non-finite message reports about the last training step."""

    stage: int | None
    order: int | None
    terms: dict
    x0_finite: Tensor


def _as(cls, value):
    """A settings object from itself, a plain dict (e.g. a checkpoint's hyper-parameters) or None (defaults)."""
    if value is None:
        return cls()
    return value if isinstance(value, cls) else cls(**dict(value))


def _check_net(net: nn.Module, parameterization: str, stages: list[Stage]) -> None:
    """Network/objective combinations that would silently train the wrong thing."""
    if getattr(net, "scale_by_sigma", False) and parameterization != "score":
        raise ValueError(
            f"{type(net).__name__} divides its output by sigma and returns the score: set "
            f"model.parameterization: score (got {parameterization!r})"
        )
    if getattr(net, "checkpoint_blocks", False) and any(st.order > 1 for st in stages):
        raise ValueError(
            "model.net.init_args.checkpoint_blocks=true works for first-order DSM only (activation "
            "checkpointing does not replay forward-mode JVPs); use gradient accumulation "
            "(trainer.accumulate_grad_batches) to fit orders 2 and 3 in memory"
        )
