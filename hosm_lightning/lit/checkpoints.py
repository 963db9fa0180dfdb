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

__all__ = ["read_checkpoint", "load_weights", "init_from_checkpoint", "check_signature"]


def read_checkpoint(path: str | Path) -> dict:
    """``torch.load(path, weights_only=True)`` with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass the path of a .ckpt/.pth file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling error, truncated file, foreign objects ...
        raise ValueError(f"cannot read checkpoint {path} with weights_only=True: {err}") from err
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} is not a checkpoint dictionary")
    return ckpt


def check_signature(checkpoint: dict, expected: dict, where: str) -> None:
    """Raise if a checkpoint was trained with another SDE / parameterisation than configured."""
    saved = checkpoint.get("hosm_signature")
    if saved is not None and saved != expected:
        raise ValueError(
            f"{where} was trained with {saved} but the configuration says {expected}: "
            "use the model section of the config it was trained with"
        )


def _load_state(model: nn.Module, state: dict, path: Path) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: {tuple(v.shape)} in file vs {tuple(own[k].shape)}" for k, v in state.items()
              if k in own and v.shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"checkpoint {path} does not match the configured model: missing keys {missing[:5]}, "
            f"unexpected keys {unexpected[:5]}, shape mismatches {shapes[:3]}; "
            "use the model section of the config the checkpoint was trained with"
        )
    model.load_state_dict(state)


def load_weights(model, ckpt_path: str | Path, ema: bool = True) -> dict:
    """Load a Lightning checkpoint of this project into ``model`` (a HOSMModule).

    ``ema=True`` takes ``state_dict`` (the EMA weights when EMA was on); ``ema=False`` takes the raw
    weights (``current_model_state``) when the checkpoint has them.
    """
    path = Path(ckpt_path)
    ckpt = read_checkpoint(path)
    if "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a Lightning checkpoint (no 'state_dict' key)")
    check_signature(ckpt, model.model_signature(), f"checkpoint {path}")
    state = ckpt["state_dict"] if ema or "current_model_state" not in ckpt else ckpt["current_model_state"]
    _load_state(model, state, path)
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
