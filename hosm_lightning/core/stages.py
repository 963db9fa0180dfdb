"""The staged objective: a schedule of DSM orders over optimizer steps (docs/design.md §3 "Staging").

Example (YAML): ``stages: [{order: 1, steps: 2000}, {order: 2, steps: 1000}, {order: 3}]`` trains
first-order DSM for steps [0, 2000), second order for [2000, 3000) and third order from 3000 on.
The last stage may be open-ended (``steps: null``); ``max_steps`` of the Trainer ends the run.
A stage may set its own learning rate, e.g. ``[{order: 1, steps: 8000}, {order: 2, lr: 2.0e-4}]``
(the fine-tuning recipe of docs/design.md §9); stages without ``lr`` use the optimizer's.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Stage:
    """One stage: DSM ``order`` (1, 2 or 3) for ``steps`` optimizer steps (None: until the end),
    at learning rate ``lr`` (None: the optimizer's own)."""

    order: int = 1
    steps: int | None = None
    lr: float | None = None


def validate_stages(stages) -> list[Stage]:
    """Check a stage list; raise ValueError naming the offending key (``stages[i].order`` ...)."""
    if not stages:
        raise ValueError("model.stages must list at least one stage, e.g. [{order: 1}]")
    out = []
    for i, st in enumerate(stages):
        st = Stage(**st) if isinstance(st, dict) else st
        if st.order not in (1, 2, 3):
            raise ValueError(f"model.stages[{i}].order must be 1, 2 or 3, got {st.order!r}")
        last = i == len(stages) - 1
        if st.steps is None and not last:
            raise ValueError(f"model.stages[{i}].steps is required: only the last stage may be open-ended")
        if st.steps is not None and st.steps <= 0:
            raise ValueError(
                f"model.stages[{i}].steps must be > 0 (stage boundaries must strictly increase), got {st.steps!r}"
            )
        if st.lr is not None and not (st.lr > 0):
            raise ValueError(f"model.stages[{i}].lr must be > 0 (or left out), got {st.lr!r}")
        out.append(st)
    return out


def stage_at(stages: list[Stage], step: int) -> tuple[int, Stage]:
    """(index, stage) active at optimizer step ``step`` (0-based). Past the last bounded stage,
    the last stage stays active."""
    end = 0
    for i, st in enumerate(stages):
        if st.steps is None:
            return i, st
        end += st.steps
        if step < end:
            return i, st
    return len(stages) - 1, stages[-1]



def lr_factor(stages: list[Stage], step: int, base_lr: float, warmup_steps: int = 0) -> float:
    """Multiplier of the optimizer's base learning rate at optimizer step ``step``: the linear
    warmup min(1, (step + 1) / warmup_steps) times stage.lr / base_lr for a stage with its own lr."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    lr = stage_at(stages, step)[1].lr
    return warm * (lr / base_lr if lr is not None else 1.0)
