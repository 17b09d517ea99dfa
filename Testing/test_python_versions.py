"""The package on the Pythons Slicer ships: 3.9 (Slicer 5.8) and 3.12 (Slicer 5.10 and later).

torch has no build for every version here, so what can run without it runs: every file of
the module compiles (SegHiResCAM.py and the library), every library module imports or lacks
only a package that Slicer or the PyTorch extension brings (torch, slicer, ...), and with
numpy and SimpleITK the torch-free parts work for real (file round trip, the worker's error
path, cancel below a launcher without psutil).

The interpreters come from pyenv; the environments with numpy and SimpleITK from
``scripts/compat_pythons.sh`` (``.venv/compat/<version>``, or the folder named by
``SEGHIRESCAM_COMPAT_VENVS``). On CI (``CI`` set) a missing one fails the test instead of
skipping it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "SegHiResCAM"
CHECKS = Path(__file__).with_name("python_version_checks.py")
VERSIONS = ("3.9", "3.12")
# What a library module may lack on a bare interpreter: packages that come with Slicer, with
# the PyTorch extension, or with an optional extra. Anything else failing is a defect.
BROUGHT_BY_OTHERS = {"torch", "numpy", "SimpleITK", "slicer", "vtk", "qt", "monai", "yaml",
                     "dynamic_network_architectures", "nilearn", "matplotlib", "PIL"}
# Library modules that need none of those but numpy and SimpleITK: they must import everywhere.
TORCH_FREE = ["SegHiResCAMLib", "SegHiResCAMLib.errors", "SegHiResCAMLib.lazy", "SegHiResCAMLib.volume",
              "SegHiResCAMLib.io.images", "SegHiResCAMLib.models.card", "SegHiResCAMLib.panel_rules",
              "SegHiResCAMLib.dependencies", "SegHiResCAMLib.worker.protocol", "SegHiResCAMLib.worker.launcher",
              "SegHiResCAMLib.worker.main", "SegHiResCAMLib.catalog", "SegHiResCAMLib.settings",
              "SegHiResCAMLib.service", "SegHiResCAMLib.io.channels", "SegHiResCAMLib.models.trust",
              "SegHiResCAMLib.jobs.worker_job", "SegHiResCAMLib.jobs.layers_job", "SegHiResCAMLib.jobs.explain_job"]
STDLIB_ONLY = ["SegHiResCAMLib", "SegHiResCAMLib.errors", "SegHiResCAMLib.lazy", "SegHiResCAMLib.models.card",
               "SegHiResCAMLib.panel_rules", "SegHiResCAMLib.dependencies", "SegHiResCAMLib.worker.protocol",
               "SegHiResCAMLib.worker.launcher", "SegHiResCAMLib.catalog", "SegHiResCAMLib.settings",
               "SegHiResCAMLib.progress", "SegHiResCAMLib.models.trust", "SegHiResCAMLib.models.monai_config"]


def _missing(what: str):
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing on CI, where it must be present (scripts/compat_pythons.sh makes it)")
    pytest.skip(f"{what} is not installed here")


def pyenv_interpreter(version: str) -> Path | None:
    """The newest pyenv interpreter of ``version`` (e.g. 3.9 -> versions/3.9.18/bin/python)."""
    roots = [Path(os.environ["PYENV_ROOT"])] if os.environ.get("PYENV_ROOT") else []
    roots += [Path.home() / ".pyenv", Path("/root/.pyenv")]
    for root in roots:
        found = [p for p in (root / "versions").glob(f"{version}.*/bin/python") if p.parent.parent.name.count(".") == 2]
        if found:
            return max(found, key=lambda p: tuple(int(n) for n in p.parent.parent.name.split(".") if n.isdigit()))
    return None


def compat_interpreter(version: str) -> Path | None:
    folder = Path(os.environ.get("SEGHIRESCAM_COMPAT_VENVS") or ROOT / ".venv" / "compat")
    python = folder / version / "bin" / "python"
    return python if python.is_file() else None


def run_checks(python: Path, mode: str, folder: Path = MODULE_DIR) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    completed = subprocess.run(
        [str(python), "-B", str(CHECKS), mode, str(folder)],
        capture_output=True, text=True, env=env, timeout=600, cwd=str(CHECKS.parent),
    )
    lines = completed.stdout.strip().splitlines()
    assert completed.returncode == 0 and lines, f"{python} {mode}: exit {completed.returncode}\n{completed.stderr[-3000:]}"
    result = json.loads(lines[-1])
    assert "exception" not in result, result["exception"]
    return result


def version_of(python: Path) -> str:
    return subprocess.run([str(python), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                          capture_output=True, text=True, check=True).stdout.strip()


def _interpreter(python: Path | None, version: str, what: str) -> Path:
    """``python``, checked to be ``version``; missing: skipped here, a failure on CI."""
    if python is None:
        _missing(what)
    assert version_of(python) == version
    return python


@pytest.fixture(params=VERSIONS)
def bare_python(request) -> Path:
    return _interpreter(pyenv_interpreter(request.param), request.param, f"Python {request.param} (pyenv)")


@pytest.fixture(params=VERSIONS)
def compat_python(request) -> Path:
    return _interpreter(compat_interpreter(request.param), request.param,
                        f"the Python {request.param} environment with numpy and SimpleITK")


def test_every_file_of_the_module_compiles(bare_python):
    result = run_checks(bare_python, "compile")
    assert result["files"] > 40 and result["failed"] == {}, result["failed"]


def test_every_library_module_imports_or_lacks_only_a_package_others_bring(bare_python):
    result = run_checks(bare_python, "imports")
    errors = {name: status for name, status in result.items() if status.startswith("error")}
    assert not errors, errors
    lacking = {status.split(" ", 1)[1] for status in result.values() if status.startswith("missing")}
    assert lacking <= BROUGHT_BY_OTHERS, lacking - BROUGHT_BY_OTHERS
    assert all(result[name] == "ok" for name in STDLIB_ONLY), {name: result[name] for name in STDLIB_ONLY}


def test_with_numpy_and_simpleitk_the_torch_free_modules_import_and_work(compat_python):
    imports = run_checks(compat_python, "imports")
    assert all(imports[name] == "ok" for name in TORCH_FREE), {name: imports[name] for name in TORCH_FREE}
    done = run_checks(compat_python, "exercise")["done"]
    assert done[:2] == ["nrrd round trip", "worker error event"]
    if sys.platform.startswith("linux"):
        assert done[2:] == ["cancel below a launcher without psutil"]


def test_the_checks_see_syntax_that_python_3_9_rejects(tmp_path, bare_python):
    # The compile check must be able to fail: a match statement (3.10+) is refused by 3.9.
    (tmp_path / "uses_match.py").write_text("match 1:\n    case 1:\n        pass\n")
    (tmp_path / "plain.py").write_text("x = 1\n")
    failed = run_checks(bare_python, "compile", tmp_path)["failed"]
    expected = {"uses_match.py"} if version_of(bare_python) == "3.9" else set()
    assert set(failed) == expected
