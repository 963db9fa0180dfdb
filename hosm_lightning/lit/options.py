"""Settings of the fit loop, one validated object (``model.fit`` in configs)."""

from __future__ import annotations

import dataclasses

__all__ = ["FitOptions"]


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
        for name in ("warmup_steps", "check_finite_every", "grad_norm_every"):
            value = getattr(self, name)
            if int(value) != value or value < 0:
                raise ValueError(f"model.fit.{name} must be an integer >= 0, got {value!r}")
            object.__setattr__(self, name, int(value))
        object.__setattr__(self, "seed", int(self.seed))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)
