"""HOSMProgressBar: progress of fit / validate / test on a terminal and in logs.

On a terminal it is Lightning's tqdm bar, with the training bar counting the steps of the whole run
(not of one epoch: the synthetic data's epochs are arbitrary), so its estimate of the time left is
the run's. When stdout is not a terminal (a log file, CI, a SLURM job) tqdm's redrawn bar turns into
noise, so it prints plain lines instead::

    step 1200/3000 (40%) | train/loss 0.512 | 9.8 steps/s | 2:03 elapsed | ~3:04 left

every ``every_n_steps`` steps (default: 5 % of the run) and whenever ``every_seconds`` have passed
since the previous line, plus a line when validation / test starts and ends (with batch lines, also
at most ``every_seconds`` apart, for long evaluations). Rank 0 only. The CLI adds one to every
trainer that has ``enable_progress_bar`` on and no progress bar of its own.
"""

from __future__ import annotations

import math
import sys

from lightning.pytorch.callbacks import TQDMProgressBar

from ..progress import RateClock

__all__ = ["HOSMProgressBar"]


def _total_steps(trainer) -> float:
    if trainer.max_steps and trainer.max_steps > 0:
        return float(trainer.max_steps)
    return float(trainer.estimated_stepping_batches)


class HOSMProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar on a terminal; plain lines with an estimate of the time left otherwise.

    Args:
        refresh_rate: redraw the terminal bar every this many batches.
        every_n_steps: plain mode: a training line every this many steps (default: 5 % of the run).
        every_seconds: plain mode: a line at the first step (or batch) after this many seconds
            without one, so that a log shows progress at least this often.
        plain: force plain lines (True) or the terminal bar (False); default: plain lines
            exactly when stdout is not a terminal.
    """

    def __init__(self, refresh_rate: int = 1, every_n_steps: int | None = None, every_seconds: float = 15.0,
                 plain: bool | None = None):
        super().__init__(refresh_rate=refresh_rate)
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"HOSMProgressBar.every_n_steps must be >= 1, got {every_n_steps}")
        if not every_seconds > 0:
            raise ValueError(f"HOSMProgressBar.every_seconds must be > 0, got {every_seconds}")
        self.every_n_steps, self.every_seconds = every_n_steps, float(every_seconds)
        self.plain = (not sys.stdout.isatty()) if plain is None else bool(plain)
        self._train: RateClock | None = None
        self._eval: RateClock | None = None

    @property
    def is_enabled(self) -> bool:
        """The tqdm bars: off in plain mode."""
        return not self.plain and super().is_enabled

    def get_metrics(self, trainer, pl_module) -> dict:
        """The progress-bar metrics without Lightning's ``v_num`` (runs have no version folders)."""
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items

    def _say(self, trainer, text: str) -> None:
        if self.plain and trainer.is_global_zero:
            print(text, flush=True)

    # -- training --------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._train = RateClock(trainer.global_step, _total_steps(trainer))
        self._say(trainer, f"training: step {trainer.global_step} of {self._train.total:.0f}")

    def on_train_epoch_start(self, trainer, *args) -> None:
        """The terminal bar counts the steps of the run, not the batches of an epoch."""
        if self.plain:
            return
        bar = self.train_progress_bar
        total = _total_steps(trainer)
        total = int(total) if math.isfinite(total) else None
        if bar.total != total:
            bar.reset(total=total)
            bar.initial = bar.n = trainer.global_step
        bar.set_description("training")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if not self.plain:
            bar = self.train_progress_bar
            if bar is not None and self._should_update(step, bar.total or 0):
                bar.n = step
                bar.set_postfix(self.get_metrics(trainer, pl_module))  # also redraws
            return
        clock = self._train
        every_n = self.every_n_steps
        if every_n is None and math.isfinite(clock.total):
            every_n = max(1, int(clock.total // 20))
        if clock.due(step, every_n, self.every_seconds):
            pct = f"/{clock.total:.0f} ({100 * step / clock.total:.0f}%)" if math.isfinite(clock.total) else ""
            metrics = "".join(f" | {k} {_fmt(v)}" for k, v in self.get_metrics(trainer, pl_module).items())
            self._say(trainer, f"step {step}{pct}{metrics} | {clock.tick(step, 'steps')}")

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        clock = self._train
        if clock is not None:
            steps = trainer.global_step - clock.first
            self._say(trainer, f"training: {steps} steps in {clock.elapsed()}, "
                               f"now at step {trainer.global_step}")

    # -- validation and test ---------------------------------------------------------------------
    def _eval_start(self, trainer, what: str, total) -> None:
        self._eval = RateClock(0, float(total) if total is not None else math.inf)
        where = f" at step {trainer.global_step}" if trainer.state.fn == "fit" else ""
        count = f" ({int(total)} batches)" if total is not None and math.isfinite(total) else ""
        self._say(trainer, f"{what}{where}{count} ...")

    def _eval_batch(self, trainer, what: str, done: int) -> None:
        clock = self._eval
        if clock is not None and done < clock.total and clock.due(done, None, self.every_seconds):
            self._say(trainer, f"{what}: batch {done}/{clock.total:.0f} | {clock.tick(done, 'batches')}")

    def _eval_end(self, trainer, what: str) -> None:
        if self._eval is not None:
            self._say(trainer, f"{what}: done in {self._eval.elapsed()}")
        self._eval = None

    def on_validation_start(self, trainer, pl_module) -> None:
        super().on_validation_start(trainer, pl_module)
        if not trainer.sanity_checking:
            self._eval_start(trainer, "validation", _finite_sum(trainer.num_val_batches))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0):
        super().on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        if not trainer.sanity_checking:
            self._eval_batch(trainer, "validation", batch_idx + 1)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if not trainer.sanity_checking:
            self._eval_end(trainer, "validation")

    def on_test_start(self, trainer, pl_module) -> None:
        super().on_test_start(trainer, pl_module)
        self._eval_start(trainer, "test", _finite_sum(trainer.num_test_batches))

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0):
        super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        self._eval_batch(trainer, "test", batch_idx + 1)

    def on_test_end(self, trainer, pl_module) -> None:
        super().on_test_end(trainer, pl_module)
        self._eval_end(trainer, "test")


def _finite_sum(counts) -> float | None:
    total = sum(counts) if isinstance(counts, (list, tuple)) else counts
    return float(total) if total is not None and math.isfinite(total) else None


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
