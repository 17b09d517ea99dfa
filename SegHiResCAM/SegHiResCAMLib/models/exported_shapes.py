"""Which input shapes an exported program accepts, checked before it runs.

``torch.export`` records a program's input as a shape of fixed sizes and symbols (with ranges in
``range_constraints``) plus guards, Python conditions on the sizes (``L['x'].size()[2] ==
4*(L['x'].size()[2] // 4)``). ``ExportedProgram.module()`` checks them by ``exec``-ing that
source; here the guards, already limited to size arithmetic by ``exported_archive.parse_guard``,
are evaluated as expression trees against the input instead, so nothing from the file is executed.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import InputError, ModelError
from .exported_archive import input_key, parse_guard


def _bound(value) -> int | None:
    """An integer range bound, None for an infinite one."""
    from torch.utils._sympy.numbers import int_oo

    if value in (int_oo, -int_oo) or not getattr(value, "is_finite", True):
        return None
    return int(value)


@dataclass(frozen=True)
class Guard:
    text: str
    tree: ast.Expression


class InputShape:
    """The input an exported program accepts: ``check(x)`` raises an InputError naming what it needs."""

    def __init__(self, placeholder: torch.fx.Node, range_constraints: dict, guards: Sequence[str], name: str) -> None:
        value = placeholder.meta.get("val")
        if not isinstance(value, torch.Tensor):
            raise ModelError(f"the exported program {name} does not take a tensor as its input")
        self.placeholder, self.range_constraints, self.name = placeholder, dict(range_constraints), name
        self.guards: list[Guard] = []
        for text in guards:
            tree = parse_guard(text)
            if tree is None:
                raise ModelError(f"the exported program {name} has a shape guard SegHiResCAM cannot read: {text!r}")
            self.guards.append(Guard(text, tree))
        keys = {input_key(node) for guard in self.guards for node in ast.walk(guard.tree)} - {None}
        if len(keys) > 1:
            raise ModelError(f"the exported program {name}'s shape guards name several inputs ({sorted(keys)}); "
                             "SegHiResCAM explains programs that take one image tensor")
        self.sizes = tuple(value.shape)

    @property
    def fixed(self) -> tuple[int | None, ...]:
        """Each axis's required size, None where the program accepts a range."""
        return tuple(size if isinstance(size, int) else None for size in self.sizes)

    @property
    def batch_limit(self) -> int | None:
        """The largest batch the program accepts (None: no limit)."""
        size = self.sizes[0]
        if isinstance(size, int):
            return size
        limits = self.range_constraints.get(size.node.expr)
        return None if limits is None else _bound(limits.upper)

    def divisor(self, axis: int) -> int:
        """k when a guard says the size of ``axis`` must be a multiple of k (the guard
        ``size()[axis] == k*(size()[axis] // k)`` that torch writes for pooling networks), else 1."""
        found = 1
        for guard in self.guards:
            k = _multiple_of(guard.tree.body, axis)
            if k:
                found = found * k // math.gcd(found, k)
        return found

    def describe(self) -> str:
        """The accepted shape, e.g. ``1 x 1 x 16 x 16 x 16`` or ``1 x 1 x (8 to any, multiple of 4) x ...``."""
        parts = []
        for axis, size in enumerate(self.sizes):
            if isinstance(size, int):
                parts.append(str(size))
                continue
            limits = self.range_constraints.get(size.node.expr)
            low = _bound(limits.lower) if limits is not None else None
            high = _bound(limits.upper) if limits is not None else None
            # torch lets sizes 0 and 1 through when the range starts at 2 (its 0/1 specialisation)
            low = 1 if low is None or low <= 2 else low
            text = f"{low} to {high if high is not None else 'any'}"
            if self.divisor(axis) > 1:
                text += f", multiple of {self.divisor(axis)}"
            parts.append(f"({text})")
        return " x ".join(parts)

    def accepted(self, shape: Sequence[int]) -> tuple[int, ...]:
        """``shape`` with every fixed axis replaced by the size the program needs (for probing layers)."""
        shape = tuple(int(s) for s in shape)
        if len(shape) != len(self.sizes):
            return shape
        return tuple(s if f is None else f for s, f in zip(shape, self.fixed))

    def check(self, x: torch.Tensor) -> None:
        """Raise InputError unless the program accepts an input of ``x``'s shape."""
        from torch._export.utils import _check_input_constraints_for_graph
        from torch.utils._pytree import SequenceKey

        got = " x ".join(map(str, x.shape))
        needs = f"it accepts {self.describe()} (batch x channels x spatial axes)"
        if x.ndim != len(self.sizes):
            raise InputError(f"the exported program {self.name} takes {len(self.sizes)}-dimensional inputs, "
                             f"got {got}; {needs}")
        path = (SequenceKey(0), SequenceKey(0))  # torch's name for it: *args[0]
        try:
            _check_input_constraints_for_graph([self.placeholder], [(path, x)], self.range_constraints)
        except RuntimeError as error:
            detail = str(error).split(". If you meant")[0].splitlines()[0]
            detail = detail.replace("Expected input at *args[0]", "expected input").replace("*args[0]", "input")
            raise InputError(f"the exported program {self.name} cannot run on an input of {got} ({detail}); "
                             f"{needs}; give an image of that shape, or export the model with dynamic sizes "
                             "(torch.export.Dim.AUTO)") from error
        sizes = {"size": tuple(x.shape), "stride": tuple(x.stride())}
        for guard in self.guards:
            if not _evaluate(guard.tree.body, sizes, x.storage_offset()):
                condition = guard.text.replace(f"L[{_key_text(guard.tree)}]", "input")
                raise InputError(f"the exported program {self.name} cannot run on an input of {got}: it needs "
                                 f"{condition} (recorded when it was exported); {needs}")


def _key_text(tree: ast.AST) -> str:
    for node in ast.walk(tree):
        key = input_key(node)
        if key is not None:
            return repr(key)
    return "''"


def _size_axis(node: ast.AST) -> int | None:
    """i when ``node`` is ``L[key].size()[i]``."""
    if (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Attribute) and node.value.func.attr == "size"
            and isinstance(node.slice, ast.Constant)):
        return int(node.slice.value)
    return None


def _multiple_of(node: ast.AST, axis: int) -> int | None:
    if not (isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], ast.Eq)):
        return None
    left, right = node.left, node.comparators[0]
    if _size_axis(left) != axis:
        left, right = right, left
    if _size_axis(left) != axis or not (isinstance(right, ast.BinOp) and isinstance(right.op, ast.Mult)):
        return None
    for factor, quotient in ((right.left, right.right), (right.right, right.left)):
        if (isinstance(factor, ast.Constant) and isinstance(quotient, ast.BinOp)
                and isinstance(quotient.op, ast.FloorDiv) and _size_axis(quotient.left) == axis
                and isinstance(quotient.right, ast.Constant) and quotient.right.value == factor.value):
            return int(factor.value)
    return None


_BINARY = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b}
_COMPARE = {ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b, ast.Lt: lambda a, b: a < b,
            ast.LtE: lambda a, b: a <= b, ast.Gt: lambda a, b: a > b, ast.GtE: lambda a, b: a >= b}
_FUNCTIONS = {"max": max, "min": min, "abs": abs, "int": int, "float": float,
              "floor": math.floor, "ceil": math.ceil, "trunc": math.trunc, "sqrt": math.sqrt}


def _evaluate(node: ast.AST, sizes: dict[str, tuple[int, ...]], offset: int):
    """Value of a guard tree accepted by ``parse_guard``, for an input with these sizes and strides."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Subscript):
        return sizes[node.value.func.attr][int(node.slice.value)]
    if isinstance(node, ast.Call):
        if isinstance(node.func, ast.Attribute) and node.func.attr == "storage_offset":
            return offset
        name = node.func.id if isinstance(node.func, ast.Name) else node.func.attr
        return _FUNCTIONS[name](*(_evaluate(a, sizes, offset) for a in node.args))
    if isinstance(node, ast.BinOp):
        return _BINARY[type(node.op)](_evaluate(node.left, sizes, offset), _evaluate(node.right, sizes, offset))
    if isinstance(node, ast.UnaryOp):
        value = _evaluate(node.operand, sizes, offset)
        return (not value) if isinstance(node.op, ast.Not) else (-value if isinstance(node.op, ast.USub) else value)
    if isinstance(node, ast.BoolOp):  # short-circuit, as Python evaluates it
        wanted = isinstance(node.op, ast.Or)
        for value in node.values:
            if bool(_evaluate(value, sizes, offset)) == wanted:
                return wanted
        return not wanted
    if isinstance(node, ast.Compare):
        left = _evaluate(node.left, sizes, offset)
        for op, right_node in zip(node.ops, node.comparators):
            right = _evaluate(right_node, sizes, offset)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    raise ModelError(f"cannot evaluate the shape guard element {type(node).__name__}")
