"""Reading checkpoints safely (``weights_only=True``) and initialising a model from one.

Two formats are understood:
- Lightning checkpoints written by this project: ``state_dict`` holds the EMA weights when the
  ``EMAWeightAveraging`` callback was on, the raw weights are under ``current_model_state``;
- score_sde_pytorch checkpoints (``model`` with ``module.`` prefixes, ``ema.shadow_params``):
  mapped onto the network by :mod:`hosm_lightning.nets.checkpoint_import`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..checkpoint_io import read_checkpoint

__all__ = ["read_checkpoint", "verify_checkpoint", "load_weights", "init_from_checkpoint", "check_signature"]


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
        hint = (" (a score_sde_pytorch checkpoint: start from it with --model.init_from)" if "model" in ckpt else "")
        raise ValueError(f"{path} is not a Lightning checkpoint of this project (no 'state_dict' key){hint}")
    check_signature(ckpt, model.model_signature(), f"checkpoint {path}")
    _check_state(model, ckpt["state_dict"], path)
    if "current_model_state" in ckpt:
        _check_state(model, ckpt["current_model_state"], path)
    if for_resume and ("optimizer_states" not in ckpt or "global_step" not in ckpt):
        raise ValueError(f"{path} holds weights only (no optimizer state or step counter) and cannot resume a "
                         "run; start from its weights with --model.init_from instead of --ckpt_path")
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
        from ..nets.checkpoint_import import load_score_sde_checkpoint

        load_score_sde_checkpoint(model.net, path, use_ema=ema)
        return "score_sde"
    raise ValueError(
        f"{path}: unknown checkpoint format (keys {sorted(ckpt)[:6]}); expected a Lightning checkpoint "
        "('state_dict') or a score_sde_pytorch checkpoint ('model', 'ema')"
    )
