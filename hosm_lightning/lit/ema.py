"""EMA of the weights that never leaves the model worse off than its raw weights.

:class:`HOSMEMA` is Lightning's ``EMAWeightAveraging`` with four changes that matter for short runs
and fine-tuning (issue 11):

- ``update_starting_at_step`` may be a fraction of ``trainer.max_steps`` (``0.05`` = the first 5 %
  of the run are not averaged), so a short run averages too instead of never starting;
- a warm-up of the decay, ``min(decay, (1 + n) / (10 + n))`` after n updates, so the first
  (untrained) weights are forgotten within tens of steps instead of thousands (with decay 0.999
  and no warm-up, 82 % of the average after 200 steps is still the step-1 weights);
- while the average has not been updated yet it *is* the current weights: it is re-synchronised
  from the model at the start of fit, before every validation and before every checkpoint, so
  ``init_from`` weights (loaded by ``HOSMModule.setup``, after Lightning's callback ``setup`` copied
  the freshly initialised network) are what validation, plots and checkpoints see at step 0;
- at the end of training a never-updated average is *not* copied into the model (Lightning would
  replace the trained weights by the initial ones); the trained weights are kept, with one warning.

Outside ``fit`` (``test``/``validate``/``likelihood``/``sample`` from a checkpoint) it does nothing: the
checkpoint's ``state_dict`` already holds the averaged weights. Its checkpoint state key is
``EMAWeightAveraging``, so checkpoints written with Lightning's callback resume with this one.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

__all__ = ["HOSMEMA", "warmup_decay"]


def warmup_decay(decay: float, num_updates: int, warmup: bool = True) -> float:
    """The decay applied at update ``num_updates + 1``: ``min(decay, (1 + n) / (10 + n))`` with warm-up."""
    return min(decay, (1.0 + num_updates) / (10.0 + num_updates)) if warmup else decay


@torch.no_grad()
def _ema_update(avg: list, cur: list, num_averaged, *, decay: float, warmup: bool) -> None:
    """avg ← d·avg + (1 − d)·cur; ``num_averaged`` (a device tensor, >= 1 here: the first update
    copies) counts the updates so far. The warm-up decay stays on the device (no host sync)."""
    if not warmup:
        torch._foreach_lerp_(avg, cur, 1.0 - decay)
        return
    n = num_averaged.to(dtype=torch.float32)
    d = torch.clamp((1.0 + n) / (10.0 + n), max=decay)
    torch._foreach_mul_(avg, d.to(avg[0].dtype))
    torch._foreach_add_(avg, torch._foreach_mul(cur, (1.0 - d).to(cur[0].dtype)))


class HOSMEMA(EMAWeightAveraging):
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
        super().__init__(device=device, use_buffers=use_buffers, decay=decay,
                         update_every_n_steps=update_every_n_steps, update_starting_at_step=None,
                         update_starting_at_epoch=update_starting_at_epoch)
        # replace the parent's fixed-decay avg_fn (AveragedModel takes only one of the two)
        self._kwargs.pop("avg_fn", None)
        self._kwargs["multi_avg_fn"] = functools.partial(_ema_update, decay=float(decay), warmup=bool(warmup))
        self.decay, self.warmup = float(decay), bool(warmup)
        #: as given (int step, fraction, or None); the resolved step is ``update_starting_at_step``
        self.start_spec = start
        self.update_starting_at_step = None if start is None or isinstance(start, float) and start < 1 else int(start)
        self._warned_empty = False

    @property
    def state_key(self) -> str:
        # Same key as Lightning's EMAWeightAveraging: checkpoints of either callback resume with either.
        return "EMAWeightAveraging"

    # -- helpers --------------------------------------------------------------------------------
    @property
    def num_updates(self) -> int:
        """Number of updates of the average so far (0: it is still a copy of the current weights)."""
        return 0 if self._average_model is None else int(self._average_model.n_averaged)

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
        if 0 < max_steps <= first:
            rank_zero_warn(
                f"HOSMEMA: the weight average starts at step {first} but the run ends at max_steps={max_steps}: "
                "it will never be updated, and the trained weights are kept. Lower "
                "update_starting_at_step (e.g. a fraction such as 0.05)."
            )
            self._warned_empty = True

    def _sync_if_empty(self, pl_module) -> None:
        """A never-updated average is the current weights (e.g. after ``init_from`` or a resume)."""
        if self._average_model is None or self.num_updates > 0:
            return
        with torch.no_grad():
            avg = itertools.chain(self._average_model.module.parameters(), self._average_model.module.buffers())
            cur = itertools.chain(pl_module.parameters(), pl_module.buffers())
            for a, c in zip(avg, cur):
                a.detach().copy_(c.detach().to(a.device))

    # -- Lightning hooks ------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self._resolve_start(trainer)
        super().setup(trainer, pl_module, stage)

    def on_fit_start(self, trainer, pl_module) -> None:
        self._sync_if_empty(pl_module)

    def on_train_start(self, trainer, pl_module) -> None:
        self._sync_if_empty(pl_module)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._sync_if_empty(pl_module)
        super().on_validation_epoch_start(trainer, pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        self._sync_if_empty(pl_module)
        super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        # Outside fit the checkpoint's state_dict (the averaged weights) is what we evaluate; Lightning's
        # callback would warn, or (after a fit in the same process) load the raw weights instead.
        if self._average_model is None or trainer.state.fn != TrainerFn.FITTING:
            return
        super().on_load_checkpoint(trainer, pl_module, checkpoint)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._average_model is None:
            return
        if self.num_updates == 0:
            if not self._warned_empty:
                rank_zero_warn(
                    f"HOSMEMA: the weight average was never updated (run ended at step {trainer.global_step}, "
                    f"averaging starts at step {self.update_starting_at_step}): keeping the trained weights."
                )
                self._warned_empty = True
            return
        super().on_train_end(trainer, pl_module)
