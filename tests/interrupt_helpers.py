"""Helpers for the interrupt tests (tests/test_checkpointing.py), imported by the subprocesses they start.

``SelfSignal`` sends a signal to its own process at a given step, as a user's Ctrl-C or a scheduler's
SIGTERM would; ``kill_inside_writer`` makes the process kill itself (SIGKILL) half-way through writing
a checkpoint file whose name contains ``last``.
"""

from __future__ import annotations

import builtins
import os
import signal

import lightning as L


class SelfSignal(L.Callback):
    """Sends ``signum`` to this process when the training batch of ``at_step`` starts."""

    def __init__(self, signum: int = 2, at_step: int = 3):
        self.signum, self.at_step = int(signum), int(at_step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            os.kill(os.getpid(), self.signum)


class _HalfThenKill:
    """A binary file whose first ``write`` stores half of its bytes, after which the process dies."""

    def __init__(self, fh):
        self._fh = fh

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self._fh.write(view[: max(1, len(view) // 2)])
        self._fh.flush()
        os.fsync(self._fh.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
        return len(view)

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()


def kill_inside_writer(after: int) -> None:
    """The (after+1)-th time a file whose name contains ``last`` is opened for writing, write half of
    the first chunk and SIGKILL the process: a checkpoint write cut off half-way."""
    real_open, seen = builtins.open, [0]

    def patched(file, mode="r", *args, **kwargs):
        fh = real_open(file, mode, *args, **kwargs)
        if "w" in mode and "b" in mode and "last" in os.path.basename(str(file)):
            seen[0] += 1
            if seen[0] > after:
                return _HalfThenKill(fh)
        return fh

    builtins.open = patched
