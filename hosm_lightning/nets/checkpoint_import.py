"""Read and write score_sde_pytorch checkpoints (Song et al. 2021) for our U-Nets.

Format (``torch.save`` of a dict):

* ``model``: state dict of a ``torch.nn.DataParallel`` model, so every key starts with ``module.``;
* ``ema``: ``{'decay', 'num_updates', 'shadow_params'}``; ``shadow_params`` is a list of tensors in
  ``model.parameters()`` order, restricted to the parameters with ``requires_grad`` (score_sde's
  Fourier frequencies ``W`` are a frozen parameter and are not in it);
* ``optimizer`` (an Adam state dict) and ``step`` (int).

Key mapping. :class:`~.ddpmpp.DDPMpp` and :class:`~.ncsnpp.NCSNpp` keep their layers in one
``all_modules`` ModuleList, in the order in which score_sde builds its own, with the same sub-module
and parameter names; after stripping ``module.`` the keys coincide with ours (``all_modules.0.W``,
``all_modules.5.GroupNorm_0.weight``, ``all_modules.8.NIN_0.W`` …), and the EMA list lines up with
``[p for p in net.parameters() if p.requires_grad]``. Some score_sde versions also store the
discrete noise levels as a buffer ``sigmas``; that key is ignored: the weights carry no noise
schedule, and our nets receive σ(t) from the SDE at call time (``ScoreModel`` passes
``sigma = sde.marginal(t)[1]``), so an imported NCSN++ follows the VE SDE it is wrapped with. Loading checks names *and* shapes one-to-one and raises a single ``ValueError`` otherwise.
For other layouts pass ``key_map`` (file key → our key, or None to drop), or ``match='order'`` to map
the i-th tensor of the file onto our i-th state-dict entry after checking that every shape agrees.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from ..checkpoint_io import read_checkpoint

__all__ = ["load_score_sde_checkpoint", "save_score_sde_checkpoint", "IGNORED_KEYS"]

#: file keys (after stripping ``module.``) that have no counterpart in our nets
IGNORED_KEYS = ("sigmas",)
_SHOW = 5


def _read(path: Path) -> dict:
    ckpt = read_checkpoint(path)  # the project's one reader (weights_only=True, one-line errors)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        keys = sorted(ckpt)[:6] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: not a score_sde_pytorch checkpoint (expected a dict with a 'model' state dict, got {keys})")
    return ckpt


def _strip(state: dict) -> dict[str, Tensor]:
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def _map_by_order(src: dict[str, Tensor], own: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    if len(src) != len(own):
        raise ValueError(f"{path}: {len(src)} tensors in the file vs {len(own)} in the network; cannot map by order")
    out = {}
    for i, ((fk, fv), (ok, ov)) in enumerate(zip(src.items(), own.items())):
        if fv.shape != ov.shape:
            raise ValueError(
                f"{path}: first shape mismatch at entry {i}: file {fk} {tuple(fv.shape)} vs network {ok} {tuple(ov.shape)}"
            )
        out[ok] = fv
    return out


def _check_keys(state: dict[str, Tensor], own: dict[str, Tensor], path: Path) -> None:
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(v.shape)} vs network {tuple(own[k].shape)}"
              for k, v in state.items() if k in own and v.shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{path} does not match the network's architecture: {len(missing)} missing keys {missing[:_SHOW]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:_SHOW]}, {len(shapes)} shape mismatches "
            f"{shapes[:_SHOW]}; build the net with the configuration the checkpoint was trained with"
        )


def load_score_sde_checkpoint(
    net: nn.Module,
    path,
    use_ema: bool = True,
    key_map: Callable[[str], str | None] | None = None,
    match: str = "name",
) -> dict:
    """Load a score_sde_pytorch checkpoint into ``net`` (in place) and return its metadata.

    Args:
        net: the network (not a DataParallel/DDP wrapper; ``module.`` prefixes are stripped from the file).
        path: checkpoint file.
        use_ema: replace the trainable parameters by ``ema.shadow_params`` (the weights score_sde
            evaluates with) after loading ``model``.
        key_map: optional renaming of file keys (after stripping ``module.``) to our keys; returning
            None drops the entry. Applied before matching.
        match: ``'name'`` (keys must coincide) or ``'order'`` (i-th file entry → i-th entry of our state
            dict; every shape must agree).

    Returns:
        ``{'path', 'step', 'used_ema', 'ema_decay', 'ema_num_updates', 'ignored_keys'}``.

    Raises:
        ValueError: unreadable / non-checkpoint file (names the path), missing or unexpected keys,
            shape mismatches, or an EMA list that does not fit the trainable parameters.
    """
    if match not in ("name", "order"):
        raise ValueError(f"match must be 'name' or 'order', got {match!r}")
    path = Path(path)
    ckpt = _read(path)
    src = _strip(ckpt["model"])
    if key_map is not None:
        src = {nk: v for nk, v in ((key_map(k), v) for k, v in src.items()) if nk is not None}
    ignored = [k for k in src if k in IGNORED_KEYS]
    src = {k: v for k, v in src.items() if k not in IGNORED_KEYS}
    own = net.state_dict()
    if match == "order":
        src = _map_by_order(src, own, path)
    _check_keys(src, own, path)

    shadow = None
    if use_ema:
        ema = ckpt.get("ema")
        if not isinstance(ema, dict) or not isinstance(ema.get("shadow_params"), (list, tuple)):
            raise ValueError(f"{path}: use_ema=True but the checkpoint has no 'ema' with 'shadow_params'")
        shadow = list(ema["shadow_params"])
        trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
        if len(shadow) != len(trainable):
            raise ValueError(
                f"{path}: ema.shadow_params has {len(shadow)} tensors but the network has {len(trainable)} trainable parameters"
            )
        for i, (s, (n, p)) in enumerate(zip(shadow, trainable)):
            if not isinstance(s, Tensor) or s.shape != p.shape:
                got = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
                raise ValueError(f"{path}: ema.shadow_params[{i}] has shape {got} but parameter {n} has {tuple(p.shape)}")

    net.load_state_dict(src, strict=True)
    if shadow is not None:
        with torch.no_grad():
            for s, p in zip(shadow, (p for p in net.parameters() if p.requires_grad)):
                p.copy_(s)
    ema = ckpt.get("ema") if isinstance(ckpt.get("ema"), dict) else {}
    return {
        "path": str(path),
        "step": int(ckpt["step"]) if isinstance(ckpt.get("step"), (int, Tensor)) else None,
        "used_ema": shadow is not None,
        "ema_decay": ema.get("decay"),
        "ema_num_updates": ema.get("num_updates"),
        "ignored_keys": ignored,
    }


def save_score_sde_checkpoint(
    net: nn.Module,
    path,
    step: int = 0,
    ema_decay: float = 0.9999,
    ema_params: list[Tensor] | None = None,
    lr: float = 2e-4,
) -> None:
    """Write ``net`` in score_sde_pytorch's format (keys ``'module.' + our name``).

    ``ema_params``: shadow parameters (one per trainable parameter, in ``parameters()`` order);
    default a copy of the current weights. ``optimizer`` is a fresh Adam state dict (no moments)
    with learning rate ``lr``, so score_sde's own ``restore_checkpoint`` can read the file.
    """
    trainable = [p for p in net.parameters() if p.requires_grad]
    if ema_params is None:
        ema_params = [p.detach().clone() for p in trainable]
    ema_params = [e.detach().cpu().clone() for e in ema_params]
    if len(ema_params) != len(trainable) or any(e.shape != p.shape for e, p in zip(ema_params, trainable)):
        raise ValueError("ema_params must have one tensor per trainable parameter, with the same shapes")
    model = {"module." + k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    optimizer = {
        "state": {},
        "param_groups": [{"lr": lr, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False,
                          "params": list(range(len(trainable)))}],
    }
    ckpt = {
        "optimizer": optimizer,
        "model": model,
        "ema": {"decay": float(ema_decay), "num_updates": int(step), "shadow_params": ema_params},
        "step": int(step),
    }
    torch.save(ckpt, Path(path))
