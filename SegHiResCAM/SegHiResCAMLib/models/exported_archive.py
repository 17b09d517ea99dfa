"""Check a ``torch.export`` archive (``.pt2``) before ``torch.export.load`` reads it.

``torch.export.load`` is not a plain tensor reader. In torch 2.13 it can run code that comes with
the file along these paths (``torch/export/pt2_archive/_package.py``, ``torch/_export/serde/serialize.py``,
``torch/export/_unlift.py``):

- weights or constants marked ``use_pickle`` (tensor subclasses) are read with
  ``torch.load(weights_only=False)``, "opaque" constants with ``pickle.loads``, TorchBind objects
  with ``torch._C._pickle_load_obj`` (``_load_state_dict``, ``_load_constants``);
- the example inputs (``data/sample_inputs/<model>.pt``), and the weights of the older
  ``data/weights/<model>.pt`` layout, go through ``deserialize_torch_artifact``, which retries with
  ``torch.load(weights_only=False)`` when the safe load fails;
- every symbolic size expression (``expr_str``) is parsed with ``sympy.sympify``, which evaluates
  the text as Python (``_parse_sym_expr``);
- the shape guards (``guards_code``) are Python source that ``ExportedProgram.module()`` compiles
  with ``exec`` (``_convert_guards_code_to_fn``); ``run_decompositions`` calls ``module()``;
- ``load_pt2`` loads AOTInductor packages (``data/aotinductor/``): compiled shared libraries;
- when ``load_pt2`` fails, ``torch.export.load`` reads the older layout (``version``,
  ``serialized_state_dict.pt``, ... at the archive's root) through ``deserialize_torch_artifact``.

What it cannot do: graph nodes may only call operators that torch's verifier accepts (ATen and
other registered operators, higher-order operators, a fixed list of ``operator``/``math``
builtins), resolved by name from ``torch``, ``operator`` and ``math``; names it cannot resolve
stay strings and are refused. Tensor data itself is read as raw bytes.

So this module refuses, before torch reads anything, every archive that would take one of the
code paths above: pickled payloads, native code, example inputs that need full unpickling,
expressions or guards outside the small grammar that ``torch.export`` itself writes, and any file
outside the one top folder that ``torch.export.save`` writes (so the older layout is never read). What
passes is plain JSON, raw tensor bytes and arithmetic on tensor sizes.
"""

from __future__ import annotations

import ast
import io
import json
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import ModelError, UnsafeModelError
from .model_file import check_export_archive_bytes

# Layout of torch 2.13's archives (torch._C._export.pt2_archive_constants), without importing torch.
_FORMAT_FILE, _FORMAT_VALUE = "archive_format", "pt2"
_MODELS_DIR, _WEIGHTS_DIR, _CONSTANTS_DIR = "models/", "data/weights/", "data/constants/"
_NATIVE_CODE_DIRS = ("data/aotinductor/",)
_TENSOR_CONSTANT_PREFIX = "tensor_"

# Functions ``torch.export`` writes into ``expr_str`` (sympy's srepr of size expressions).
_SYMPY_FUNCTIONS = frozenset({
    "Symbol", "Integer", "Float", "Rational", "Add", "Mul", "Pow", "Max", "Min", "Mod", "Abs",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan",
    "Equality", "Unequality", "And", "Or", "Not", "IntInfinity", "NegativeIntInfinity",
    "FloorDiv", "CeilDiv", "ModularIndexing", "PythonMod", "CleanDiv", "Where", "CeilToInt", "FloorToInt",
    "IntTrueDiv", "FloatTrueDiv", "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat",
    "Identity", "PowByNatural", "FloatPow", "LShift", "RShift", "IsNonOverlappingAndDenseIndicator",
})
_SYMPY_CONSTANTS = frozenset({"oo", "zoo", "nan", "true", "false", "S"})
_POWERS = frozenset({"Pow", "PowByNatural", "FloatPow", "LShift", "RShift"})
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NUMBER = re.compile(r"^[-+]?[0-9.]+(e[-+]?[0-9]+)?$", re.IGNORECASE)

# Python that ``torch.export`` writes into ``guards_code`` (ShapeGuardPythonPrinter); no ``**``,
# which could make even plain arithmetic run for ever.
_GUARD_OPERATORS = (ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not, ast.USub, ast.UAdd,
                    ast.BinOp, ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod,
                    ast.Compare, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.Load)
# sympy's srepr is calls only: Mul(Integer(4), Symbol('s0', integer=True)), and Integer(-1).
_SYMPY_NODES = (ast.Expression, ast.Call, ast.Name, ast.Constant, ast.keyword, ast.UnaryOp, ast.USub, ast.Load)
GUARD_FUNCTIONS = frozenset({"max", "min", "abs", "int", "float"})
GUARD_MATH_FUNCTIONS = frozenset({"floor", "ceil", "trunc", "sqrt"})
GUARD_TENSOR_METHODS = frozenset({"size", "stride", "storage_offset"})


def is_exported_program_file(path: Path) -> bool:
    """True when ``path`` is a zip whose one top folder holds ``archive_format`` = ``pt2``."""
    try:
        with zipfile.ZipFile(path) as archive:
            files = _files(archive)
            return _FORMAT_FILE in files and archive.read(files[_FORMAT_FILE]).decode().strip() == _FORMAT_VALUE
    except (zipfile.BadZipFile, OSError, UnicodeDecodeError, ModelError):
        return False


def check_archive(path: Path) -> None:
    """Refuse an archive that ``torch.export.load`` could only read by running code from it.

    Raises:
        ModelError: the file is not a ``torch.export.save`` archive of this torch generation.
        UnsafeModelError: reading it would unpickle objects, load native code or evaluate
            Python text from the file.
    """
    check_export_archive_bytes(path)  # empty, random bytes, an image: said as such
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise ModelError(f"{path.name} is not a torch.export archive (.pt2): {error}") from error
    with archive:
        files = _files(archive)
        if _read(archive, files, _FORMAT_FILE, path).strip() != _FORMAT_VALUE:
            raise ModelError(f"{path.name} is not a torch.export archive: save it with torch.export.save")
        native = sorted(name for name in files if name.startswith(_NATIVE_CODE_DIRS))
        if native:
            raise UnsafeModelError(
                f"{path.name} contains compiled native code (AOTInductor, {native[0]}), which loading would run; "
                "save the ExportedProgram itself with torch.export.save(program, path)"
            )
        models = sorted(name for name in files if name.startswith(_MODELS_DIR) and name.endswith(".json"))
        if not models:
            raise ModelError(f"{path.name} holds no exported program (models/*.json); save one with torch.export.save")
        for model in models:
            _check_model(archive, files, model[len(_MODELS_DIR):-len(".json")], path)


def _files(archive: zipfile.ZipFile) -> dict[str, str]:
    """Archive paths without the top folder (torch names it after the file) -> zip member names."""
    names = [name for name in archive.namelist() if not name.endswith("/")]
    roots = {name.split("/", 1)[0] for name in names}
    if len(roots) != 1 or any("/" not in name for name in names):
        raise ModelError("the archive must hold one top folder, as torch.export.save writes it")
    return {name.split("/", 1)[1]: name for name in names}


def _read(archive: zipfile.ZipFile, files: dict[str, str], name: str, path: Path) -> str:
    if name not in files:
        raise ModelError(f"{path.name} lacks {name}; it was not written by torch.export.save of a recent torch")
    try:
        return archive.read(files[name]).decode("utf-8")
    except UnicodeDecodeError as error:
        raise ModelError(f"{path.name}: {name} is not text") from error


def _json(archive: zipfile.ZipFile, files: dict[str, str], name: str, path: Path) -> Any:
    try:
        return json.loads(_read(archive, files, name, path))
    except json.JSONDecodeError as error:
        raise ModelError(f"{path.name}: {name} is not valid JSON ({error})") from error


def _check_model(archive: zipfile.ZipFile, files: dict[str, str], model: str, path: Path) -> None:
    unsafe = f"{path.name} (program {model!r})"
    for legacy in (f"{_WEIGHTS_DIR}{model}.pt", f"{_CONSTANTS_DIR}{model}.pt"):
        if legacy in files:
            raise UnsafeModelError(f"{unsafe} stores {legacy} as a pickle, which loading would unpickle; "
                                   "save it again with torch.export.save of torch 2.6 or later")
    for config_name, what in ((f"{_WEIGHTS_DIR}{model}_weights_config.json", "weights"),
                              (f"{_CONSTANTS_DIR}{model}_constants_config.json", "constants")):
        config = _json(archive, files, config_name, path)
        entries = config.get("config", {}) if isinstance(config, dict) else None
        if not isinstance(entries, dict):
            raise ModelError(f"{path.name}: {config_name} has no 'config' mapping")
        for name, entry in entries.items():
            pickled = not isinstance(entry, dict) or entry.get("use_pickle", True)
            plain = isinstance(entry, dict) and (what == "weights" or
                                                  str(entry.get("path_name", "")).startswith(_TENSOR_CONSTANT_PREFIX))
            if pickled or not plain:
                raise UnsafeModelError(
                    f"{unsafe} stores its {what} entry {name!r} as a pickled Python object, which loading would "
                    "unpickle; export a model whose parameters and buffers are plain tensors"
                )
    _check_sample_inputs(archive, files, f"data/sample_inputs/{model}.pt", unsafe)
    program = _json(archive, files, f"{_MODELS_DIR}{model}.json", path)
    for text in _values_of(program, "expr_str"):
        if not is_safe_sympy_text(text):
            raise UnsafeModelError(f"{unsafe} holds a size expression that is not plain arithmetic ({text[:80]!r}); "
                                   "loading would evaluate it as Python")
    guards = program.get("guards_code", []) if isinstance(program, dict) else []
    for guard in guards if isinstance(guards, list) else [guards]:
        if not isinstance(guard, str) or parse_guard(guard) is None:
            raise UnsafeModelError(f"{unsafe} holds a shape guard that is not plain size arithmetic ({str(guard)[:80]!r}); "
                                   "loading would run it as Python")


def _check_sample_inputs(archive: zipfile.ZipFile, files: dict[str, str], name: str, unsafe: str) -> None:
    """torch reads the example inputs with ``weights_only=True`` and, if that fails, without it: refuse the latter."""
    if name not in files or archive.getinfo(files[name]).file_size == 0:
        return
    import pickle

    import torch

    try:
        torch.load(io.BytesIO(archive.read(files[name])), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, TypeError, AttributeError, EOFError) as error:
        raise UnsafeModelError(f"{unsafe} has example inputs that need full unpickling (arbitrary code) to read; "
                               f"export it with tensor example inputs ({type(error).__name__})") from error


def _values_of(data: Any, key: str) -> Iterator[Any]:
    """Every value stored under ``key`` anywhere in a JSON tree."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for name, value in item.items():
                if name == key:
                    yield value
                stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)


def is_safe_sympy_text(text: Any) -> bool:
    """True when ``text`` is a sympy ``srepr`` of size arithmetic: calls of known sympy classes on
    numbers, size-symbol names and each other, nothing that ``sympify`` could run as other Python
    (no attribute, no operator but unary minus, strings only as a Symbol's name or a Float's digits)."""
    if not isinstance(text, str):
        return False
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError):
        return False
    callees = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in _SYMPY_FUNCTIONS:
                return False
            for position, argument in enumerate(node.args):
                if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
                    pattern = _IDENTIFIER if node.func.id == "Symbol" else _NUMBER
                    if position != 0 or node.func.id not in ("Symbol", "Float") or not pattern.match(argument.value):
                        return False
            if any(k.arg is None or not isinstance(k.value, ast.Constant) for k in node.keywords):
                return False
            if node.func.id in _POWERS and len(node.args) == 2 and not _small_exponent(node.args[1]):
                return False  # Pow(Integer(10), Integer(10**12)) is arithmetic that never ends
        elif isinstance(node, ast.Constant) and isinstance(node.value, int) and abs(node.value) > 2**64:
            return False
        elif isinstance(node, ast.Name):
            if id(node) not in callees and node.id not in _SYMPY_CONSTANTS:
                return False
        elif isinstance(node, ast.Constant):
            if not isinstance(node.value, (int, float, bool, str)):
                return False
        elif not isinstance(node, _SYMPY_NODES):
            return False
    return True


def _small_exponent(node: ast.AST) -> bool:
    """An exponent sympy can evaluate at once: a size symbol, or an integer up to 64."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("Symbol", "Integer"):
        if node.func.id == "Symbol":
            return True
        node = node.args[0] if node.args else node
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        node = node.operand
    return isinstance(node, ast.Constant) and isinstance(node.value, int) and abs(node.value) <= 64


def parse_guard(text: str) -> ast.Expression | None:
    """The guard as a Python expression tree, or None if it is more than size arithmetic.

    Allowed: numbers, arithmetic, comparisons, ``and``/``or``/``not``, ``max``/``min``/``abs``/
    ``int``/``float``, ``math.floor``/``ceil``/``trunc``/``sqrt``, and ``L[key].size()[i]``,
    ``.stride()[i]``, ``.storage_offset()`` of the program's input ``L[key]``.
    """
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError):
        return None
    allowed: set[int] = set()  # nodes already accepted as parts of an input-size reference or a call
    for node in ast.walk(tree):
        if id(node) in allowed:
            continue
        if isinstance(node, ast.Call) and not node.keywords:
            func = node.func
            if isinstance(func, ast.Name) and func.id in GUARD_FUNCTIONS:
                allowed.add(id(func))
                continue
            if (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "math"
                    and func.attr in GUARD_MATH_FUNCTIONS):
                allowed.update({id(func), id(func.value)})
                continue
            if (isinstance(func, ast.Attribute) and func.attr in GUARD_TENSOR_METHODS and not node.args
                    and input_key(func.value) is not None):
                allowed.update(id(part) for part in ast.walk(func))
                continue
            return None
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Call):
            if isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, int):
                allowed.add(id(node.slice))
                continue
            return None
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, bool)):
            continue
        if not isinstance(node, _GUARD_OPERATORS):
            return None
    return tree


def input_key(node: ast.AST) -> str | None:
    """``key`` when ``node`` is ``L['key']`` (the guard's name for the program's input), else None."""
    if (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "L"
            and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str)):
        return node.slice.value
    return None
