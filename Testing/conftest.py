"""Shared fixtures for the pytest suite (runs outside Slicer, on CPU)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_torch():
    """Seed torch, and give back torch's thread count, which a test may lower for reproducibility."""
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def _leaves_no_temp_folders():
    """The suite leaves nothing behind: every worker run's temp folder is removed."""
    root = Path(tempfile.gettempdir())
    before = set(root.glob("SegHiResCAM-*"))
    yield
    left = sorted(str(path) for path in set(root.glob("SegHiResCAM-*")) - before)
    assert not left, f"the tests left temp folders behind: {left}"
