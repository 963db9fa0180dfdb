"""EMA of the weights for short runs and fine-tuning: Lightning's weight averaging with a decay warm-up.

:class:`HOSMEMA` is Lightning's ``WeightAveraging`` with an exponential moving average and three
additions, all through Lightning's public interface:

- ``update_starting_at_step`` may be a fraction of ``trainer.max_steps`` (``0.05`` = the first 5 %
  of the run are not averaged), so a short run averages too instead of never starting; a start at
  or after the end of the run is a configuration error (the average would never be updated, and
  Lightning would copy the initial weights over the trained ones at the end);
- a warm-up of the decay, ``min(decay, (1 + n) / (10 + n))`` after n updates, so the first
  (untrained) weights are forgotten within tens of steps instead of thousands (with decay 0.999
  and no warm-up, 82 % of the average after 200 steps is still the step-1 weights);
- outside ``fit`` (``test``/``validate``/``likelihood``/``sample`` from a checkpoint) it loads nothing:
  the checkpoint's ``state_dict`` already holds the averaged weights.

The averaged copy is made when ``fit`` starts; ``model.fit.init_from`` weights are loaded when the
module is built, before that, so the average starts from them. Checkpoints hold the average in
``state_dict`` and the raw weights in ``current_model_state``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from lightning.pytorch.callbacks.weight_averaging import WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn

__all__ = ["HOSMEMA", "warmup_decay"]


def warmup_decay(decay: float, num_updates: int, warmup: bool = True) -> float:
    """The decay applied at update ``num_updates + 1``: ``min(decay, (1 + n) / (10 + n))`` with warm-up."""
    return min(decay, (1.0 + num_updates) / (10.0 + num_updates)) if warmup else decay


@torch.no_grad()
def _ema_update(avg: list, cur: list, num_averaged, *, decay: float, warmup: bool) -> None:
    """avg ← d·avg + (1 − d)·cur; ``num_averaged`` (a device tensor, >= 1 here: the first update
    copies) counts the updates so far. The warm-up decay stays on the device (no host sync)."""
    if not warmup:
        for a, c in zip(avg, cur):
            a.lerp_(c, 1.0 - decay)
        return
    n = num_averaged.to(dtype=torch.float32)
    d = torch.clamp((1.0 + n) / (10.0 + n), max=decay)
    for a, c in zip(avg, cur):
        a.mul_(d.to(a.dtype)).add_(c * (1.0 - d).to(c.dtype))


class HOSMEMA(WeightAveraging):
    """Exponential moving average of the weights for validation, plots, checkpoints and evaluation.

    Args:
        decay: EMA decay per update (paper: 0.999 for the toy data, 0.9999 for CIFAR-10 VP).
        update_every_n_steps: update the average every this many optimizer steps.
        update_starting_at_step: first step that is averaged: an int (step index) or a float in
            [0, 1) (a fraction of ``trainer.max_steps``); None averages from the first step.
        update_starting_at_epoch: also update at the end of every epoch from this epoch on (None: never).
        warmup: ramp the decay up as ``min(decay, (1 + n) / (10 + n))`` over the first updates.
        device: device of the averaged copy (default: the model's; "cpu" saves accelerator memory).
        use_buffers: average the buffers too (True), or only the parameters.
    """

    def __init__(
        self,
        decay: float = 0.999,
        update_every_n_steps: int = 1,
        update_starting_at_step: int | float | None = None,
        update_starting_at_epoch: int | None = None,
        warmup: bool = True,
        device: str | None = None,
        use_buffers: bool = True,
    ):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"HOSMEMA.decay must lie in [0, 1], got {decay!r}")
        if update_every_n_steps < 1:
            raise ValueError(f"HOSMEMA.update_every_n_steps must be >= 1, got {update_every_n_steps!r}")
        start = update_starting_at_step
        if isinstance(start, float) and not start.is_integer() and not 0.0 <= start < 1.0:
            raise ValueError(f"HOSMEMA.update_starting_at_step must be a step (int >= 0) or a fraction of "
                             f"max_steps in [0, 1), got {start!r}")
        if start is not None and start < 0:
            raise ValueError(f"HOSMEMA.update_starting_at_step must be >= 0, got {start!r}")
        super().__init__(device=device, use_buffers=use_buffers,
                         multi_avg_fn=functools.partial(_ema_update, decay=float(decay), warmup=bool(warmup)))
        self.decay, self.warmup = float(decay), bool(warmup)
        self.update_every_n_steps, self.update_starting_at_epoch = int(update_every_n_steps), update_starting_at_epoch
        #: as given (int step, fraction, or None); the resolved step is ``update_starting_at_step``
        self.start_spec = start
        self.update_starting_at_step = None if start is None or isinstance(start, float) and start < 1 else int(start)

    @property
    def state_key(self) -> str:
        # Lightning's EMAWeightAveraging key: checkpoints of either callback resume with either.
        return "EMAWeightAveraging"

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """Every ``update_every_n_steps`` optimizer steps from ``update_starting_at_step`` on; at the end
        of every epoch from ``update_starting_at_epoch`` on."""
        if step_idx is not None:
            started = self.update_starting_at_step is None or step_idx >= self.update_starting_at_step
            if started and step_idx % self.update_every_n_steps == 0:
                return True
        return epoch_idx is not None and self.update_starting_at_epoch is not None \
            and epoch_idx >= self.update_starting_at_epoch

    def _resolve_start(self, trainer) -> None:
        start, max_steps = self.start_spec, int(getattr(trainer, "max_steps", -1) or -1)
        if isinstance(start, float) and start < 1:
            if max_steps <= 0:
                raise ValueError(
                    f"HOSMEMA.update_starting_at_step={start} is a fraction of trainer.max_steps, which is "
                    "not set: set trainer.max_steps or give the start as a step number"
                )
            self.update_starting_at_step = int(start * max_steps)
        first = self.update_starting_at_step or 0
        if 0 < max_steps <= first and self.update_starting_at_epoch is None:
            raise ValueError(
                f"HOSMEMA starts averaging at step {first} but the run ends at max_steps={max_steps}, so the average "
                "would never be updated: lower update_starting_at_step (e.g. a fraction such as 0.05), or remove "
                "the HOSMEMA callback"
            )

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self._resolve_start(trainer)
        super().setup(trainer, pl_module, stage)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        # Only fit's validation swaps the average in: a `validate` after a fit in the same process
        # evaluates the weights it was given (a checkpoint's state_dict), not the fit's last average.
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_validation_epoch_end(trainer, pl_module)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        # Outside fit the checkpoint's state_dict (the averaged weights) is what we evaluate; Lightning's
        # callback would warn, or (after a fit in the same process) load the raw weights instead.
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
