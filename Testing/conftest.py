"""Shared fixtures for the pytest suite (runs outside Slicer, on CPU)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield
