"""Start the worker process, read its JSON-line events, cancel it, and clean up after it.

Qt-free, so that the Slicer widget (polling from a QTimer), scripts (blocking ``wait``)
and pytest all drive the same code. One :class:`WorkerProcess` is one run: it owns a
temporary folder for the run's files, which is removed in every outcome (result,
error, cancel, exception) by :meth:`WorkerProcess.close` or by leaving its ``with`` block.

Typical use::

    with WorkerProcess() as worker:
        request = ExplainRequest(images=(str(worker.path("image.nrrd")),), ...)
        worker.start(request)
        for event in worker.wait():
            ...
"""

from __future__ import annotations

import collections
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import InputError, JobStateError
from .protocol import Request, parse_event

logger = logging.getLogger(__name__)

WORKER_MODULE = "SegHiResCAMLib.worker"
# The folder that contains the SegHiResCAMLib package; the worker needs it on its path.
LIBRARY_PARENT = Path(__file__).resolve().parents[2]
# Lines of the worker's stderr kept to explain a crash that sent no error event.
STDERR_LINES_KEPT = 40


# glibc's malloc gives every large tensor back to the system when it is freed, so the next
# layer's tensor page-faults its memory in again; on CPU that doubled the time of a 128^3
# forward pass and explanation (bench/bench_engine.py). Serving large blocks from the heap and
# keeping them for the worker's short life avoids it. Other C libraries ignore these names.
FAST_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(4 * 2**30), "MALLOC_TRIM_THRESHOLD_": str(16 * 2**30)}


class WorkerProcess:
    """One run of ``python -m SegHiResCAMLib.worker request.json`` in its own temp folder.

    Args:
        python_executable: the interpreter to run; in Slicer this is ``PythonSlicer``,
            elsewhere ``sys.executable`` (the default).
        env: extra environment variables for the worker (for example
            ``{"CUDA_VISIBLE_DEVICES": "-1"}`` to keep it off the GPU).
        temp_root: where to make the run's temp folder (default: the system's).
    """

    def __init__(
        self,
        python_executable: str | os.PathLike | None = None,
        env: dict[str, str] | None = None,
        temp_root: str | os.PathLike | None = None,
    ) -> None:
        self.python_executable = str(python_executable or sys.executable)
        self._extra_env = dict(env or {})
        self.temp_dir = Path(tempfile.mkdtemp(prefix="SegHiResCAM-", dir=temp_root))
        self._process: subprocess.Popen | None = None
        self._events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_LINES_KEPT)
        self._threads: list[threading.Thread] = []
        self._stdout_done = False
        self._reported_end = False
        self.cancelled = False
        self.closed = False

    # -- files -------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        """A file name inside this run's temp folder."""
        if self.closed:
            raise JobStateError("this worker run is closed; its temp folder is gone")
        return self.temp_dir / name

    # -- running -----------------------------------------------------------------------
    def start(self, request: Request | Mapping[str, Any]) -> None:
        """Write ``request.json`` into the temp folder and start the worker on it.

        Args:
            request: an ``ExplainRequest`` or ``LayersRequest``, or a plain mapping written as given (the worker
                then checks it: a malformed one ends with one error event and exit status 2).
        """
        if self._process is not None:
            raise JobStateError("this worker run was already started; make a new WorkerProcess")
        request_path = self.path("request.json")
        text = json.dumps(dict(request)) if isinstance(request, Mapping) else request.to_json()
        request_path.write_text(text, encoding="utf-8")
        command = [self.python_executable, "-m", WORKER_MODULE, str(request_path)]
        try:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                encoding="utf-8",
                errors="replace",
                bufsize=1,
                cwd=self.temp_dir,
                env=self._environment(),
                **_new_process_group(),
            )
        except OSError as error:
            raise InputError(
                f"cannot start the SegHiResCAM worker with {self.python_executable}: {error}. "
                "Check that Slicer's Python (PythonSlicer) is installed next to Slicer."
            ) from error
        self._threads = [
            threading.Thread(target=self._read_stdout, args=(self._process.stdout,), daemon=True),
            threading.Thread(target=self._read_stderr, args=(self._process.stderr,), daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        paths = [str(LIBRARY_PARENT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env["PYTHONUNBUFFERED"] = "1"  # events must arrive as they happen, not at exit
        env["PYTHONIOENCODING"] = "utf-8"
        for name, value in FAST_ALLOCATOR.items():
            env.setdefault(name, value)
        env.update(self._extra_env)
        return env

    def _read_stdout(self, stream) -> None:
        for line in stream:
            event = parse_event(line)
            if event is None:
                if line.strip():
                    logger.debug("worker: %s", line.rstrip())
                continue
            self._events.put(event)
        self._events.put(None)  # end of stream

    def _read_stderr(self, stream) -> None:
        for line in stream:
            if line.strip():
                self._stderr_tail.append(line.rstrip())

    @property
    def started(self) -> bool:
        return self._process is not None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        """True while the worker process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._process.returncode if self._process is not None else None

    @property
    def finished(self) -> bool:
        """True once the worker has exited and every event it sent has been handed out."""
        if self._process is None:
            return False
        return self._stdout_done and self._events.empty() and self._process.poll() is not None

    def poll(self) -> list[dict[str, Any]]:
        """Events that arrived since the last call, without blocking (for a GUI timer)."""
        events = []
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            if not self._accept(event, events):
                break
        if self._stdout_done and self._process is not None and self._process.poll() is not None:
            self._join_readers()  # the stderr tail must be complete before it explains a crash
            events.extend(self._exit_events())
        return events

    def wait(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """Block until the worker ends (or ``timeout`` seconds pass); return the events not yet polled."""
        if self._process is None:
            raise JobStateError("the worker was not started")
        deadline = None if timeout is None else time.monotonic() + timeout
        events: list[dict[str, Any]] = []
        while not self._stdout_done:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            try:
                event = self._events.get(timeout=remaining)
            except queue.Empty:
                break
            self._accept(event, events)
        if self._stdout_done:
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                self._process.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                pass
            events.extend(self.poll())
        return events

    def _accept(self, event: dict[str, Any] | None, events: list[dict[str, Any]]) -> bool:
        """Add one queued item to ``events``; False at the end-of-stream marker."""
        if event is None:
            self._stdout_done = True
            return False
        if event.get("event") in ("result", "error"):
            self._reported_end = True
        events.append(event)
        return True

    def _exit_events(self) -> list[dict[str, Any]]:
        """An error event for a worker that died without saying why (crash, kill, bad interpreter)."""
        if self.cancelled or self._reported_end:
            return []
        self._reported_end = True
        tail = next((line for line in reversed(self._stderr_tail) if line.strip()), "")
        message = f"the SegHiResCAM worker stopped unexpectedly (exit status {self.returncode})"
        if tail:
            message += f": {tail}"
        return [{"event": "error", "message": message, "exit_status": self.returncode}]

    @property
    def stderr_tail(self) -> list[str]:
        """The last lines the worker wrote to stderr (for logs and bug reports)."""
        return list(self._stderr_tail)

    # -- stopping ----------------------------------------------------------------------
    def cancel(self) -> None:
        """Kill the worker and every process it started, then remove the temp folder."""
        self.cancelled = True
        if self._process is not None and self._process.poll() is None:
            _kill_tree(self._process)
        self.close()

    def close(self) -> None:
        """Stop the worker if it still runs and remove the temp folder (safe to call twice)."""
        if self.closed:
            return
        if self._process is not None:
            if self._process.poll() is None:
                _kill_tree(self._process)
            self._join_readers()
            for stream in (self._process.stdout, self._process.stderr):
                if stream is not None:
                    stream.close()
        _remove_tree(self.temp_dir)
        self.closed = True

    def _join_readers(self) -> None:
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> "WorkerProcess":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _new_process_group() -> dict[str, Any]:
    """Popen options that put the worker in a group of its own, so the whole tree can be killed."""
    if os.name == "nt":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


def _kill_tree(process: subprocess.Popen) -> None:
    """Kill ``process`` and all its descendants, and reap it."""
    children = []
    try:
        import psutil
    except ImportError:  # psutil is optional on POSIX, where the process group covers the tree
        psutil = None
    if psutil is not None:
        try:
            children = psutil.Process(process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
    if os.name != "nt":
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    else:
        process.kill()
    for child in children:  # descendants that left the group (or Windows, which has no groups)
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    process.kill()
    process.wait(timeout=30)
    if psutil is not None:
        psutil.wait_procs(children, timeout=10)


def _remove_tree(path: Path) -> None:
    """Remove a temp folder; on Windows a just-killed process may hold files for a moment."""
    for attempt in range(20):
        try:
            shutil.rmtree(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            if attempt == 19:
                raise
            time.sleep(0.1)
