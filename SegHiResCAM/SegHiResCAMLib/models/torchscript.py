"""Explain TorchScript models (``torch.jit.script`` or ``torch.jit.trace``, e.g. MONAI's ``model.ts``).

Forward hooks do not fire on ScriptModules, so the activation of a layer is captured by
editing a copy of the scripted ``forward`` graph: the calls on the path to the chosen
submodule are inlined one level at a time until the call of the submodule itself sits in
the top graph, and its output value is added to the graph's outputs. Later uses get a copy
of that value (``aten::clone``), as the eager path's hook returns a clone: an in-place
operation after the layer (``x += skip``, ``relu_``) changes the copy, never the captured
activation. The new graph runs as a function on the same module object, so the captured
activation is part of the autograd graph of the output and ``torch.autograd.grad(score,
activation)`` works as with hooks.

Layers are named by submodule path (``"up3"``, ``"decoder.2.conv"``), as in ``named_modules()``.
A layer must run exactly once per forward pass, as with hooks: the whole call tree is walked,
following the modules that a traced model passes into its blocks as arguments (a module shared
by several blocks is traced as one path called from each block). Scripting gives each path of a
shared module its own copy, so there each path is called once, as its own layer.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ..errors import LayerError, ModelError

_CALL = "prim::CallMethod"


def load_torchscript(path: Path) -> "ScriptedModel":
    """Load a TorchScript file onto the CPU and wrap it for capture.

    TorchScript archives hold code and tensors, not Python pickles, so loading one runs no
    arbitrary Python; the code it holds is TorchScript, run by torch's interpreter.
    """
    try:
        scripted = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError as error:
        raise ModelError(
            f"cannot read the TorchScript file {path.name} (it may be damaged or cut short, or written by a newer "
            f"PyTorch): {str(error).splitlines()[0]}"
        ) from error
    return ScriptedModel(scripted)


@dataclass(frozen=True)
class _Site:
    """One call of a submodule somewhere in one run of ``forward``."""

    target: str  # the called module's path, as the caller reaches it
    caller: str  # path of the module whose method makes the call ("" = the model itself)
    nested: bool  # inside a loop or branch, here or in an enclosing call
    depth: int  # enclosing calls between the model's forward and this one
    returns: str  # the kind of value returned ("TensorType", "TupleType", ...)


def _resolve(value: torch._C.Value, known: dict[int, str]) -> str | None:
    """The submodule path of a module value: a known value followed by ``prim::GetAttr`` steps."""
    parts: list[str] = []
    while value.unique() not in known:
        node = value.node()
        if node.kind() != "prim::GetAttr":
            return None
        parts.append(node.s("name"))
        value = node.input()
    return ".".join(([known[value.unique()]] if known[value.unique()] else []) + parts[::-1])


def _submodule(module: torch.jit.ScriptModule, path: str) -> torch.jit.ScriptModule:
    for part in path.split("."):
        module = getattr(module, part)
    return module


class CallTree:
    """Every submodule call that one run of a ScriptModule's ``forward`` makes, at every depth."""

    def __init__(self, scripted: torch.jit.ScriptModule) -> None:
        self.scripted = scripted
        self.modules = dict(scripted.named_modules())
        self._memo: dict[tuple, list[_Site]] = {}
        graph = scripted.forward.graph
        self.sites = self.sites_in(graph, {next(iter(graph.inputs())).unique(): ""}, "")

    def sites_in(self, graph: torch._C.Graph, known: dict[int, str], caller: str) -> list[_Site]:
        """Calls made by ``graph`` (whose module values ``known`` names) and by everything it calls."""
        found: list[_Site] = []
        for node in graph.findAllNodes(_CALL):  # nested blocks included
            target = _resolve(node.inputsAt(0), known)
            if target is None or target not in self.modules:
                continue
            nested = node.owningBlock().owningNode() is not None
            if target != caller:  # a module calling its own methods runs once
                found.append(_Site(target, caller, nested, 0, node.output().type().kind()))
            for site in self.callee_sites(node, known):
                found.append(replace(site, nested=site.nested or nested, depth=site.depth + 1))
        return found

    def callee_sites(self, node: torch._C.Node, known: dict[int, str]) -> list[_Site]:
        """The calls made inside the method that ``node`` calls (module arguments followed)."""
        target = _resolve(node.inputsAt(0), known)
        if target is None or target not in self.modules:
            return []
        arguments = tuple(_resolve(value, known) for value in list(node.inputs())[1:])
        key = (target, node.s("name"), arguments)
        if key not in self._memo:
            graph = self.modules[target]._c._get_method(node.s("name")).graph
            inputs = list(graph.inputs())
            names = {inputs[0].unique(): target}
            names.update({value.unique(): path for value, path in zip(inputs[1:], arguments)
                          if path is not None and path in self.modules})
            self._memo[key] = self.sites_in(graph, names, target)
        return self._memo[key]

    def calls_of(self, layer: str) -> list[_Site]:
        """Every call of the submodule at path ``layer``."""
        return [site for site in self.sites if site.target == layer]

    def problem(self, layer: str) -> tuple[str, str] | None:
        """(why, what to do) when ``layer``'s output cannot be captured as one tensor; None when it can."""
        calls = self.calls_of(layer)
        if not calls:
            return ("it is never called by the model's forward",
                    "choose a layer on the path from the input to the output (a container such as ModuleList "
                    "is never called itself)")
        if len(calls) > 1:
            callers = ", ".join(dict.fromkeys(site.caller or "the model's forward" for site in calls))
            return (f"it runs {len(calls)} times in one forward pass (called from {callers}), so its output is "
                    "ambiguous", "choose a module that is used once (for example one of its callers)")
        if calls[0].nested:
            return ("it is called inside a loop or branch of the scripted forward, so it may run several times or "
                    "not at all", "choose a layer outside it (for example the block that contains it)")
        if calls[0].returns != "TensorType":
            kind = calls[0].returns.replace("Type", "").lower()
            return f"it returns a {kind}, not a tensor", "choose one of its submodules"
        return None


def _inline_call(graph: torch._C.Graph, node: torch._C.Node, callee: torch._C.Graph) -> None:
    """Replace one ``prim::CallMethod`` by the body of the called method."""
    with graph.insert_point_guard(node):
        outputs = graph.insertGraph(callee, list(node.inputs()))
    for old, new in zip(node.outputs(), outputs):
        old.replaceAllUsesWith(new)
    node.destroy()


def _call_in_top_graph(graph: torch._C.Graph, root: torch._C.Value, tree: CallTree, layer: str) -> torch._C.Node:
    """The node calling ``layer``, after inlining, one level at a time, the calls that lead to it."""
    known = {root.unique(): ""}
    while True:
        calls = [node for node in graph.nodes() if node.kind() == _CALL]
        for node in calls:
            if _resolve(node.inputsAt(0), known) == layer:
                return node
        outer = [node for node in calls if any(site.target == layer for site in tree.callee_sites(node, known))]
        if not outer:  # the call tree said it runs once; a mismatch here is a bug, not the user's
            raise RuntimeError(f"the call of layer {layer!r} was not found while editing the TorchScript graph")
        target = _resolve(outer[0].inputsAt(0), known)
        _inline_call(graph, outer[0], tree.modules[target]._c._get_method(outer[0].s("name")).graph)


def _give_later_uses_a_copy(graph: torch._C.Graph, node: torch._C.Node) -> None:
    """Every use after ``node`` gets a clone of its output, so in-place ops downstream leave the output as it was."""
    value = node.output()
    with graph.insert_point_guard(node):
        copy = graph.insert("aten::clone", [value])
    copy.node().moveAfter(node)
    value.replaceAllUsesAfterNodeWith(copy.node(), copy)


def capture_graph(scripted: torch.jit.ScriptModule, layers: Sequence[str],
                  tree: CallTree | None = None) -> tuple[torch._C.Graph, list[str]]:
    """A copy of ``scripted.forward``'s graph that also returns the outputs of ``layers``.

    Returns:
        ``(graph, order)``: the extra outputs follow the model's own output in ``order``
        (outer calls first: inlining a block to reach a layer inside it removes the block's own
        call, and an output registered before is carried over to the inlined value).

    Raises:
        LayerError: a layer is never called by ``forward``, runs more than once, is called inside
            a loop or branch, or returns no tensor.
    """
    tree = tree or CallTree(scripted)
    for layer in layers:
        problem = tree.problem(layer)
        if problem is not None:
            raise LayerError(f"layer {layer!r} cannot be explained: {problem[0]}; {problem[1]}")
    order = sorted(dict.fromkeys(layers), key=lambda name: tree.calls_of(name)[0].depth)
    graph = scripted.forward.graph.copy()
    root = next(iter(graph.inputs()))
    for layer in order:
        node = _call_in_top_graph(graph, root, tree, layer)
        _give_later_uses_a_copy(graph, node)
        graph.registerOutput(node.output())
    if order:
        graph.makeMultiOutputIntoTuple()  # functions return one value
    return graph, order


def _name_list(scripted: nn.Module, limit: int = 12) -> str:
    names = [name for name, _ in scripted.named_modules() if name]
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _type_name(module: nn.Module) -> str:
    return getattr(module, "original_name", type(module).__name__)


class ScriptedModel(nn.Module):
    """A TorchScript module that can return the outputs of chosen submodules.

    ``forward(x)`` returns what the scripted forward returns (a tensor, or a tuple, list or dict
    of them, from which the engine picks the segmentation). ``forward_capturing(x, layers)``
    returns ``(output, [activation per layer])`` with the activations inside the autograd graph.
    The wrapper's own ``training`` flag mirrors the scripted module's top-level flag.
    """

    def __init__(self, scripted: torch.jit.ScriptModule) -> None:
        super().__init__()
        if not isinstance(scripted, torch.jit.ScriptModule):
            raise ModelError(f"expected a TorchScript module, got {type(scripted).__name__}")
        self.scripted = scripted
        self.training = scripted.training  # the flag only: train() would also change every submodule
        self._functions: dict[tuple[str, ...], tuple[torch._C.ScriptFunction, list[str]]] = {}
        self._tree: CallTree | None = None

    def forward(self, x: torch.Tensor):
        return self.scripted(x)

    def submodules(self) -> list[tuple[str, nn.Module]]:
        """``(path, module)`` of every submodule, named as layers are (without the wrapper's prefix)."""
        return [(name, module) for name, module in self.scripted.named_modules() if name]

    def layer_names(self) -> list[tuple[str, str]]:
        """``(name, type)`` of every submodule, in definition order (see :meth:`layer_problems`)."""
        return [(name, _type_name(module)) for name, module in self.submodules()]

    def layer_problems(self) -> dict[str, tuple[str, str]]:
        """Layer name -> (why its output cannot be captured, what to do instead), for those that cannot."""
        if self._tree is None:
            self._tree = CallTree(self.scripted)
        found = {name: self._tree.problem(name) for name, _ in self.submodules()}
        return {name: problem for name, problem in found.items() if problem is not None}

    def forward_capturing(self, x: torch.Tensor, layers: Sequence[str]) -> tuple[object, list[torch.Tensor]]:
        """Run the model once and return its output and the outputs of ``layers`` (in that order)."""
        key = tuple(layers)
        known = {name for name, _ in self.submodules()}
        missing = [name for name in key if name not in known]
        if missing:
            nearest = difflib.get_close_matches(missing[0], sorted(known), n=5, cutoff=0.3)
            raise LayerError(f"layer {missing[0]!r} does not exist in this TorchScript model; nearest names: "
                             f"{', '.join(nearest) or 'none'}; all: {_name_list(self.scripted)}")
        if key not in self._functions:
            if self._tree is None:
                self._tree = CallTree(self.scripted)
            graph, order = capture_graph(self.scripted, key, self._tree)
            self._functions[key] = torch._C._create_function_from_graph("forward_capturing", graph), order
        function, order = self._functions[key]
        # The optimising executor fuses ops into differentiable subgraphs that can drop a
        # gradient path into an intermediate value returned as an extra output (seen with
        # skip connections kept in a list); plain execution records every op for autograd.
        with torch.jit.optimized_execution(False):
            results = function(self.scripted._c, x)
        if not order:
            return results, []
        results = list(results)
        count = len(order)
        output = results[0] if len(results) == count + 1 else tuple(results[:-count])
        by_name = dict(zip(order, results[-count:]))
        return output, [by_name[name] for name in key]
