"""The library's layering: no import cycles, and the modules the panel uses import without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[1] / "SegHiResCAM" / "SegHiResCAMLib"

# What Slicer's GUI process and the command line's --help import: never torch (the panel asks the
# trust question, builds settings and starts the worker before torch is installed).
TORCH_FREE = [
    "SegHiResCAMLib", "SegHiResCAMLib.catalog", "SegHiResCAMLib.settings", "SegHiResCAMLib.progress",
    "SegHiResCAMLib.errors", "SegHiResCAMLib.models.trust", "SegHiResCAMLib.models.card",
    "SegHiResCAMLib.worker.protocol", "SegHiResCAMLib.worker.launcher", "SegHiResCAMLib.worker.main",
    "SegHiResCAMLib.service", "SegHiResCAMLib.cli",
    "SegHiResCAMLib.jobs.explain_job", "SegHiResCAMLib.jobs.layers_job", "SegHiResCAMLib.mrml.volumes", "SegHiResCAMLib.mrml.segments", "SegHiResCAMLib.mrml.heatmap_display",
    "SegHiResCAMLib.mrml.scene", "SegHiResCAMLib.mrml.render", "SegHiResCAMLib.mrml.points",
    "SegHiResCAMLib.mrml.compare_views", "SegHiResCAMLib.point_region", "SegHiResCAMLib.panel_rules",
]
# Plain data, not even numpy: the choices and the wire format.
NUMPY_FREE = ["SegHiResCAMLib.catalog", "SegHiResCAMLib.settings", "SegHiResCAMLib.models.trust",
              "SegHiResCAMLib.worker.protocol"]


def module_names() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the library (packages by their __init__)."""
    found = {}
    for path in LIBRARY.rglob("*.py"):
        parts = list(path.relative_to(LIBRARY.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the library modules it imports, at module scope or inside functions alike."""
    modules = module_names()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                graph[name] |= {alias.name for alias in node.names if alias.name in modules}
            elif isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                source = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:  # "from . import errors" imports a module, "from .x import y" a name
                    target = f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                    if target in modules and target != name:
                        graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each a list of names."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_library_has_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 40 and "SegHiResCAMLib.engine.job" in graph["SegHiResCAMLib.engine.explain"]
    assert cycles(graph) == []


def test_the_cycle_finder_sees_a_cycle_through_a_function_level_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    tree = ast.parse("def f():\n    from .loading import fit_weights\n")
    assert any(isinstance(node, ast.ImportFrom) for node in ast.walk(tree))  # ast.walk enters functions


def _import_without(blocked: list[str], modules: list[str]) -> subprocess.CompletedProcess:
    code = (
        "import sys\n"
        f"for name in {blocked!r}:\n"
        "    sys.modules[name] = None  # 'import name' now raises ImportError\n"
        f"for module in {modules!r}:\n"
        "    __import__(module)\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {blocked!r} and sys.modules[m] is not None))\n"
    )
    env_path = str(LIBRARY.parent)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"})


def test_the_modules_the_panel_uses_import_without_torch():
    done = _import_without(["torch"], TORCH_FREE)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_catalog_settings_protocol_and_trust_check_need_not_even_numpy():
    done = _import_without(["numpy", "torch"], NUMPY_FREE)
    assert done.returncode == 0, done.stderr


def test_the_import_check_notices_a_module_that_needs_torch():
    done = _import_without(["torch"], ["SegHiResCAMLib.engine.explain"])
    assert done.returncode != 0 and "torch" in done.stderr
