"""Shared fixtures for the pytest suite (runs outside Slicer, on CPU)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_torch():
    """Seed torch, and give back torch's thread count, which a test may lower for reproducibility."""
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
