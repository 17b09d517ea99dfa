"""Print the longest functions and the longest parameter lists of the library and SegHiResCAM.py (markdown).

Usage: python scripts/function_sizes.py [MODULE_FOLDER]   (default: SegHiResCAM)
Parameters are counted without ``self``/``cls``; nested functions and methods are listed by their dotted name.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path


def functions(root: Path) -> Iterator[tuple[str, str, int, int]]:
    """(file, dotted name, lines, parameters) for every function in the library and the module file."""
    for path in sorted((root / "SegHiResCAMLib").rglob("*.py")) + [root / "SegHiResCAM.py"]:
        stack: list[tuple[ast.AST, str]] = [(ast.parse(path.read_text(encoding="utf-8")), "")]
        while stack:
            node, prefix = stack.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    arguments = child.args
                    names = [a.arg for a in arguments.posonlyargs + arguments.args + arguments.kwonlyargs]
                    names += [a.arg for a in (arguments.vararg, arguments.kwarg) if a is not None]
                    count = len([name for name in names if name not in ("self", "cls")])
                    yield str(path.relative_to(root)), prefix + child.name, child.end_lineno - child.lineno + 1, count
                    stack.append((child, f"{prefix}{child.name}."))
                elif isinstance(child, ast.ClassDef):
                    stack.append((child, f"{prefix}{child.name}."))


def main() -> None:
    found = list(functions(Path(sys.argv[1] if len(sys.argv) > 1 else "SegHiResCAM")))
    for title, column in (("longest functions (lines)", 2), ("longest parameter lists", 3)):
        print(f"\n{title}\n| # | function | file | lines | parameters |\n|---|---|---|---|---|")
        for rank, (file, name, lines, count) in enumerate(sorted(found, key=lambda row: -row[column])[:10], 1):
            print(f"| {rank} | `{name}` | {file} | {lines} | {count} |")


if __name__ == "__main__":
    main()
