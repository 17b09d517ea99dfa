"""The module structure of an exported program, read from its ``nn_module_stack`` metadata, and
the graph edit that passes each module call's output through a stand-in module."""

from __future__ import annotations

import bisect
import operator
from collections.abc import Sequence

import torch
from torch import fx


def module_aliases(program: torch.export.ExportedProgram, paths: Sequence[str]) -> dict[str, str]:
    """Module paths that name one module of the original model (``nn.Sequential(self.conv, ...)``,
    a decoder holding its encoder): alias -> the first name in definition order.

    torch.export keeps a parameter entry per name, pointing at one storage; two paths are taken as
    one module when they and their descendants (by relative name) hold the same storages.
    """
    own: dict[str, list[tuple]] = {}
    for spec in program.graph_signature.input_specs:
        if spec.kind.name == "USER_INPUT" or not spec.target:
            continue
        value = program.state_dict.get(spec.target, program.constants.get(spec.target))
        if isinstance(value, torch.Tensor) and value.numel() > 0:
            owner, _, leaf = spec.target.rpartition(".")
            own.setdefault(owner, []).append((leaf, value.untyped_storage().data_ptr(), value.storage_offset(),
                                              tuple(value.shape), tuple(value.stride()), str(value.dtype)))
    ordered = sorted(paths)
    first: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for path in paths:
        # the descendants of "a.b" sort between "a.b." and "a.b/" ("/" follows ".")
        inside = ordered[bisect.bisect_left(ordered, path + "."):bisect.bisect_left(ordered, path + "/")]
        signature = (tuple(sorted(own.get(path, []))),
                     tuple(sorted((p[len(path):], tuple(sorted(own.get(p, [])))) for p in inside)))
        if not signature[0] and not any(tensors for _, tensors in signature[1]):
            continue  # nothing to recognise it by
        if signature in first and not path.startswith(first[signature] + "."):
            aliases[path] = first[signature]
        else:
            first.setdefault(signature, path)
    return aliases


def _type_name(kind) -> str:
    text = kind if isinstance(kind, str) else getattr(kind, "__qualname__", str(kind))
    return text.strip("<>'\" ").replace("class ", "").rsplit(".", 1)[-1]


def module_calls(graph: fx.Graph) -> dict[str, tuple[str, str, int]]:
    """Every module call in ``nn_module_stack`` metadata: key -> (path, class name, nesting depth)."""
    calls: dict[str, tuple[str, str, int]] = {}
    for node in graph.nodes:
        for depth, (key, (path, kind)) in enumerate(_stack(node)):
            calls.setdefault(key, (path, _type_name(kind), depth))
    return calls


def _stack(node: fx.Node) -> list[tuple[str, tuple[str, object]]]:
    """(call key, (module path, class)) of the module calls a node ran in, outermost first, root left out."""
    stack = node.meta.get("nn_module_stack") or {}
    return [(key, value) for key, value in stack.items() if value[0]]


def _is_tensor(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


def insert_stand_ins(graph: fx.Graph, calls: dict[str, tuple[str, str, int]]) -> None:
    """Pass each module call's output through a ``call_module`` of its stand-in.

    Innermost calls first: a block's output is then its last child's stand-in output, so hooks
    see what the original modules returned (a replacement returned by an inner hook included).
    A call whose several tensors leave it passes them as one tuple, as a module returning a tuple.
    """
    keys_of = {node: [key for key, _ in _stack(node)] for node in graph.nodes if node.op == "call_function"}
    for key in sorted(calls, key=lambda k: -calls[k][2]):
        path = calls[key][0]
        members = {node for node, keys in keys_of.items() if key in keys}
        ordered = [node for node in graph.nodes if node in members]
        leaving = [node for node in ordered if _is_tensor(node) and any(user not in members for user in node.users)]
        if not leaving:
            continue  # nothing it computes reaches the output
        outer = next(keys[: keys.index(key)] for node, keys in keys_of.items() if node in members)
        with graph.inserting_after(ordered[-1]):
            value = leaving[0] if len(leaving) == 1 else tuple(leaving)
            stand_in = graph.call_module(path, (value,))
        stand_in.meta["val"] = leaving[0].meta["val"] if len(leaving) == 1 else tuple(n.meta["val"] for n in leaving)
        keys_of[stand_in] = outer
        replacements = [stand_in]
        if len(leaving) > 1:
            replacements = []
            anchor = stand_in
            for index, node in enumerate(leaving):
                with graph.inserting_after(anchor):
                    part = graph.call_function(operator.getitem, (stand_in, index))
                part.meta["val"], keys_of[part], anchor = node.meta["val"], outer, part
                replacements.append(part)
        for node, replacement in zip(leaving, replacements):
            for user in list(node.users):
                if user not in members and user is not stand_in:
                    user.replace_input_with(node, replacement)
