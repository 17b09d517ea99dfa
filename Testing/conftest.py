"""Shared fixtures for the pytest suite (runs outside Slicer, on CPU)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch


# SEGHIRESCAM_TEST_THREADS=N runs the whole session (module fixtures included) with N torch threads.
# The suite must pass with any count: float32 sums change with the thread count (and the CPU), so no
# tolerance may depend on one; comparisons that are exact rely only on one count within the session.
TEST_THREADS = os.environ.get("SEGHIRESCAM_TEST_THREADS")
if TEST_THREADS:
    torch.set_num_threads(int(TEST_THREADS))


@pytest.fixture(autouse=True)
def _deterministic_torch():
    """Seed torch, and give back torch's thread count, which a test may lower for reproducibility."""
    threads = torch.get_num_threads()
    if TEST_THREADS:
        torch.set_num_threads(int(TEST_THREADS))
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


def _cannot_write_in(folder) -> bool:
    try:
        handle, probe = tempfile.mkstemp(dir=folder)
    except OSError:
        return True
    os.close(handle)
    os.unlink(probe)
    return False


@pytest.fixture
def unwritable_folder(tmp_path):
    """A folder where creating a file fails: read-only by mode, or, for root (whom modes do not stop), /sys."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if _cannot_write_in(folder):
            yield folder
        elif os.path.isdir("/sys") and _cannot_write_in("/sys"):  # sysfs refuses new files even to root
            yield Path("/sys")
        else:
            pytest.skip("running as root, and no folder here refuses writing to root (no /sys)")
    finally:
        folder.chmod(0o700)
