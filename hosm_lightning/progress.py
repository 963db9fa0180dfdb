"""Progress of long work with an estimate of the time left, on a terminal and in logs.

* :func:`format_duration`: ``m:ss`` or ``h:mm:ss``.
* :class:`RateClock`: counts, elapsed time and a smoothed rate of one loop, for "~1:02 left".
* :class:`Progress`: ``done`` of ``total`` units of work (sampling batches, diagnosed checkpoints,
  benchmark rows): a tqdm bar when the stream is a terminal, else one plain line every ``interval``
  seconds and one at the end (logs, CI, SLURM). The training loop's bar is
  :class:`hosm_lightning.lit.progress.HOSMProgressBar`, built on the same clock.
"""

from __future__ import annotations

import math
import sys
import threading
import time

__all__ = ["format_duration", "RateClock", "Progress"]


def format_duration(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss``; ``?`` for an unknown (non-finite) duration."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(max(seconds, 0.0)))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


class RateClock:
    """Progress of one loop: counts, times and a smoothed rate for the estimate of the time left."""

    def __init__(self, done: float, total: float) -> None:
        self.start = self.last_time = time.monotonic()
        self.first = self.last_done = done
        self.total = total
        self.rate: float | None = None

    def due(self, done: float, every_n: int | None, every_seconds: float) -> bool:
        """Whether a progress line is due: the end, ``every_n`` units or ``every_seconds`` since the last."""
        if done >= self.total:
            return True
        return bool(every_n and done - self.last_done >= every_n) or time.monotonic() - self.last_time >= every_seconds

    def tick(self, done: float, unit: str) -> str:
        """'12.3 steps/s | 0:41 elapsed | ~1:02 left' (the rate over the latest interval, smoothed)."""
        now = time.monotonic()
        if done > self.last_done and now > self.last_time:
            window = (done - self.last_done) / (now - self.last_time)
            self.rate = window if self.rate is None else 0.5 * self.rate + 0.5 * window
        self.last_time, self.last_done = now, done
        left = (self.total - done) / self.rate if self.rate and math.isfinite(self.total) else math.nan
        speed = f"{self.rate:.3g}" if self.rate else "?"
        return f"{speed} {unit}/s | {format_duration(now - self.start)} elapsed | ~{format_duration(left)} left"

    def elapsed(self) -> str:
        return format_duration(time.monotonic() - self.start)


class Progress:
    """``done`` of ``total`` units with the elapsed time and an estimate of the time left
    (elapsed × remaining / done), on ``stream`` (default stderr, so stdout keeps only results): a tqdm
    bar when it is a terminal, else one plain line every ``interval`` seconds and one at the end.
    Use as a context manager; ``enabled=False`` (e.g. on ranks other than 0) prints nothing."""

    def __init__(self, total: float, desc: str, *, interval: float = 30.0, stream=None, enabled: bool = True):
        from tqdm import tqdm

        self.total, self.desc, self.done, self.enabled = float(total), desc, 0.0, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.start = time.perf_counter()
        self._lock, self._stop = threading.Lock(), threading.Event()
        tty = enabled and getattr(self.stream, "isatty", lambda: False)()
        self._bar = tqdm(total=total, desc=desc, file=self.stream, dynamic_ncols=True) if tty else None
        self._thread = threading.Thread(target=self._tick, args=(1.0 if tty else interval,), daemon=True)
        if enabled:
            self._thread.start()

    def status(self) -> str:
        """'desc: done/total (p %), 1:05 elapsed, ~3:10 left'."""
        elapsed = time.perf_counter() - self.start
        left = f"~{format_duration(elapsed * (self.total - self.done) / self.done)} left" if self.done > 0 \
            else "time left unknown"
        pct = 100 * self.done / self.total if self.total > 0 else 100.0
        return f"{self.desc}: {self.done:g}/{self.total:g} ({pct:.0f}%), {format_duration(elapsed)} elapsed, {left}"

    def update(self, n: float = 1.0) -> None:
        with self._lock:
            self.done += n
            if self._bar is not None:
                self._bar.update(n)

    def write(self, message: str) -> None:
        """A message on the progress stream (above the bar on a terminal)."""
        if not self.enabled:
            return
        with self._lock:
            if self._bar is not None:
                self._bar.write(message, file=self.stream)
            else:
                print(message, file=self.stream, flush=True)

    def _tick(self, every: float) -> None:
        while not self._stop.wait(every):
            with self._lock:
                if self._bar is not None:
                    self._bar.refresh()
                else:
                    print(self.status(), file=self.stream, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self._stop.set()
        self._thread.join()
        if self._bar is not None:
            self._bar.close()
        else:
            print(self.status(), file=self.stream, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
