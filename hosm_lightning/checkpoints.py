"""Reading checkpoints safely (``weights_only=True``), finding a run's resume point, and initialising
a model from a checkpoint.

Two formats are understood:
- Lightning checkpoints written by this project: ``state_dict`` holds the EMA weights when the
  ``EMAWeightAveraging`` callback was on, the raw weights are under ``current_model_state``;
- score_sde_pytorch checkpoints (``model`` with ``module.`` prefixes, ``ema.shadow_params``):
  mapped onto the network by :mod:`hosm_lightning.nets.checkpoint_import`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .checkpoint_io import read_checkpoint, saved_step

__all__ = ["read_checkpoint", "verify_checkpoint", "load_weights", "init_from_checkpoint", "check_signature",
           "ResumePoint", "find_resume_point"]


def check_signature(checkpoint: dict, expected: dict, where: str) -> None:
    """Raise if a checkpoint was trained with another SDE / parameterisation than configured."""
    saved = checkpoint.get("hosm_signature")
    if saved is not None and saved != expected:
        raise ValueError(
            f"{where} was trained with {saved} but the configuration says {expected}: "
            "use the model section of the config it was trained with"
        )


def _check_state(model: nn.Module, state: dict, path: Path) -> None:
    """Raise one error naming the file and the first missing/unexpected keys and shape mismatches."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: {tuple(v.shape)} in file vs {tuple(own[k].shape)} configured" for k, v in state.items()
              if k in own and hasattr(v, "shape") and v.shape != own[k].shape]
    if missing or unexpected or shapes:
        found = "; ".join(part for part in (
            f"shape mismatches {shapes[:3]}" if shapes else "",
            f"missing keys {missing[:5]}" if missing else "",
            f"unexpected keys {unexpected[:5]}" if unexpected else "") if part)
        raise ValueError(
            f"checkpoint {path} does not match the configured model (another architecture or data "
            f"dimension): {found}; use the model section of the config the checkpoint was trained with"
        )


def verify_checkpoint(model, ckpt_path: str | Path, for_resume: bool = False) -> dict:
    """Check, without loading anything into ``model``, that ``ckpt_path`` is a Lightning checkpoint of
    this project that fits ``model`` (a HOSMModule): readable with ``weights_only=True``, same SDE and
    parameterisation, same parameter names and shapes. Every subcommand calls this before Lightning
    (or :func:`load_weights`) reads the file, so a wrong file ends with one line naming it.

    ``for_resume`` also requires the training state (optimizer, step counter) that ``fit --ckpt_path``
    resumes from. Returns the checkpoint dictionary (tensors memory-mapped).
    """
    path = Path(ckpt_path)
    ckpt = read_checkpoint(path, mmap=True)
    if "state_dict" not in ckpt:
        hint = " (a score_sde_pytorch checkpoint: start from it with --model.fit.init_from)" if "model" in ckpt else ""
        raise ValueError(f"{path} is not a Lightning checkpoint of this project (no 'state_dict' key){hint}")
    check_signature(ckpt, model.model_signature(), f"checkpoint {path}")
    _check_state(model, ckpt["state_dict"], path)
    if "current_model_state" in ckpt:
        _check_state(model, ckpt["current_model_state"], path)
    if for_resume and ("optimizer_states" not in ckpt or "global_step" not in ckpt):
        raise ValueError(f"{path} holds weights only (no optimizer state or step counter) and cannot resume a "
                         "run; start from its weights with --model.fit.init_from instead of --ckpt_path")
    return ckpt


def load_weights(model, ckpt_path: str | Path, ema: bool = True) -> dict:
    """Load a Lightning checkpoint of this project into ``model`` (a HOSMModule).

    ``ema=True`` takes ``state_dict`` (the EMA weights when EMA was on); ``ema=False`` takes the raw
    weights (``current_model_state``) when the checkpoint has them.
    """
    path = Path(ckpt_path)
    ckpt = verify_checkpoint(model, path)
    state = ckpt["state_dict"] if ema or "current_model_state" not in ckpt else ckpt["current_model_state"]
    model.load_state_dict(state)
    return ckpt


def init_from_checkpoint(model, path: str | Path, ema: bool = True) -> str:
    """Initialise ``model``'s network from a checkpoint (weights only: no optimizer, no step).

    Returns the detected format: 'lightning' or 'score_sde'.
    """
    ckpt = read_checkpoint(path)
    if "state_dict" in ckpt:
        load_weights(model, path, ema=ema)
        return "lightning"
    if "model" in ckpt:
        from .nets.checkpoint_import import load_score_sde_checkpoint

        load_score_sde_checkpoint(model.net, path, use_ema=ema)
        return "score_sde"
    raise ValueError(
        f"{path}: unknown checkpoint format (keys {sorted(ckpt)[:6]}); expected a Lightning checkpoint "
        "('state_dict') or a score_sde_pytorch checkpoint ('model', 'ema')"
    )


# -- `fit --ckpt_path last`: the newest readable checkpoint of the run ------------------------------
@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint ``fit --ckpt_path last`` resumes from, and a note when it is not ``last.ckpt``."""

    path: str
    step: int
    note: str | None = None


def _shown(path) -> str:
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else str(path)


def _resumable(path: Path) -> tuple[int | None, str | None]:
    """(step, None) for a checkpoint that can resume a run, else (None, why not)."""
    try:
        ckpt = read_checkpoint(path, mmap=True)
    except (ValueError, FileNotFoundError) as err:
        found = re.search(r"not a readable checkpoint \((.*)\); pass", str(err))
        return None, re.split(r"\.\s", found.group(1) if found else str(err))[0]
    if "optimizer_states" not in ckpt or "global_step" not in ckpt:
        return None, "weights only, no training state"
    return int(ckpt["global_step"]), None


def find_resume_point(dirs) -> ResumePoint | None:
    """The newest checkpoint in ``dirs`` that can resume the run, or None when there is none at all.

    ``last.ckpt`` is taken when it is readable. Otherwise every other ``*.ckpt`` of the run is a
    candidate, newest step first (the step is read from the file's pickled record, so even a cut-off
    file's step is known), and the note says which file is used and how many steps are lost.
    Raises ValueError when checkpoints exist but none of them can resume the run.
    """
    files = sorted({Path(d, f) for d in dirs if d and os.path.isdir(d) for f in os.listdir(d)
                    if f.endswith(".ckpt") and not f.startswith(".")})
    if not files:
        return None
    last = [f for f in files if f.name == "last.ckpt"]
    if last:
        step, why = _resumable(last[0])
        if step is not None:
            return ResumePoint(str(last[0]), step)
    others = sorted((f for f in files if f.name != "last.ckpt"),
                    key=lambda f: (_step_or(f, -1), f.stat().st_mtime), reverse=True)
    reasons = [f"{last[0].name}: {why}"] if last else []
    for f in others:
        step, why_not = _resumable(f)
        if step is None:
            reasons.append(f"{f.name}: {why_not}")
            continue
        return ResumePoint(str(f), step, _fallback_note(last[0] if last else None, why if last else None, f, step))
    raise ValueError(f"no checkpoint in {_shown(files[0].parent)} can resume the run ({'; '.join(reasons)}): "
                     "start a new run in another folder with --trainer.default_root_dir")


def _fallback_note(last: Path | None, why: str | None, used: Path, step: int) -> str:
    if last is None:
        return f"no last.ckpt in {_shown(used.parent)}: resuming from {_shown(used)} (step {step})"
    lost = saved_step(last)
    if lost is None:
        cost = f"the steps after {step} are trained again (how many is unknown: {last.name} holds no readable step)"
    elif lost > step:
        cost = f"{lost - step} steps ({step + 1}-{lost}) are trained again"
    else:
        cost = f"no step is lost ({last.name} was at step {lost})"
    return (f"{_shown(last)} is not readable ({why}): resuming from {_shown(used)} (step {step}), "
            f"the newest readable checkpoint; {cost}")


def _step_or(path: Path, default: int) -> int:
    step = saved_step(path)
    return default if step is None else step
