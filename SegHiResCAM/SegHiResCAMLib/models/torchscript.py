"""Explain TorchScript models (``torch.jit.script`` or ``torch.jit.trace``, e.g. MONAI's ``model.ts``).

Forward hooks do not fire on ScriptModules, so the activation of a layer is captured by
editing a copy of the scripted ``forward`` graph: the calls on the path to the chosen
submodule are inlined one level at a time until the call of the submodule itself sits in
the top graph, and its output value is added to the graph's outputs. The new graph runs as
a function on the same module object, so the captured activation is part of the autograd
graph of the output and ``torch.autograd.grad(score, activation)`` works as with hooks.
Layers are named by submodule path (``"up3"``, ``"decoder.2.conv"``), as in ``named_modules()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..errors import LayerError, ModelError

_CALL = "prim::CallMethod"


def is_torchscript_file(path: Path) -> bool:
    """True when ``path`` is a TorchScript archive (a zip holding ``constants.pkl``/``code/``)."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(name.endswith("/constants.pkl") or "/code/" in name for name in names)


def load_torchscript(path: Path) -> "ScriptedModel":
    """Load a TorchScript file onto the CPU and wrap it for capture.

    TorchScript archives hold code and tensors, not Python pickles, so loading one runs no
    arbitrary Python; the code it holds is TorchScript, run by torch's interpreter.
    """
    try:
        scripted = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError as error:
        raise ModelError(f"cannot read the TorchScript file {path.name}: {str(error).splitlines()[0]}") from error
    return ScriptedModel(scripted)


def _module_path(value: torch._C.Value, root: torch._C.Value) -> str | None:
    """The submodule path of a module value built from ``root`` by ``prim::GetAttr`` steps."""
    parts: list[str] = []
    while value is not root and value.unique() != root.unique():
        node = value.node()
        if node.kind() != "prim::GetAttr":
            return None
        parts.append(node.s("name"))
        value = node.input()
    return ".".join(reversed(parts))


def _submodule(module: torch.jit.ScriptModule, path: str) -> torch.jit.ScriptModule:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _calls(graph: torch._C.Graph, root: torch._C.Value) -> list[tuple[str, torch._C.Node]]:
    """(submodule path, node) of every submodule call in the graph, nested blocks included."""
    found = []
    for node in graph.findAllNodes(_CALL):
        path = _module_path(node.inputsAt(0), root)
        if path is not None:
            found.append((path, node))
    return found


def _inline_call(graph: torch._C.Graph, node: torch._C.Node, callee: torch._C.Graph) -> None:
    """Replace one ``prim::CallMethod`` by the body of the called method."""
    with graph.insert_point_guard(node):
        outputs = graph.insertGraph(callee, list(node.inputs()))
    for old, new in zip(node.outputs(), outputs):
        old.replaceAllUsesWith(new)
    node.destroy()


def capture_graph(scripted: torch.jit.ScriptModule, layers: Sequence[str]) -> torch._C.Graph:
    """A copy of ``scripted.forward``'s graph that also returns the outputs of ``layers``.

    The extra outputs come in :func:`capture_order`, after the model's own output.

    Raises:
        LayerError: a layer is not a submodule, is never called by ``forward``, is called more
            than once, or is called inside a loop or branch (its value is then not unique).
    """
    graph = scripted.forward.graph.copy()
    root = next(iter(graph.inputs()))
    for layer in capture_order(layers):
        while True:
            calls = _calls(graph, root)
            outer = [(path, node) for path, node in calls if layer.startswith(path + ".")]
            if not outer:
                break
            for path, node in outer:
                callee = _submodule(scripted, path)._c._get_method(node.s("name")).graph
                _inline_call(graph, node, callee)
        hits = [node for path, node in _calls(graph, root) if path == layer]
        if not hits:
            raise LayerError(
                f"layer {layer!r} is never called by the model's forward (or the TorchScript file was frozen, "
                f"which removes submodules); choose one of: {_name_list(scripted)}"
            )
        if len(hits) > 1:
            raise LayerError(
                f"layer {layer!r} is called {len(hits)} times in one forward pass, so its output is ambiguous; "
                "choose a layer that is used once (for example the block that contains it)"
            )
        node = hits[0]
        if node.owningBlock().owningNode() is not None:  # not the graph's top block
            raise LayerError(
                f"layer {layer!r} is called inside a loop or branch of the scripted forward; choose a layer "
                "outside it (for example the block that contains it)"
            )
        graph.registerOutput(node.output())
    if len(layers):
        graph.makeMultiOutputIntoTuple()  # functions return one value
    return graph


def capture_order(layers: Sequence[str]) -> list[str]:
    """Outer layers first: inlining a block to reach a layer inside it removes the block's own call,
    but an output registered before is carried over to the inlined value."""
    return sorted(layers, key=lambda name: name.count("."))


def _name_list(scripted: nn.Module, limit: int = 12) -> str:
    names = [name for name, _ in scripted.named_modules() if name]
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _type_name(module: nn.Module) -> str:
    return getattr(module, "original_name", type(module).__name__)


class ScriptedModel(nn.Module):
    """A TorchScript module that can return the outputs of chosen submodules.

    ``forward(x)`` returns the model's output (the first element when the scripted
    forward returns a tuple or list, e.g. deep supervision). ``forward_capturing(x, layers)``
    returns ``(output, [activation per layer])`` with the activations inside the autograd graph.
    """

    def __init__(self, scripted: torch.jit.ScriptModule) -> None:
        super().__init__()
        if not isinstance(scripted, torch.jit.ScriptModule):
            raise ModelError(f"expected a TorchScript module, got {type(scripted).__name__}")
        self.scripted = scripted
        self._functions: dict[tuple[str, ...], torch._C.ScriptFunction] = {}
        self._layers: list[tuple[str, str]] | None = None

    @staticmethod
    def _first(output):
        if isinstance(output, (tuple, list)):
            return output[0]
        return output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._first(self.scripted(x))

    def layer_names(self) -> list[tuple[str, str]]:
        """``(name, type)`` of every submodule whose output can be captured, in definition order.

        Left out: containers that are never called (``ModuleList``), and submodules called
        more than once or inside a loop, whose output is not one tensor.
        """
        if self._layers is None:
            layers = []
            for name, module in self.scripted.named_modules():
                if not name:
                    continue
                try:
                    capture_graph(self.scripted, [name])
                except LayerError:
                    continue
                layers.append((name, _type_name(module)))
            self._layers = layers
        return list(self._layers)

    def forward_capturing(self, x: torch.Tensor, layers: Sequence[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the model once and return its output and the outputs of ``layers`` (in that order)."""
        key = tuple(layers)
        known = {name for name, _ in self.scripted.named_modules() if name}
        missing = [name for name in key if name not in known]
        if missing:
            import difflib

            nearest = difflib.get_close_matches(missing[0], sorted(known), n=5, cutoff=0.3)
            raise LayerError(f"layer {missing[0]!r} does not exist in this TorchScript model; nearest names: "
                             f"{', '.join(nearest) or 'none'}; all: {_name_list(self.scripted)}")
        if key not in self._functions:
            graph = capture_graph(self.scripted, key)
            self._functions[key] = torch._C._create_function_from_graph("forward_capturing", graph)
        # The optimising executor fuses ops into differentiable subgraphs that can drop a
        # gradient path into an intermediate value returned as an extra output (seen with
        # skip connections kept in a list); plain execution records every op for autograd.
        with torch.jit.optimized_execution(False):
            results = self._functions[key](self.scripted._c, x)
        if not key:
            return self._first(results), []
        results = list(results)
        count = len(key)
        output = results[0] if len(results) == count + 1 else tuple(results[:-count])
        by_name = dict(zip(capture_order(key), results[-count:]))
        return self._first(output), [by_name[name] for name in key]
