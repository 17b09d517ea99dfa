"""Checks run by another Python (3.9 as in Slicer 5.8, 3.12 as in Slicer 5.10 and later).

Not a test module: ``test_python_versions.py`` runs it with those interpreters as

    python python_version_checks.py compile  FOLDER   # every .py under FOLDER compiles
    python python_version_checks.py imports  FOLDER   # every SegHiResCAMLib module under FOLDER imports
    python python_version_checks.py exercise FOLDER   # torch-free parts work (needs numpy, SimpleITK)

and reads one JSON object from its last line of output. It must itself run on Python 3.9.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import traceback
from pathlib import Path


def compile_all(folder: Path) -> dict:
    failed = {}
    files = sorted(folder.rglob("*.py"))
    for path in files:
        try:
            compile(path.read_text(encoding="utf-8"), str(path), "exec", dont_inherit=True)
        except SyntaxError as error:
            failed[str(path.relative_to(folder))] = f"line {error.lineno}: {error.msg}"
    return {"files": len(files), "failed": failed}


def import_all(folder: Path) -> dict:
    """module name -> "ok", "missing <top-level package>" or "error <exception>"."""
    sys.path.insert(0, str(folder))
    import importlib

    results = {}
    for path in sorted((folder / "SegHiResCAMLib").rglob("*.py")):
        parts = path.relative_to(folder).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        try:
            importlib.import_module(name)
            results[name] = "ok"
        except ModuleNotFoundError as error:
            results[name] = f"missing {(error.name or '').split('.')[0]}"
        except Exception as error:  # reported to the test, which fails on it
            results[name] = f"error {type(error).__name__}: {error}"
    return results


def exercise(folder: Path) -> dict:
    """The torch-free parts, run for real: file round trip, the worker's error path, the launcher's cancel."""
    sys.path.insert(0, str(folder))
    import numpy as np

    from SegHiResCAMLib.io.images import read_image, write_image
    from SegHiResCAMLib.volume import Volume
    from SegHiResCAMLib.worker.launcher import WorkerProcess, descendant_pids
    from SegHiResCAMLib.settings import ExplainSettings
    from SegHiResCAMLib.worker.protocol import ExplainRequest

    done = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        ijk_to_ras = np.array([[-1.2, 0.1, 0, 20.0], [0, -1.2, 0, -5.0], [0, 0, 2.0, 7.0], [0, 0, 0, 1]])
        array = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
        write_image(Volume(array, ijk_to_ras), scratch / "image.nrrd")
        back = read_image(scratch / "image.nrrd")
        # NRRD keeps float64 geometry: a few roundings of the largest entry (Testing/tolerances.geometry_atol)
        atol = 16 * np.finfo(np.float64).eps * np.abs(ijk_to_ras).max()
        if not (np.array_equal(back.array, array) and np.allclose(back.ijk_to_ras, ijk_to_ras, rtol=0, atol=atol)):
            raise AssertionError("NRRD round trip changed the voxels or the geometry")
        done.append("nrrd round trip")

        # The real worker on this Python: a missing image ends with one error event, exit status 1.
        with WorkerProcess(temp_root=scratch) as worker:
            worker.start(ExplainRequest(images=(str(scratch / "missing.nrrd"),), model="m.pt",
                                        outputs=(str(worker.path("o.nrrd")),), settings=ExplainSettings(target_class=1)))
            events = worker.wait(timeout=120)
            kinds = [e["event"] for e in events]
            if kinds.count("error") != 1 or kinds[-1] != "error" or "result" in kinds or worker.returncode != 1:
                raise AssertionError(f"worker events {events}, exit status {worker.returncode}")
        done.append("worker error event")

        if not Path("/proc").is_dir():  # the tree below is read from /proc
            return {"done": done}
        # Cancel below a launcher, without psutil (as in Slicer): the whole tree goes.
        launcher = scratch / "launcher"
        launcher.write_text(
            f"#!{sys.executable}\nimport subprocess, sys\n"
            f"sys.exit(subprocess.call([{sys.executable!r}, '-c', 'import time; time.sleep(600)']))\n"
        )
        launcher.chmod(0o755)
        sys.modules["psutil"] = None  # type: ignore[assignment]
        worker = WorkerProcess(python_executable=launcher, temp_root=scratch)
        worker.start({"image": "x.nrrd", "model": "m.pt", "output": "o.nrrd"})
        deadline = time.monotonic() + 60
        tree = []
        while len(tree) < 1 and time.monotonic() < deadline:
            tree = descendant_pids(worker.pid)
            time.sleep(0.05)
        tree = [worker.pid] + tree
        worker.cancel()
        alive = [pid for pid in tree if _alive(pid)]
        if len(tree) < 2 or alive or worker.temp_dir.exists():
            raise AssertionError(f"tree {tree}, still alive {alive}, temp folder left {worker.temp_dir.exists()}")
        done.append("cancel below a launcher without psutil")
    return {"done": done}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def main() -> None:
    mode, folder = sys.argv[1], Path(sys.argv[2])
    checks = {"compile": compile_all, "imports": import_all, "exercise": exercise}
    try:
        result = checks[mode](folder)
    except Exception:
        result = {"exception": traceback.format_exc()}
    sys.stdout.write("\n" + json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
