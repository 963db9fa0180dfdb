"""Settings of the fit loop (``model.fit`` in configs) and of the test-time likelihood (``model.evaluation``),
each one validated object."""

from __future__ import annotations

import dataclasses

from .core.dequantization import resolve_protocol
from .core.ode import ODEOptions
from .core.settings import SettingsError, flag, integer

__all__ = ["FitOptions", "EvalOptions", "parse_protocols"]


@dataclasses.dataclass(frozen=True)
class FitOptions:
    """What the training loop does besides the objective: warm-up, seeding, safety, extra logging,
    and the weights it starts from.

    Args:
        warmup_steps: linear learning-rate warm-up over this many optimizer steps.
        seed: base seed; every rank/step derives its own generator from (seed, rank, tag, step).
        check_finite_every: 0 turns the non-finite guard off; any positive value checks before every
            update that the gradient norm (after the DDP all-reduce, so every rank decides the same) is
            finite, and stops with the step, stage and term otherwise (one scalar host sync per step).
            No update is ever applied with NaN/Inf gradients, so no checkpoint holds NaN weights.
        grad_norm_every: every this many steps, also log ``train/grad_norm_dsm1..3`` = ‖∇_θ dsm_k‖ of
            each unweighted term before clipping (one extra backward pass per term; this rank's
            gradient, before the DDP all-reduce); 0 turns it off.
        val_likelihood: compute the exact ODE NLL (or bits/dim of 8-bit data) in validation.
        init_from: start ``fit`` from these weights (our Lightning checkpoint or a score_sde_pytorch
            checkpoint): weights only, not the optimizer or step counter; ignored when resuming with
            ``--ckpt_path``.
        init_from_ema: take the checkpoint's EMA weights (True) or its raw weights.
    """

    warmup_steps: int = 0
    seed: int = 0
    check_finite_every: int = 1
    grad_norm_every: int = 0
    val_likelihood: bool = True
    init_from: str | None = None
    init_from_ema: bool = True

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for name in ("warmup_steps", "check_finite_every", "grad_norm_every"):
            object.__setattr__(self, name, integer(owner, name, getattr(self, name)))
        object.__setattr__(self, "seed", integer(owner, "seed", self.seed))
        flag(owner, "val_likelihood", self.val_likelihood)
        flag(owner, "init_from_ema", self.init_from_ema)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_protocols(value) -> tuple[str, ...]:
    """'uniform' | 'truncated_normal' | 'tn' | 'uniform,tn' | a list -> canonical protocol names."""
    if isinstance(value, str):
        value = [v for v in value.strip().strip("[]").replace(" ", "").split(",") if v]
    out = tuple(resolve_protocol(v) for v in (value or []))
    if not out or len(set(out)) != len(out):
        raise ValueError(f"dequantization must name 'uniform' and/or 'truncated_normal' once each, got {value!r}")
    return out


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """What ``test`` (and the ``likelihood`` command) computes for every test point.

    Args:
        num_repeats: evaluations per point, each with fresh dequantization noise and Hutchinson
            probe (reference CIFAR-10 protocol: 5).
        dequantization: uint8 data only: 'uniform' (the paper's protocol), 'truncated_normal'
            (i-DODE, training-free; 'tn' for short) or a list of both (each is evaluated and logged).
        num_importance: K importance samples per point and repeat for the bits/dim bound
            (log (1/K) Σ exp(log p − log q)); K model evaluations each.
        max_samples: evaluate only the points with dataset index < max_samples (quick checks);
            0 skips the likelihood (e.g. a test run for FID only); None: every point.
        ode: overrides of the model's ODE options (``model.ode``) for this evaluation, e.g.
            ``{rtol: 1.0e-4}`` or ``{method: rk4, step_size: 0.01}`` (fixed-step solvers give per-point
            values that do not depend on the batch at all).
        seed: base seed of the per-point noise (default: the module's ``fit.seed``).
    """

    num_repeats: int = 1
    dequantization: str | list[str] = "uniform"
    num_importance: int = 1
    max_samples: int | None = None
    ode: dict | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        name, set_ = type(self).__name__, lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen)
        set_("num_repeats", integer(name, "num_repeats", self.num_repeats, 1))
        set_("num_importance", integer(name, "num_importance", self.num_importance, 1))
        if self.max_samples is not None:
            set_("max_samples", integer(name, "max_samples", self.max_samples, 0))
        try:
            set_("dequantization", list(parse_protocols(self.dequantization)))
            ODEOptions().replace(**dict(self.ode or {}))
        except ValueError as err:
            raise SettingsError(name, "ode" if "ODE" in str(err) else "dequantization", f"is invalid: {err}") from None
        set_("ode", dict(self.ode or {}))

    def replace(self, **changes) -> EvalOptions:
        """A copy with ``changes`` (None values ignored), validated again."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)
