"""Shared fixtures. Plain helpers live in tests/helpers.py, the one reference implementation of the
DSM equations in tests/reference.py. End-to-end tests (CLI, DDP, FID, docs, benchmarks) and the
longest numerical checks (many ODE solves against closed forms) are marked ``slow``:
``pytest -m "not slow"`` is the quick inner loop; ``make test`` runs everything."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from helpers import ROOT, tiny_data, tiny_module, tiny_net, tiny_trainer


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state (tests that need randomness seed their own)."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _rank_zero():
    """Every test starts as global rank 0: a trainer that ran as another rank in this process leaves
    Lightning's ``rank_zero_only.rank`` behind, which silences loggers and warnings of later tests."""
    rank_zero_only.rank = 0


@pytest.fixture
def root():
    """The repository root (configs/, docs/, README.md)."""
    return ROOT


@pytest.fixture
def make_module():
    """Factory of tiny HOSMModules: ``make_module(dim=1, objective={...}, ode={...}, fit={...}, stages=[...])``."""
    return tiny_module


@pytest.fixture
def make_net():
    return tiny_net


@pytest.fixture
def make_data():
    """Factory of synthetic data modules at test size: ``make_data('mog1d', batch_size=...)``."""
    return tiny_data


@pytest.fixture
def make_trainer(tmp_path):
    """Factory of quiet CPU trainers rooted in the test's tmp_path: ``make_trainer(max_steps, callbacks, **kw)``."""
    return lambda max_steps=4, callbacks=(), **kw: tiny_trainer(tmp_path, max_steps, callbacks, **kw)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module of tiny networks: faster, and no OpenMP spinning on busy cores.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
