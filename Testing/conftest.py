"""Shared fixtures for the pytest suite (runs outside Slicer, on CPU)."""

from __future__ import annotations

import os
import shutil
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
    """The suite leaves nothing behind: every worker run's temp folder is removed.

    The session gets a temp root of its own (inherited by the processes it starts through
    TMPDIR), so runs in parallel on one machine do not see each other's folders.
    """
    root = Path(tempfile.mkdtemp(prefix="seghirescam-tests-"))
    saved_env, saved_tempdir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = str(root), str(root)
    try:
        yield
        left = sorted(str(path) for path in root.glob("SegHiResCAM-*"))
        assert not left, f"the tests left temp folders behind: {left}"
    finally:
        tempfile.tempdir = saved_tempdir
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env
        shutil.rmtree(root, ignore_errors=True)
