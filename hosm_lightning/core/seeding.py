"""Deterministic seeds derived from (seed, rank, step, tag): per-rank randomness without shared state.

``seed_everything`` gives every DDP rank the same seed, so t, z and the probe v would be identical on
every rank. We derive a generator for each (seed, rank, step, purpose) instead: runs are
reproducible, ranks differ, and a resumed run draws exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts) -> int:
    """A 63-bit integer seed that depends on every part (ints/strings)."""
    key = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2**63 - 1)


def make_generator(*parts, device=None) -> torch.Generator:
    """A torch.Generator on ``device`` seeded with :func:`derive_seed` of ``parts``."""
    g = torch.Generator(device=device if device is not None else "cpu")
    g.manual_seed(derive_seed(*parts))
    return g
