"""Print the longest functions and the longest parameter lists of the library and SegHiResCAM.py (markdown).

Usage: python scripts/function_sizes.py [SegHiResCAM]
"""
from __future__ import annotations
import ast, sys
from pathlib import Path

def rows(root: Path):
    files = sorted((root / "SegHiResCAMLib").rglob("*.py")) + [root / "SegHiResCAM.py"]
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        stack = [(tree, "")]
        while stack:
            node, prefix = stack.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    name = f"{prefix}{child.name}"
                    a = child.args
                    params = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
                    params += [p.arg for p in (a.vararg, a.kwarg) if p is not None]
                    params = [p for p in params if p not in ("self", "cls")]
                    yield (str(path.relative_to(root)), name, child.end_lineno - child.lineno + 1, len(params))
                    stack.append((child, name + "."))
                elif isinstance(child, ast.ClassDef):
                    stack.append((child, f"{prefix}{child.name}."))

root = Path(sys.argv[1] if len(sys.argv) > 1 else "SegHiResCAM")
found = list(rows(root))
for title, key in (("longest functions (lines)", 2), ("longest parameter lists", 3)):
    print(f"\n{title}\n| # | function | file | lines | parameters |\n|---|---|---|---|---|")
    for i, (f, n, l, p) in enumerate(sorted(found, key=lambda r: -r[key])[:10], 1):
        print(f"| {i} | `{n}` | {f} | {l} | {p} |")
