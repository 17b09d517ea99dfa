"""Start the worker process, read its JSON-line events, cancel it, and clean up after it.

Qt-free, so that the Slicer widget (polling from a QTimer), scripts (blocking ``wait``)
and pytest all drive the same code. One :class:`WorkerProcess` is one run: it owns a
temporary folder for the run's files, which is removed in every outcome (result,
error, cancel, exception) by :meth:`WorkerProcess.close` or by leaving its ``with`` block.

In Slicer the interpreter is ``PythonSlicer``, a CTK AppLauncher that starts the real
Python as its own child, which inherits the pipes. Cancel therefore kills the whole
process tree (``taskkill /T`` on Windows, the process group plus every descendant found
elsewhere), never with psutil alone (Slicer does not ship it), and the pipes are closed
only once every process that held them is gone, so that a stray process cannot freeze
the caller. The worker runs with a hidden console on Windows, in a working directory
outside its temp folder, so that the folder can be removed while anything still runs.

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
from dataclasses import dataclass
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
# Seconds to wait for the pipe readers once the process tree was killed. They end as soon as
# the last process holding the pipes is gone; longer means a process outlived the kill.
READER_GRACE_SECONDS = 3.0
# Seconds to wait for taskkill, for the killed worker to be reaped, and for its descendants to end.
KILL_TIMEOUT_SECONDS = 30.0

# Windows constants (winbase.h, winuser.h), named here because ``subprocess`` defines them
# only on Windows and the options below are built, and tested, on every system.
CREATE_NEW_PROCESS_GROUP = 0x00000200
CREATE_NO_WINDOW = 0x08000000
STARTF_USESHOWWINDOW = 0x00000001
SW_HIDE = 0


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
        temp_root: where to make the run's temp folder (default: the system's; in Slicer
            ``slicer.app.temporaryPath``).

    Attributes:
        temp_dir_left: the temp folder when it could not be removed (a process outside
            our control still holds a file in it); None otherwise. The path is also logged.
    """

    def __init__(
        self,
        python_executable: str | os.PathLike | None = None,
        env: dict[str, str] | None = None,
        temp_root: str | os.PathLike | None = None,
    ) -> None:
        self.python_executable = str(python_executable or sys.executable)
        self._extra_env = dict(env or {})
        # Absolute: the worker runs in another folder and gets the paths inside this one.
        self.temp_dir = Path(os.path.abspath(tempfile.mkdtemp(prefix="SegHiResCAM-", dir=temp_root)))
        self.temp_dir_left: Path | None = None
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
                # Not the temp folder: on Windows a process's working directory cannot be
                # removed. The library's folder is already first on the worker's path.
                cwd=str(LIBRARY_PARENT),
                env=self._environment(),
                **popen_keywords(launch_options()),
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

    # Each reader closes its own pipe at end of file: closing it from another thread while
    # a read is blocked would wait for that read, i.e. for every process holding the pipe.
    def _read_stdout(self, stream) -> None:
        with stream:
            for line in stream:
                event = parse_event(line)
                if event is None:
                    if line.strip():
                        logger.debug("worker: %s", line.rstrip())
                    continue
                self._events.put(event)
        self._events.put(None)  # end of stream

    def _read_stderr(self, stream) -> None:
        with stream:
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
            self._join_readers(READER_GRACE_SECONDS)  # the stderr tail must be complete before it explains a crash
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
        self.close()

    def close(self) -> None:
        """Stop the worker's process tree if it still runs and remove the temp folder (safe to call twice).

        Never raises for a temp folder that cannot be removed: that is logged and kept in
        :attr:`temp_dir_left`. Never blocks on a process that outlived the kill: its pipes
        are left to their readers, which close them when it ends.
        """
        if self.closed:
            return
        self.closed = True
        if self._process is not None:
            _kill_tree(self._process)
            if not self._join_readers(READER_GRACE_SECONDS):
                logger.warning(
                    "a process started by the SegHiResCAM worker (pid %s) still holds its output after the kill; "
                    "its pipes will close when it ends",
                    self._process.pid,
                )
        self._remove_temp_dir()

    def _join_readers(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds in all for the pipe readers; True when both have ended."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0.0))
        return not any(thread.is_alive() for thread in self._threads)

    def _remove_temp_dir(self) -> None:
        try:
            _remove_tree(self.temp_dir)
        except OSError as error:
            self.temp_dir_left = self.temp_dir
            logger.warning("could not remove the SegHiResCAM temp folder %s (%s); delete it by hand", self.temp_dir, error)

    def __enter__(self) -> "WorkerProcess":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclass(frozen=True)
class LaunchOptions:
    """How the worker process is started on one operating system (plain data, built anywhere).

    Attributes:
        creationflags: Windows process creation flags.
        startupinfo_flags: Windows ``STARTUPINFO.dwFlags``; 0 = no STARTUPINFO.
        show_window: Windows ``STARTUPINFO.wShowWindow``.
        new_session: POSIX: run in a new session, so that its process group is the worker's tree.
    """

    creationflags: int = 0
    startupinfo_flags: int = 0
    show_window: int = 0
    new_session: bool = False


def launch_options(os_name: str = os.name) -> LaunchOptions:
    """The worker's start options for ``os_name`` (``os.name``: "nt" or "posix").

    On Windows the console window stays hidden, as ``slicer.util.launchConsoleProcess``
    hides it (STARTUPINFO with STARTF_USESHOWWINDOW and SW_HIDE), and no console is made at
    all (CREATE_NO_WINDOW); elsewhere the worker leads a new process group.
    """
    if os_name == "nt":
        return LaunchOptions(
            creationflags=CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW,
            startupinfo_flags=STARTF_USESHOWWINDOW,
            show_window=SW_HIDE,
        )
    return LaunchOptions(new_session=True)


def popen_keywords(options: LaunchOptions) -> dict[str, Any]:
    """``subprocess.Popen`` keyword arguments for ``options`` (a STARTUPINFO only exists on Windows)."""
    keywords: dict[str, Any] = {}
    if options.new_session:
        keywords["start_new_session"] = True
    if options.creationflags:
        keywords["creationflags"] = options.creationflags
    if options.startupinfo_flags:
        info = subprocess.STARTUPINFO()
        info.dwFlags |= options.startupinfo_flags
        info.wShowWindow = options.show_window
        keywords["startupinfo"] = info
    return keywords


def tree_kill_command(pid: int, system_root: str | None = None) -> list[str]:
    """The Windows command that kills ``pid`` and all its descendants (``taskkill /F /T``).

    Args:
        pid: the process at the top of the tree.
        system_root: the Windows folder (default: ``%SystemRoot%``); taskkill is run from
            there by full path, never looked up on the PATH.
    """
    root = system_root or os.environ.get("SystemRoot") or r"C:\Windows"
    return [root.rstrip("\\") + r"\System32\taskkill.exe", "/F", "/T", "/PID", str(int(pid))]


def descendant_pids(pid: int) -> list[int]:
    """The PIDs of every process below ``pid`` (children first), found without psutil where possible.

    psutil when it can be imported (Slicer ships none); else Linux's ``/proc``; else an
    empty list (macOS without psutil: the process group covers the tree).
    """
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            return [child.pid for child in psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            return []
    children = _children_from_proc()
    found, pending = [], [pid]
    while pending:
        for child in children.get(pending.pop(0), []):
            if child not in found:
                found.append(child)
                pending.append(child)
    return found


def _children_from_proc() -> dict[int, list[int]]:
    """Parent PID -> child PIDs, from ``/proc/<pid>/stat`` (empty where there is no /proc)."""
    children: dict[int, list[int]] = {}
    try:
        entries = [entry.name for entry in os.scandir("/proc") if entry.name.isdigit()]
    except OSError:
        return children
    for name in entries:
        try:
            with open(f"/proc/{name}/stat", "rb") as stat_file:
                stat = stat_file.read()
        except OSError:  # the process ended while we looked
            continue
        # "pid (command) state ppid ...": the command may hold spaces and parentheses.
        fields = stat[stat.rindex(b")") + 2 :].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(name))
    return children


def _kill_tree(process: subprocess.Popen) -> None:
    """Kill ``process`` and all its descendants if it still runs, and reap it.

    The descendants are listed before anything is killed: once their parent is gone they
    no longer hang below it.
    """
    if process.poll() is None:
        descendants = descendant_pids(process.pid)
        if os.name == "nt":
            _run_taskkill(process.pid)
        else:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):  # the group is already empty
                pass
        for pid in descendants:  # those that left the group, or that taskkill did not reach
            try:
                os.kill(pid, getattr(signal, "SIGKILL", signal.SIGTERM))
            except OSError:  # already gone
                pass
        if process.poll() is None:
            process.kill()
        # A kill is delivered asynchronously: return once the tree is really gone (GPU memory and
        # files released), as far as it can be seen.
        left = _wait_until_gone(descendants, KILL_TIMEOUT_SECONDS)
        if left:
            logger.warning("processes of the SegHiResCAM worker tree did not end after the kill: %s", left)
    try:
        process.wait(timeout=KILL_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        logger.warning("the SegHiResCAM worker (pid %s) did not end after it was killed", process.pid)


def _wait_until_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait up to ``timeout`` seconds for ``pids`` to end; the PIDs still running then."""
    deadline = time.monotonic() + timeout
    running = [pid for pid in pids if _still_running(pid)]
    while running and time.monotonic() < deadline:
        time.sleep(0.01)
        running = [pid for pid in running if _still_running(pid)]
    return running


def _still_running(pid: int) -> bool:
    """True while ``pid`` runs (a zombie has ended); False where that cannot be seen (no psutil, no /proc)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            stat = stat_file.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2 :].split()[0] not in (b"Z", b"X")


def _run_taskkill(pid: int) -> None:
    command = tree_kill_command(pid)
    try:
        result = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=KILL_TIMEOUT_SECONDS,
            **popen_keywords(launch_options()),  # taskkill is a console program: no window either
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        logger.warning("could not run %s: %s", command[0], error)
        return
    if result.returncode != 0:
        logger.warning("taskkill could not end the SegHiResCAM worker tree: %s", result.stdout.decode(errors="replace").strip())


def _remove_tree(path: Path) -> None:
    """Remove a temp folder; on Windows a just-killed process may hold files for a moment."""
    for attempt in range(10):
        try:
            shutil.rmtree(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            if attempt == 9:
                raise
            time.sleep(0.1)
