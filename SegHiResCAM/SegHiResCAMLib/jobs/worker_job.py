"""One request run in a worker process, as a job: start, poll from a timer or wait, cancel, result.

Qt-free, so the Slicer widget (polling from a QTimer), the Slicer console (blocking ``wait``) and
pytest drive the same code. Subclasses say which request to write (``_request``) and what to do
with the result event (``_finish``); everything else, from progress to the one-line error, is here.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from .. import errors
from ..errors import CancelledError, InternalError, JobStateError, JobTimeoutError, SegHiResCAMError
from ..worker.launcher import WorkerProcess
from ..worker.protocol import Request

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[float, str], None]


class WorkerJob:
    """A request run by ``python -m SegHiResCAMLib.worker`` in its own process and temp folder.

    Args:
        python_executable: interpreter for the worker (``PythonSlicer`` in Slicer).
        progress: called with (fraction, message) as the worker reports progress.
        env: extra environment variables for the worker.
        temp_root: where the run's temp folder goes (``slicer.app.temporaryPath`` in Slicer);
            None = the system's.

    Attributes:
        state: "new" -> "running" -> "done" | "failed" | "cancelled".
        warnings: the worker's warnings, in order.
        error: the error of a failed job.
        seconds: the worker's time for a finished job.
    """

    #: What the job does, for messages ("the explanation was cancelled").
    what = "job"

    def __init__(self, python_executable: str | os.PathLike | None = None, progress: ProgressCallback | None = None,
                 env: dict[str, str] | None = None, temp_root: str | os.PathLike | None = None) -> None:
        self.python_executable = python_executable
        self.temp_root = temp_root
        self.progress = progress
        self._env = dict(env or {})
        self.state = "new"
        self.seconds: float | None = None
        self.warnings: list[str] = []
        self.error: SegHiResCAMError | None = None
        self._worker: WorkerProcess | None = None
        self._started_at: float | None = None

    # -- what a kind of job adds ---------------------------------------------------------
    def _check_inputs(self) -> None:
        """Refuse bad inputs before any process starts."""

    def _request(self, worker: WorkerProcess) -> Request:
        """Write the inputs into the worker's temp folder; return the request."""
        raise NotImplementedError

    def _finish(self, event: dict[str, Any]) -> None:
        """Use the result event (the worker's files still exist); set ``state = "done"``."""
        raise NotImplementedError

    def _result(self) -> Any:
        raise NotImplementedError

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Check the inputs, write them to the temp folder and start the worker."""
        if self.state != "new":
            raise JobStateError(f"this job was already started; make a new {type(self).__name__}")
        self._check_inputs()
        worker = WorkerProcess(self.python_executable, env=self._env, temp_root=self.temp_root)
        try:
            request = self._request(worker)
            self._started_at = time.monotonic()
            worker.start(request)
        except BaseException:
            worker.close()
            raise
        self._worker = worker
        self.state = "running"

    def poll(self) -> bool:
        """Handle the events that arrived; True once the job has ended (any outcome)."""
        if self.state != "running":
            return self.state != "new"
        return self._consume(self._worker.poll())

    def wait(self, timeout: float | None = None):
        """Block until the job ends; return its result or raise the job's error.

        Raises:
            SegHiResCAMError: the worker reported an error (its one-line message).
            CancelledError: the job was cancelled.
            JobTimeoutError: ``timeout`` seconds passed; the job was cancelled (a TimeoutError).
        """
        if self.state == "new":
            self.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.state == "running":
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                self.cancel()
                raise JobTimeoutError(f"the {self.what} did not finish within {timeout} s and was cancelled")
            # Blocks on the worker's event queue, so this loop sleeps while the worker computes.
            step = 0.5 if remaining is None else min(remaining, 0.5)
            self._consume(self._worker.wait(timeout=step))
        return self.result()

    def cancel(self) -> None:
        """Kill the worker (and its children) and remove the temp folder; nothing else changes."""
        if self.state in ("done", "failed", "cancelled"):
            return
        self.state = "cancelled"
        if self._worker is not None:
            self._worker.cancel()
            self._worker = None

    def result(self):
        """The result of a finished job; raises the job's error otherwise."""
        if self.state == "done":
            return self._result()
        if self.state == "cancelled":
            raise CancelledError(f"the {self.what} was cancelled")
        if self.state == "failed" and self.error is not None:
            raise self.error
        raise JobStateError(f"the job has no result (state: {self.state})")

    @property
    def temp_dir(self):
        """The running job's temp folder (None before start and after the end)."""
        return self._worker.temp_dir if self._worker is not None else None

    @property
    def worker_pid(self) -> int | None:
        return self._worker.pid if self._worker is not None else None

    # -- events ------------------------------------------------------------------------
    def _consume(self, events: list[dict[str, Any]]) -> bool:
        """Handle events in order; close the worker once the job has ended. True if ended."""
        try:
            for event in events:
                self._handle(event)
                if self.state != "running":
                    break
            if self.state == "running" and self._worker.finished:
                self._fail(SegHiResCAMError("the SegHiResCAM worker ended without sending a result"))
        except BaseException as error:
            self.state = "failed"
            self.error = error if isinstance(error, SegHiResCAMError) else None
            self._close()
            raise
        if self.state != "running":
            self._close()
        return self.state != "running"

    def _handle(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "progress":
            if self.progress is not None:
                self.progress(float(event.get("fraction", 0.0)), str(event.get("message", "")))
        elif kind == "warning":
            message = str(event.get("message", ""))
            self.warnings.append(message)
            logger.warning("SegHiResCAM: %s", message)
        elif kind == "error":
            self._fail(error_from_event(event))
        elif kind == "result":
            self._finish(event)
            self.seconds = float(event.get("seconds", time.monotonic() - (self._started_at or time.monotonic())))

    def _fail(self, error: SegHiResCAMError) -> None:
        if isinstance(error, InternalError) and self._worker is not None:
            # The traceback went to the worker's stderr: keep it where a bug report can find it.
            logger.error("SegHiResCAM worker failed; its last output:\n%s", "\n".join(self._worker.stderr_tail))
        self.error = error
        self.state = "failed"

    def _close(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None


def error_from_event(event: dict[str, Any]) -> SegHiResCAMError:
    """The exception for a worker error event, of the class the worker named when it is ours."""
    message = str(event.get("message") or "the SegHiResCAM worker failed without a message")
    message = message.strip().splitlines()[0] if message.strip() else message
    name = event.get("type") or event.get("error_type")
    cls = getattr(errors, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, SegHiResCAMError)):
        cls = SegHiResCAMError
    return cls(message)
