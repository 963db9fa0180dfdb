"""Progress of long work: durations, the rate clock, the Progress lines and bar (hosm_lightning/progress.py),
and the training progress bar in logs (lit/progress.py)."""

from __future__ import annotations

import io
import math
import re
import time

import pytest

from hosm_lightning.lit.progress import HOSMProgressBar
from hosm_lightning.progress import Progress, RateClock, format_duration


def test_format_duration():
    assert [format_duration(s) for s in (0, 45, 725, 3720, -3)] == ["0:00", "0:45", "12:05", "1:02:00", "0:00"]
    assert format_duration(math.inf) == "?" and format_duration(math.nan) == "?"


def test_rate_clock_estimates_the_time_left_from_the_rate():
    clock = RateClock(0, 100)
    clock.last_time -= 10.0  # 10 s since the start
    text = clock.tick(20, "steps")  # 20 steps in 10 s: 2 steps/s, 80 left → 40 s
    assert text.startswith("2 steps/s") and text.endswith("~0:40 left"), text
    assert clock.due(100, None, 1e9)  # the end is always due
    assert clock.due(25, 5, 1e9) and not clock.due(21, 5, 1e9)  # every 5 units
    assert "~? left" in RateClock(0, math.inf).tick(0, "steps")


def test_progress_lines_with_time_left_when_not_a_terminal():
    stream = io.StringIO()  # isatty() is False: plain lines
    with Progress(4, "work", interval=0.05, stream=stream) as progress:
        progress.start -= 10.0  # pretend 10 s have passed
        progress.update(1)
        assert progress.status() == "work: 1/4 (25%), 0:10 elapsed, ~0:30 left"
        time.sleep(0.2)  # the ticker writes lines on its own
        progress.write("a message")
        progress.update(3)
    lines = stream.getvalue().splitlines()
    assert any(line.startswith("work: 1/4 (25%)") for line in lines), lines
    assert "a message" in lines and lines[-1].startswith("work: 4/4 (100%)") and "~0:00 left" in lines[-1]
    assert "time left unknown" in Progress(2, "none", stream=io.StringIO(), enabled=False).status()


def test_disabled_progress_prints_nothing():
    stream = io.StringIO()
    with Progress(3, "quiet", interval=0.01, stream=stream, enabled=False) as progress:
        progress.update(3)
        progress.write("not shown")
        time.sleep(0.05)
    assert stream.getvalue() == ""


def test_progress_draws_a_bar_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    with Progress(2, "work", stream=stream) as progress:
        progress.update(2)
    assert "work: 100%" in stream.getvalue() and "2/2" in stream.getvalue()


def test_progress_bar_settings_are_checked():
    with pytest.raises(ValueError, match="every_n_steps"):
        HOSMProgressBar(every_n_steps=0)
    with pytest.raises(ValueError, match="every_seconds"):
        HOSMProgressBar(every_seconds=0)


@pytest.mark.slow
def test_training_in_a_log_prints_steps_with_time_left(make_module, make_data, make_trainer, capsys):
    bar = HOSMProgressBar(plain=True, every_n_steps=5)
    trainer = make_trainer(max_steps=10, callbacks=[bar], enable_progress_bar=True)
    trainer.fit(make_module(), datamodule=make_data(steps_per_epoch=5))
    lines = capsys.readouterr().out.splitlines()
    steps = [line for line in lines if re.match(r"step \d+/10 \(\d+%\)", line)]
    assert [line.split()[1] for line in steps] == ["5/10", "10/10"], lines
    assert all("train/loss" in line and "left" in line and "steps/s" in line for line in steps)
    assert lines[0] == "training: step 0 of 10" and lines[-1].startswith("training: 10 steps in ")
