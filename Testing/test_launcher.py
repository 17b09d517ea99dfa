"""The worker launcher against the real worker process (``python -m SegHiResCAMLib.worker``).

Covers what the Slicer panel relies on: progress lines then one result, a result file
with the input's geometry, and one one-line error per bad input. Cancel behind a launcher,
as Slicer runs the worker, is in test_launcher_cancel.py.
"""

from __future__ import annotations

import os
import stat
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from SegHiResCAMLib.io.images import read_image, write_image
from SegHiResCAMLib.settings import ExplainSettings
from SegHiResCAMLib.volume import Volume
from SegHiResCAMLib.worker.launcher import WorkerProcess
from SegHiResCAMLib.worker.protocol import ExplainRequest
from tolerances import geometry_atol

# Every test here starts a fresh Python + torch process: the slow half of the suite.
pytestmark = pytest.mark.process

MODEL = Path(__file__).resolve().parents[1] / "SegHiResCAM" / "Resources" / "Models" / "SelfTestBallUNet.pt"
IJK_TO_RAS = np.array([[-1.2, 0, 0, 20.0], [0, -1.2, 0, -5.0], [0, 0, 2.0, 7.0], [0, 0, 0, 1]])
CENTRE, RADIUS = np.array([12.0, 18.0, 15.0]), 5.0


def ball_volume(size: int = 32) -> tuple[Volume, np.ndarray]:
    """Noise with a bright ball (what the self-test model segments) and the ball's mask."""
    rng = np.random.default_rng(1)
    grid = np.indices((size,) * 3)
    ball = ((grid - CENTRE[:, None, None, None]) ** 2).sum(0) <= RADIUS**2
    image = rng.normal(100.0, 10.0, (size,) * 3) + 30.0 * ball
    return Volume(image.astype(np.float32), IJK_TO_RAS), ball


def start_worker(worker: WorkerProcess, tmp_path: Path, size: int = 32, **fields) -> Path:
    """Write the image (and ROI) into the run's temp folder, then start the real worker."""
    volume, ball = ball_volume(size)
    image = worker.path("image.nrrd")
    write_image(volume, image)
    roi = worker.path("roi.nrrd")
    write_image(volume.with_array(ball.astype(np.uint8)), roi)
    output = worker.path("heatmap.nrrd")
    paths = dict(images=[str(image)], model=str(MODEL), outputs=[str(output)], roi=str(roi), roi_label=1)
    paths.update({key: fields.pop(key) for key in list(fields) if key in paths})
    if "image" in fields:
        paths["images"] = [fields.pop("image")]
    settings = dict(ExplainSettings(target_class=1, device="cpu").to_dict(), **fields)
    worker.start({"kind": "explain", **paths, "settings": settings})  # as written, for the worker to check
    return output


def gone(pid: int) -> bool:
    """True when the process no longer exists (or is only a zombie waiting to be reaped)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_worker_streams_progress_then_one_result_with_a_heatmap_file(tmp_path):
    with WorkerProcess() as worker:
        output = start_worker(worker, tmp_path)
        events = worker.wait(timeout=120)
        kinds = [e["event"] for e in events]
        assert kinds.count("result") == 1 and kinds[-1] == "result", kinds
        assert "error" not in kinds
        fractions = [e["fraction"] for e in events if e["event"] == "progress"]
        assert len(fractions) >= 2 and fractions == sorted(fractions) and 0.0 <= fractions[0] <= fractions[-1] <= 1.0
        result = events[-1]
        assert Path(result["output"]) == output and result["device"] == "cpu" and result["seconds"] > 0
        heatmap = read_image(output)
        np.testing.assert_allclose(heatmap.ijk_to_ras, IJK_TO_RAS, rtol=0, atol=geometry_atol(IJK_TO_RAS))  # NRRD
        assert heatmap.array.shape == (32, 32, 32)
        assert worker.returncode == 0 and worker.finished
        temp_dir = worker.temp_dir
        assert temp_dir.is_dir()
    assert not temp_dir.exists(), "the temp folder must go when the run is closed"


def test_poll_never_blocks_and_delivers_the_same_events_as_wait(tmp_path):
    with WorkerProcess() as worker:
        start_worker(worker, tmp_path)
        started = time.monotonic()
        first = worker.poll()
        assert time.monotonic() - started < 0.5  # a GUI timer tick must not wait for the worker
        events = list(first)
        deadline = time.monotonic() + 120
        while not worker.finished and time.monotonic() < deadline:
            events.extend(worker.poll())
            time.sleep(0.05)
        events.extend(worker.poll())
        assert worker.finished
        assert [e["event"] for e in events][-1] == "result"
        assert worker.poll() == []


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"model": "/no/such/model.pt"}, "does not exist"),
        ({"layers": ["decoder.99"]}, "decoder.99"),
        ({"target_class": 7}, "class 7"),
        ({"methods": ["no-such-cam"]}, "no-such-cam"),
        ({"image": "/no/such/image.nrrd"}, "image.nrrd"),
    ],
    ids=["missing-model", "unknown-layer", "unknown-class", "unknown-method", "missing-image"],
)
def test_each_bad_input_gives_one_single_line_error(tmp_path, fields, expected):
    with WorkerProcess() as worker:
        start_worker(worker, tmp_path, **fields)
        events = worker.wait(timeout=120)
        errors = [e for e in events if e["event"] == "error"]
        assert len(errors) == 1 and not any(e["event"] == "result" for e in events), events
        message = errors[0]["message"]
        assert "\n" not in message and expected in message, message
        assert worker.returncode == 1


def test_a_malformed_request_is_refused_with_one_error_and_exit_status_2(tmp_path):
    with WorkerProcess() as worker:
        # A request with a field this worker does not know, as a newer Slicer module might send.
        worker.start({"image": "x.nrrd", "model": "m.pt", "output": "o.nrrd", "no_such_field": 1})
        events = worker.wait(timeout=120)
        assert [e["event"] for e in events] == ["error"], events
        assert "\n" not in events[0]["message"] and "no_such_field" in events[0]["message"]
        assert worker.returncode == 2


def test_a_worker_that_dies_silently_is_reported_as_one_error(tmp_path):
    # An interpreter that cannot run the worker at all (a wrong PythonSlicer, a crash at import).
    broken = tmp_path / "BrokenPython"
    broken.write_text("#!/bin/sh\necho 'Fatal Python error: init failed' >&2\nexit 3\n")
    broken.chmod(broken.stat().st_mode | stat.S_IEXEC)
    with WorkerProcess(python_executable=broken) as worker:
        worker.start(ExplainRequest(images=("x.nrrd",), model="m.pt", outputs=("o.nrrd",),
                                    settings=ExplainSettings(target_class=1)))
        events = worker.wait(timeout=30)
    assert [e["event"] for e in events] == ["error"]
    assert "exit status 3" in events[0]["message"] and "init failed" in events[0]["message"]
    assert not worker.temp_dir.exists()


def test_temp_folder_is_removed_when_the_caller_raises(tmp_path):
    with pytest.raises(RuntimeError, match="caller failed"):
        with WorkerProcess() as worker:
            start_worker(worker, tmp_path)
            pid, temp_dir = worker.pid, worker.temp_dir
            raise RuntimeError("caller failed")
    assert not temp_dir.exists()
    assert gone(pid)


def test_worker_finds_the_library_through_pythonpath_from_any_folder(tmp_path, monkeypatch):
    # The launcher puts the module's folder on PYTHONPATH, as Slicer needs (no pip install there).
    monkeypatch.chdir(tmp_path)
    with WorkerProcess(env={"PYTHONNOUSERSITE": "1"}) as worker:
        env = worker._environment()
        library_parent = Path(env["PYTHONPATH"].split(os.pathsep)[0])
        assert (library_parent / "SegHiResCAMLib" / "worker" / "__main__.py").is_file()
        assert env["PYTHONUNBUFFERED"] == "1" and env["PYTHONNOUSERSITE"] == "1"


def test_worker_runs_with_the_fast_allocator_unless_the_user_chose_otherwise(monkeypatch):
    from SegHiResCAMLib.worker.launcher import FAST_ALLOCATOR

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345")
    with WorkerProcess() as worker:
        env = worker._environment()
    assert env["MALLOC_MMAP_THRESHOLD_"] == FAST_ALLOCATOR["MALLOC_MMAP_THRESHOLD_"] == str(4 * 2**30)
    assert env["MALLOC_TRIM_THRESHOLD_"] == "12345"
