"""What a data module offers the model and the callbacks: one small typed interface.

Callbacks, the module and the CLI never read a data module's attributes one by one; they ask
:func:`describe` for a :class:`DataSpec`. Our data modules implement ``data_spec()``; any other
LightningDataModule gets a spec with nothing known (shape ``None``, no exact density), so the
callbacks fall back to what the batches show.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from torch import Tensor

__all__ = ["DataSpec", "describe"]


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Description of a data set in the model's space.

    Attributes:
        shape: one sample's shape, (D,) for low-dimensional data or (C, H, W) for images; None if unknown.
        discrete: evaluation batches are uint8 levels (bits/dim with dequantization), not floats (NLL in nats).
        levels: L, the number of grey levels of discrete data (uint8 values 0..L−1; 256 for 8-bit images).
        centered: the model range of 8-bit data: [−1, 1] (True) or [0, 1] (False); see core/data_range.py.
        name: a short name of the data set (figure titles, records).
        entropy: the exact entropy when known, in the unit of the split's metric (nats per sample for
            float data, bits/dim for 8-bit data): the best achievable NLL / bits/dim.
        log_prob: exact log q₀(x) (nats, [N]) of model-space points [N, *shape], when known.
        log_prob_bytes: exact log P(k) (nats, [N]) of uint8 samples [N, *shape] (discrete data), when known.
        mixture: the data as a Gaussian mixture (closed-form q_t, scores and samples at every t), when it is one.
        sample: draws of the data distribution, ``sample(n) -> [n, *shape]`` (reference points in plots).
        reference_images: uint8 [N, C, H, W] images, the FID reference set (image data).
    """

    shape: tuple[int, ...] | None = None
    discrete: bool = False
    levels: int = 256
    centered: bool = True
    name: str | None = None
    entropy: float | None = None
    log_prob: Callable[[Tensor], Tensor] | None = None
    log_prob_bytes: Callable[[Tensor], Tensor] | None = None
    mixture: object | None = None
    sample: Callable[[int], Tensor] | None = None
    reference_images: Callable[[], Tensor] | None = None

    @property
    def dim(self) -> int | None:
        """Flattened dimension D of one sample (None if the shape is unknown)."""
        if self.shape is None:
            return None
        d = 1
        for n in self.shape:
            d *= int(n)
        return d

    @property
    def is_image(self) -> bool:
        return self.shape is not None and len(self.shape) == 3


def describe(datamodule) -> DataSpec:
    """The :class:`DataSpec` of a data module: its ``data_spec()``, or an empty spec for foreign data."""
    if datamodule is not None and callable(getattr(type(datamodule), "data_spec", None)):
        spec = datamodule.data_spec()
        if not isinstance(spec, DataSpec):
            raise TypeError(f"{type(datamodule).__name__}.data_spec() must return a DataSpec, got {type(spec).__name__}")
        return spec
    return DataSpec()
