"""HOSMCheckpoint: Lightning's ModelCheckpoint as the one writer of a run's checkpoints, interrupts included.

Periodic checkpoints and the checkpoint written when a run is interrupted go through the same
``ModelCheckpoint`` (and through the CLI's :class:`~hosm_lightning.checkpoint_io.AtomicCheckpointIO`),
so ``last.ckpt`` is always the newest state, whatever the order of interrupts, resumes and periodic
saves. What this class adds to Lightning's ``ModelCheckpoint(save_on_exception=True)``:

- only interrupts write a checkpoint (Ctrl-C, and SIGTERM from a scheduler, which Lightning turns
  into ``SIGTERMException`` at the end of a step). Other exceptions (a bug, a non-finite gradient,
  which ``HOSMModule`` stops on before the update) write nothing, so the last periodic checkpoint
  stays the resume point;
- an interrupt writes ``last.ckpt`` alone (Lightning also writes a second, periodic-named copy,
  doubling the work in a scheduler's grace period);
- the first Ctrl-C stops the run at the end of the current step, as Lightning does for SIGTERM, so
  the checkpoint never holds a half-applied optimizer step; a second Ctrl-C stops at once, without
  a checkpoint;
- nothing is written while validation runs inside ``fit`` (weight averaging has swapped the
  averaged weights into the model then): the previous checkpoint stays the resume point;
- the defaults of a resumable run: ``save_last=True``, no ``last-v1.ckpt`` beside ``last.ckpt``
  (``enable_version_counter=False``: last.ckpt is replaced), ``auto_insert_metric_name=False``.
"""

from __future__ import annotations

import signal
import sys
import threading

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

__all__ = ["HOSMCheckpoint", "INTERRUPTS"]

#: the exceptions that mean "interrupted": Ctrl-C and a scheduler's SIGTERM
INTERRUPTS = (KeyboardInterrupt, SIGTERMException)


class HOSMCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also writes ``last.ckpt`` when the run is interrupted (Ctrl-C or SIGTERM).

    Takes every argument of Lightning's ``ModelCheckpoint``; the defaults differ where a resumable
    run needs it: ``save_last=True``, ``save_on_exception=True`` (on interrupts only),
    ``enable_version_counter=False`` (``last.ckpt`` is replaced, never ``last-v1.ckpt``) and
    ``auto_insert_metric_name=False``.
    """

    def __init__(self, *, save_last: bool = True, save_on_exception: bool = True,
                 enable_version_counter: bool = False, auto_insert_metric_name: bool = False, **kwargs):
        super().__init__(save_last=save_last, save_on_exception=save_on_exception,
                         enable_version_counter=enable_version_counter,
                         auto_insert_metric_name=auto_insert_metric_name, **kwargs)
        self._ctrl_c = _DeferredCtrlC()

    # -- Ctrl-C at the end of a step -------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        if self.save_on_exception:
            self._ctrl_c.install(announce=trainer.is_global_zero)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        finished = 0 < trainer.max_steps <= trainer.global_step
        if self._ctrl_c.pending and not finished:
            raise KeyboardInterrupt  # Lightning's shutdown path: on_exception below, then exit

    def on_train_end(self, trainer, pl_module) -> None:
        self._ctrl_c.restore()
        super().on_train_end(trainer, pl_module)

    # -- the interrupt checkpoint ----------------------------------------------------------------
    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """Write ``last.ckpt`` when a fit is interrupted (see the module docstring for when not)."""
        forced = self._ctrl_c.forced
        self._ctrl_c.restore()  # after Ctrl-C, Lightning keeps SIGINT ignored until it has shut down
        if not (self.save_on_exception and isinstance(exception, INTERRUPTS)) or trainer.state.fn != TrainerFn.FITTING:
            return
        step, kind = trainer.global_step, "Ctrl-C" if isinstance(exception, KeyboardInterrupt) else "SIGTERM"
        if forced or trainer.sanity_checking or trainer.state.stage == RunningStage.VALIDATING:
            where = "during validation" if trainer.state.stage == RunningStage.VALIDATING else "in mid-step"
            rank_zero_info(f"{kind} {where} at step {step}: no checkpoint written; {self._resume_point()}")
            return
        if not self._should_save_on_exception(trainer):  # nothing trained yet, or saved at this step
            rank_zero_info(f"{kind} at step {step}: {self._resume_point()}")
            return
        candidates = self._monitor_candidates(trainer)
        if self.save_last:
            self._save_last_checkpoint(trainer, candidates)
            path = self.last_model_path
        else:
            path = self.format_checkpoint_name(candidates)
            self._save_checkpoint(trainer, path)
        rank_zero_info(f"{kind} at step {step}: wrote {path} (resume with --ckpt_path last)")

    def _resume_point(self) -> str:
        path = self.last_model_path or self._last_checkpoint_saved
        return f"the resume point is {path}" if path else "no checkpoint to resume from yet"


class _DeferredCtrlC:
    """A SIGINT handler for the training loop: the first Ctrl-C asks to stop after the current step,
    the second raises KeyboardInterrupt at once."""

    def __init__(self) -> None:
        self.pending = self.forced = False
        self._previous = None
        self._announce = True

    def install(self, announce: bool) -> None:
        self.pending = self.forced = False
        self._announce = announce
        if threading.current_thread() is threading.main_thread() and self._previous is None:
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def restore(self) -> None:
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGINT) == self._handle:
                signal.signal(signal.SIGINT, self._previous)
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.pending:
            self.forced = True
            raise KeyboardInterrupt
        self.pending = True
        if self._announce:
            print("\nCtrl-C: stopping at the end of this step and writing last.ckpt "
                  "(Ctrl-C again stops at once, without a checkpoint)", file=sys.stderr, flush=True)
