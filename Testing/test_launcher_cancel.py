"""Cancel as Slicer runs the worker: behind a launcher, with or without psutil.

``PythonSlicer`` is a CTK AppLauncher: it starts the real Python as its own child, which
inherits our pipes, and waits for it. Slicer ships no psutil. These tests run the real
worker the same way (a small launcher script that starts it as a child and waits) and
check that cancel leaves nothing behind: no process of the tree, no open pipe, no temp
folder, and that it returns even when a process escaped the kill.
"""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from SegHiResCAMLib.worker import launcher
from SegHiResCAMLib.worker.launcher import WorkerProcess

from test_launcher import start_worker

# Only a guard against a hung cancel (the defect: minutes, or for ever); never a speed check.
HANG_GUARD_SECONDS = 120


def write_launcher(folder: Path, body: str) -> Path:
    """An executable Python script standing in for ``PythonSlicer``."""
    script = folder / "PythonLauncher"
    script.write_text(f"#!{sys.executable}\n{body}", encoding="utf-8")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def app_launcher(folder: Path, child_leaves_group: bool) -> Path:
    """Like CTK's AppLauncher: run the real Python as a child on the same streams, wait, pass its status on.

    With ``child_leaves_group`` the child starts a session of its own, as a process that
    is no longer in the launcher's process group.
    """
    return write_launcher(
        folder,
        "import subprocess, sys\n"
        f"child = subprocess.Popen([{sys.executable!r}] + sys.argv[1:], start_new_session={child_leaves_group})\n"
        "sys.exit(child.wait())\n",
    )


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill_all(pids) -> None:
    """Test clean-up: nothing may outlive the test, whatever the code under test did."""
    for pid in pids:
        try:
            psutil.Process(pid).kill()
        except psutil.NoSuchProcess:
            pass


def call_with_hang_guard(function) -> bool:
    """Run ``function`` in a thread; True if it returned within the guard (False: it hung)."""
    thread = threading.Thread(target=function, daemon=True)
    thread.start()
    thread.join(HANG_GUARD_SECONDS)
    return not thread.is_alive()


def wait_for_progress(worker: WorkerProcess) -> list[dict]:
    seen: list[dict] = []
    deadline = time.monotonic() + 120
    while not any(e["event"] == "progress" for e in seen) and time.monotonic() < deadline:
        seen.extend(worker.wait(timeout=0.1))
    return seen


@pytest.mark.process
@pytest.mark.parametrize("child_leaves_group", [False, True], ids=["same-group", "own-session"])
@pytest.mark.parametrize("psutil_importable", [True, False], ids=["psutil", "no-psutil"])
def test_cancel_kills_the_worker_below_its_launcher_closes_the_pipes_and_removes_the_folder(
    tmp_path, monkeypatch, child_leaves_group, psutil_importable
):
    worker = WorkerProcess(python_executable=app_launcher(tmp_path, child_leaves_group))
    tree: list[int] = []
    try:
        # A large image keeps the real worker busy well past the cancel.
        start_worker(worker, tmp_path, size=96, methods=["kernel-weighted-contribution"])
        seen = wait_for_progress(worker)
        tree = [worker.pid] + [p.pid for p in psutil.Process(worker.pid).children(recursive=True)]
        real_worker = psutil.Process(tree[-1])
        assert worker.running and len(tree) == 2, "the worker must run below its launcher"
        assert "SegHiResCAMLib.worker" in real_worker.cmdline() and real_worker.ppid() == worker.pid
        temp_dir = worker.temp_dir
        if not psutil_importable:
            monkeypatch.setitem(sys.modules, "psutil", None)  # as in Slicer, which ships none
        returned = call_with_hang_guard(worker.cancel)
        monkeypatch.undo()
        assert returned, "cancel hung"
        assert not [pid for pid in tree if alive(pid)], "every process of the tree must be gone"
        process = worker._process
        assert process.stdout.closed and process.stderr.closed, "the pipes must be closed"
        assert not temp_dir.exists() and worker.temp_dir_left is None
        assert worker.cancelled and worker.closed
        assert not any(e["event"] in ("result", "error") for e in seen + worker.poll())
    finally:
        monkeypatch.undo()
        kill_all(tree)
        worker.close()


@pytest.mark.process
def test_cancel_returns_when_a_process_escaped_the_tree_and_leaves_its_pipes_to_the_readers(tmp_path, caplog):
    # A daemon that inherited the pipes, then lost its parent: no tree kill can find it.
    # Closing a pipe that a reader is blocked on would wait for that daemon (the freeze).
    pid_file = tmp_path / "daemon.pid"
    daemon = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(600)"
    middle = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {daemon!r}], start_new_session=True)"
    script = write_launcher(
        tmp_path,
        "import subprocess, sys, time\n"
        f"subprocess.run([{sys.executable!r}, '-c', {middle!r}])\n"
        "time.sleep(600)\n",
    )
    worker = WorkerProcess(python_executable=script)
    daemon_pid = None
    try:
        worker.start({"image": "x.nrrd", "model": "m.pt", "output": "o.nrrd"})
        deadline = time.monotonic() + 60
        while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        daemon_pid = int(pid_file.read_text())
        assert daemon_pid not in launcher.descendant_pids(worker.pid), "the daemon must be out of the tree"
        temp_dir, launcher_pid = worker.temp_dir, worker.pid
        with caplog.at_level(logging.WARNING, logger=launcher.__name__):
            assert call_with_hang_guard(worker.cancel), "cancel hung on a pipe held by the daemon"
        assert not alive(launcher_pid) and alive(daemon_pid)
        assert not temp_dir.exists()
        assert any("still holds its output" in record.getMessage() for record in caplog.records)
        kill_all([daemon_pid])
        for thread in worker._threads:  # the readers reach end of file now, and close the pipes
            thread.join(HANG_GUARD_SECONDS)
        assert worker._process.stdout.closed and worker._process.stderr.closed
    finally:
        kill_all([daemon_pid] if daemon_pid else [])
        worker.close()


@pytest.mark.process
def test_the_worker_does_not_run_in_its_temp_folder(tmp_path):
    # On Windows the working directory of a process that outlived a kill locks the folder.
    with WorkerProcess() as worker:
        start_worker(worker, tmp_path, size=64, methods=["kernel-weighted-contribution"])
        wait_for_progress(worker)
        cwd = Path(psutil.Process(worker.pid).cwd())
        assert cwd == launcher.LIBRARY_PARENT and worker.temp_dir not in (cwd, *cwd.parents)


def test_a_temp_folder_that_cannot_be_removed_is_logged_and_kept_not_raised(tmp_path, monkeypatch, caplog):
    # Windows refuses to delete a file another process holds open; on Linux nothing (least
    # of all root) is refused, so the refusal is Windows' own error, raised by rmtree.
    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "The process cannot access the file because it is being used by another process", str(path))

    worker = WorkerProcess(temp_root=tmp_path)
    temp_dir = worker.temp_dir
    worker.path("image.nrrd").write_bytes(b"held open by another process")
    monkeypatch.setattr(launcher.shutil, "rmtree", refuse)
    monkeypatch.setattr(launcher.time, "sleep", lambda seconds: None)
    with caplog.at_level(logging.WARNING, logger=launcher.__name__):
        worker.close()
    monkeypatch.undo()
    assert worker.closed and worker.temp_dir_left == temp_dir and temp_dir.is_dir()
    messages = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert any(str(temp_dir) in message for message in messages), messages


def test_descendants_are_found_without_psutil_as_psutil_finds_them(tmp_path, monkeypatch):
    # A launcher -> child -> grandchild chain, one of them in a session of its own.
    leaf = "import time; time.sleep(600)"
    middle = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {leaf!r}], start_new_session=True).wait()"
    top = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', {middle!r}])"])
    try:
        deadline = time.monotonic() + 60
        while len(psutil.Process(top.pid).children(recursive=True)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        expected = sorted(p.pid for p in psutil.Process(top.pid).children(recursive=True))
        with_psutil = sorted(launcher.descendant_pids(top.pid))
        monkeypatch.setitem(sys.modules, "psutil", None)
        without_psutil = sorted(launcher.descendant_pids(top.pid))
        monkeypatch.undo()
        assert len(expected) == 2 and with_psutil == expected and without_psutil == expected
    finally:
        monkeypatch.undo()
        kill_all(p.pid for p in psutil.Process(top.pid).children(recursive=True))
        top.kill()
        top.wait()


def test_on_windows_the_worker_starts_with_a_hidden_console():
    options = launcher.launch_options("nt")
    # The values of winbase.h / winuser.h, which subprocess names only on Windows.
    assert options.creationflags & 0x08000000, "CREATE_NO_WINDOW"
    assert options.creationflags & 0x00000200, "CREATE_NEW_PROCESS_GROUP"
    assert options.startupinfo_flags & 0x00000001 and options.show_window == 0, "STARTF_USESHOWWINDOW with SW_HIDE"
    assert not options.new_session
    if os.name == "nt":
        assert launcher.CREATE_NO_WINDOW == subprocess.CREATE_NO_WINDOW
        assert launcher.CREATE_NEW_PROCESS_GROUP == subprocess.CREATE_NEW_PROCESS_GROUP
        assert launcher.STARTF_USESHOWWINDOW == subprocess.STARTF_USESHOWWINDOW and launcher.SW_HIDE == subprocess.SW_HIDE
        keywords = launcher.popen_keywords(options)
        assert keywords["startupinfo"].wShowWindow == 0 and keywords["creationflags"] == options.creationflags


def test_elsewhere_the_worker_leads_a_process_group_of_its_own():
    options = launcher.launch_options("posix")
    assert options.new_session and options.creationflags == 0 and options.startupinfo_flags == 0
    assert launcher.popen_keywords(options) == {"start_new_session": True}


def test_on_windows_the_tree_is_killed_by_taskkill_from_the_system_folder():
    assert launcher.tree_kill_command(4242, r"C:\Windows") == [
        r"C:\Windows\System32\taskkill.exe", "/F", "/T", "/PID", "4242"
    ]
    assert launcher.tree_kill_command(7, "D:\\WinNT\\")[0] == r"D:\WinNT\System32\taskkill.exe"
