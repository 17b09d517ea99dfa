"""Explain programs saved with ``torch.export`` (``.pt2``), TorchScript's successor.

An ``ExportedProgram`` has no submodules to hook: its graph calls ATen operators directly, and
each node records, in ``nn_module_stack``, which module calls of the original model it ran in.
``ExportedModel`` rebuilds the module tree from that metadata: one stand-in module per original
module path (``decoder.2.conv``), holding the program's parameters and buffers under their
original names. A copy of the graph passes each module call's output through its stand-in, an
identity call that fires forward hooks. The engine's own capture (graph cut at the layer,
gradients downstream only), Kernel-Weighted Contribution's channel gate, the layer listing and
the memory probe then work unchanged, and a module that runs twice (both call sites call the
same stand-in) is refused by the same check as in a Python model.

torch 2.13 exports a graph that is not functional (``relu_`` stays in place, batch norm in
training mode writes its buffers). A graph of plainly pure operators, and in-place versions of
them that write only to values the graph computed, runs as exported: an in-place write after a
layer then meets the engine's hook clone, as in the Python model. Anything else is made
functional by torch first (``run_decompositions`` with no decompositions), which also shows
programs in training mode (they return their updated buffers) so they can be refused.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from ..errors import ModelError
from .card import ModelCard
from .exported_checks import check_calls, check_inference_program, check_inputs, needs_functionalization, user_outputs
from .exported_graph import insert_stand_ins, module_aliases, module_calls
from .exported_shapes import InputShape


def load_exported(path: Path) -> ExportedModel:
    """Check and load a ``.pt2`` archive onto the CPU as an :class:`ExportedModel`.

    Raises:
        UnsafeModelError: reading the archive would run code from it (see ``exported_archive``).
        ModelError: it is not a loadable program, or not one SegHiResCAM can explain.
    """
    from .exported_archive import check_archive

    check_archive(path)
    try:
        with open(path, "rb") as stream:  # a stream, so torch does not warn about the file name
            program = torch.export.load(stream)
    except Exception as error:  # torch raises RuntimeError, ValueError, AssertionError, SerializeError here
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelError(f"cannot read the exported program {path.name} (saved by another torch version?): "
                         f"{first}") from error
    return ExportedModel(program, name=path.name)


def card_defaults(model: ExportedModel) -> dict[str, int]:
    """Model-card fields the program itself tells: spatial dims, input channels, and the
    multiple the spatial sizes must be of (from its guards); a card beside the file overrides them."""
    shape = model.input_shape
    if len(shape.sizes) not in (4, 5):
        raise ModelError(f"the exported program {model.program_name} takes {len(shape.sizes)}-dimensional inputs; "
                         "SegHiResCAM explains 2D and 3D segmentation models, (batch, channels, *spatial)")
    divisible = 1
    for axis in range(2, len(shape.sizes)):
        k = shape.divisor(axis)
        divisible = divisible * k // math.gcd(divisible, k)
    channels = shape.fixed[1] if len(shape.fixed) > 1 and shape.fixed[1] is not None else 1
    return {"spatial_dims": len(shape.sizes) - 2, "in_channels": channels, "divisible_by": divisible}


def fit_card(model: ExportedModel, card: ModelCard) -> ModelCard:
    """``card`` made to agree with the program: its spatial dims must match, ``divisible_by``
    becomes a multiple of what the program's guards require (padding then makes every input fit),
    and a program whose spatial sizes are all fixed gets them as ``patch_size`` unless the card
    names one (it runs only on windows of that size)."""
    told = card_defaults(model)
    if card.spatial_dims != told["spatial_dims"]:
        raise ModelError(f"the model card says spatial_dims={card.spatial_dims}, but the exported program "
                         f"{model.program_name} takes {told['spatial_dims']}D inputs; fix the card")
    need = told["divisible_by"]
    spatial = model.input_shape.fixed[2:]
    patch = card.patch_size
    if patch is None and all(size is not None for size in spatial):
        patch = tuple(int(size) for size in spatial)
    return replace(card, divisible_by=card.divisible_by * need // math.gcd(card.divisible_by, need), patch_size=patch)


class LayerOutput(nn.Module):
    """Stands for one module of the exported model: holds its parameters, and its output passes through it.

    ``original_name`` is the original module's class name (``Conv3d``), from ``nn_module_stack``.
    """

    def __init__(self, original_name: str) -> None:
        super().__init__()
        self.original_name = original_name

    def forward(self, value):
        return value


class ExportedModel(nn.Module):
    """An ``ExportedProgram`` as a module whose submodules are its original module paths.

    ``model(x)`` runs the program and returns its output as the original model did (a tensor, or a
    tuple, list or dict, from which the engine picks the segmentation); forward hooks on ``model.get_submodule("decoder.0")`` see that module's output as
    in the original model. Parameters and buffers keep their original names. ``train()`` and
    ``eval()`` change nothing: a program runs as it was exported (in eval mode, or it is refused).

    Attributes:
        input_shape: which input shapes the program accepts (``fixed``, ``describe()``,
            ``batch_limit``, ``divisor(axis)``); ``forward`` refuses others with an InputError.
        made_functional: whether the graph had to be made functional first (in-place or unknown
            operators); a graph of plainly pure operators runs as exported, which loads faster.
    """

    def __init__(self, program: torch.export.ExportedProgram, name: str = "program") -> None:
        super().__init__()
        self.program_name = name
        check_calls(program.graph, name)
        check_inputs(program, name)
        functional = program
        if needs_functionalization(program.graph):
            try:
                with warnings.catch_warnings():
                    # torch's own deprecation notices from inside run_decompositions are not the user's to act on
                    warnings.simplefilter("ignore", FutureWarning)
                    functional = program.run_decompositions(decomp_table={})
            except Exception as error:  # noqa: BLE001 - torch raises many types; the message says what failed
                raise ModelError(f"the exported program {name} cannot be made functional for explaining: "
                                 f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from error
            check_calls(functional.graph, name)
        self.made_functional = functional is not program
        check_inference_program(functional, name)
        kinds = [spec.kind.name for spec in functional.graph_signature.input_specs]
        placeholders = [node for node in functional.graph.nodes if node.op == "placeholder"]
        # the guards of the program as loaded: torch keeps the file's (the decomposed copy re-derives its own)
        self.input_shape = InputShape(placeholders[kinds.index("USER_INPUT")], functional.range_constraints,
                                      getattr(program, "_guards_code", []) or [], name)
        graph = fx.Graph()
        graph.output(graph.graph_copy(functional.graph, {}))
        calls = module_calls(graph)
        self._build_tree(functional, calls)
        self._sources = self._register_state(functional)
        insert_stand_ins(graph, calls)
        graph.lint()
        self._graph = graph
        self._runners: dict[str, fx.GraphModule] = {}
        self._outputs, self._output_spec = user_outputs(functional)
        self.to("cpu")
        # An inference program (others are refused above) runs as exported; its flags say so, so the
        # engine does not take it for a model left in training mode.
        self.eval()

    # -------------------------------------------------------------- structure
    def _build_tree(self, program: torch.export.ExportedProgram, calls: dict[str, tuple[str, str, int]]) -> None:
        kinds: dict[str, str] = {}
        for path, kind, _ in calls.values():
            kinds.setdefault(path, kind)
        # module_call_graph lists the original modules in definition order, also those never called
        paths = [entry.fqn for entry in program.module_call_graph if entry.fqn and "@" not in entry.fqn]
        paths += sorted(set(kinds) - set(paths))
        aliases = module_aliases(program, paths)
        for path in paths:
            if path in aliases:  # one module under two names: one stand-in, as named_modules() shows it once
                canonical = self._module_at(aliases[path], kinds.get(path, "Module"))
                parent_path, _, leaf = path.rpartition(".")
                parent = self._module_at(parent_path) if parent_path else self
                if leaf not in parent._modules:
                    parent.add_module(leaf, canonical)
            else:
                self._module_at(path, kinds.get(path, "Module"))

    def _module_at(self, path: str, kind: str = "Module") -> nn.Module:
        module: nn.Module = self
        for depth, part in enumerate(path.split(".")):
            if part not in module._modules:
                prefix = ".".join(path.split(".")[: depth + 1])
                if hasattr(module, part):
                    raise ModelError(f"the exported program {self.program_name} has a module named {prefix!r}, "
                                     "which clashes with a torch.nn.Module attribute")
                module.add_module(part, LayerOutput(kind if prefix == path else "Module"))
            module = module._modules[part]
        if isinstance(module, LayerOutput) and module.original_name == "Module":
            module.original_name = kind
        return module

    def _register_state(self, program: torch.export.ExportedProgram) -> list[tuple[nn.Module | None, str]]:
        """Register parameters, buffers and constants at their original paths; return, per graph
        input, where to find it at call time (``(None, "")`` for the image)."""
        from torch.export.graph_signature import InputKind

        sources: list[tuple[nn.Module | None, str]] = []
        for spec in program.graph_signature.input_specs:
            if spec.kind == InputKind.USER_INPUT:
                sources.append((None, ""))
                continue
            owner_path, _, leaf = spec.target.rpartition(".")
            owner = self._module_at(owner_path) if owner_path else self
            if spec.kind == InputKind.PARAMETER:
                value = program.state_dict[spec.target]
                if not isinstance(value, nn.Parameter):
                    value = nn.Parameter(value, requires_grad=value.requires_grad)
                if leaf not in owner._parameters:
                    owner.register_parameter(leaf, value)
            else:  # BUFFER (persistent or not) or CONSTANT_TENSOR
                persistent = spec.kind == InputKind.BUFFER and spec.persistent
                value = program.state_dict[spec.target] if persistent else program.constants[spec.target]
                if leaf not in owner._buffers:
                    owner.register_buffer(leaf, value, persistent=persistent)
            sources.append((owner, leaf))
        return sources

    @property
    def batch_limit(self) -> int | None:
        """The most samples one call may take (the engine's batches respect it); None: no limit."""
        return self.input_shape.batch_limit

    @property
    def fixed_spatial_shape(self) -> tuple[int, ...] | None:
        """The spatial size a static-shape program runs on (sliding windows of it apply to larger
        images, ``engine.window_plan``); None when some spatial size may vary."""
        spatial = self.input_shape.fixed[2:]
        return None if any(size is None for size in spatial) else tuple(int(size) for size in spatial)

    def accepted_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """``shape`` with the program's fixed sizes put in (for probing layer shapes)."""
        return self.input_shape.accepted(shape)

    # -------------------------------------------------------------- running
    def _runner(self, device: torch.device) -> fx.GraphModule:
        """The graph, with the device of every tensor it creates set to ``device`` (as torch's
        ``move_to_device_pass`` does: export records the device it ran on), compiled once per device."""
        key = str(device)
        if key not in self._runners:
            graph = fx.Graph()
            graph.output(graph.graph_copy(self._graph, {}))
            for node in graph.nodes:
                if node.kwargs.get("device") is not None:
                    node.kwargs = {**node.kwargs, "device": device}
                if node.target is torch.ops.aten.to.device:
                    node.args = (node.args[0], device, *node.args[2:])
            self._runners[key] = fx.GraphModule(self, graph)
        return self._runners[key]

    def forward(self, x: torch.Tensor) -> object:
        """Run the program on ``x`` (shape checked first) and return its output, nested as the model's."""
        x = x.contiguous()
        self.input_shape.check(x)
        inputs = [x if owner is None else (owner._parameters.get(leaf) if leaf in owner._parameters
                                             else owner._buffers[leaf])
                  for owner, leaf in self._sources]
        flat = self._runner(x.device)(*inputs)
        mine = [flat[index] for index in self._outputs]
        return mine[0] if self._output_spec is None else pytree.tree_unflatten(mine, self._output_spec)
