"""Explain programs saved with ``torch.export`` (``.pt2``), TorchScript's successor.

An ``ExportedProgram`` has no submodules to hook: its graph calls ATen operators directly, and
each node records, in ``nn_module_stack``, which module calls of the original model it ran in.
``ExportedModel`` rebuilds the module tree from that metadata: one stand-in module per original
module path (``decoder.2.conv``), holding the program's parameters and buffers under their
original names. A copy of the graph, made functional first (``run_decompositions`` with no
decompositions, so ``relu_`` becomes ``relu`` and batch norm returns its buffers instead of
writing them), passes each module call's output through its stand-in, an identity call that
fires forward hooks. The engine's own capture (graph cut at the layer, gradients downstream
only), Kernel-Weighted Contribution's channel gate, the layer listing and the memory probe then
work unchanged, and a module that runs twice (both call sites call the same stand-in) is
refused by the same check as in a Python model.
"""

from __future__ import annotations

import bisect
import math
import operator
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import fx, nn

from ..errors import ModelError
from .card import ModelCard
from .exported_shapes import InputShape

# What a program may call besides ATen operators: the size arithmetic torch's verifier allows.
_SIZE_ARITHMETIC = frozenset({
    operator.getitem, operator.add, operator.mul, operator.sub, operator.truediv, operator.floordiv,
    operator.mod, operator.pow, operator.neg, operator.pos, operator.abs, operator.eq, operator.ne,
    operator.le, operator.ge, operator.lt, operator.gt, operator.and_, operator.or_, operator.not_,
    operator.lshift, operator.rshift, round, torch.sym_int, torch.sym_float, torch.sym_ite, torch.sym_max,
    torch.sym_min, torch.sym_not, torch.sym_sqrt,
})


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
    """``card`` made to agree with the program: its spatial dims must match, and ``divisible_by``
    becomes a multiple of what the program's guards require (padding then makes every input fit)."""
    told = card_defaults(model)
    if card.spatial_dims != told["spatial_dims"]:
        raise ModelError(f"the model card says spatial_dims={card.spatial_dims}, but the exported program "
                         f"{model.program_name} takes {told['spatial_dims']}D inputs; fix the card")
    need = told["divisible_by"]
    return replace(card, divisible_by=card.divisible_by * need // math.gcd(card.divisible_by, need))


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

    ``model(x)`` runs the program and returns its output (the first one when it returns a tuple
    or list); forward hooks on ``model.get_submodule("decoder.0")`` see that module's output as
    in the original model. Parameters and buffers keep their original names. ``train()`` and
    ``eval()`` change nothing: a program runs as it was exported (in eval mode, or it is refused).

    Attributes:
        input_shape: which input shapes the program accepts (``fixed``, ``describe()``,
            ``batch_limit``, ``divisor(axis)``); ``forward`` refuses others with an InputError.
    """

    def __init__(self, program: torch.export.ExportedProgram, name: str = "program") -> None:
        super().__init__()
        self.program_name = name
        _check_calls(program.graph, name)
        try:
            functional = program.run_decompositions(decomp_table={})
        except Exception as error:  # noqa: BLE001 - torch raises many types; the message says what failed
            raise ModelError(f"the exported program {name} cannot be made functional for explaining: "
                             f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from error
        _check_calls(functional.graph, name)
        _check_inference_program(functional, name)
        kinds = [spec.kind.name for spec in functional.graph_signature.input_specs]
        placeholders = [node for node in functional.graph.nodes if node.op == "placeholder"]
        # the guards of the program as loaded: torch keeps the file's (the decomposed copy re-derives its own)
        self.input_shape = InputShape(placeholders[kinds.index("USER_INPUT")], functional.range_constraints,
                                      getattr(program, "_guards_code", []) or [], name)
        graph = fx.Graph()
        graph.output(graph.graph_copy(functional.graph, {}))
        calls = _module_calls(graph)
        self._build_tree(functional, calls)
        self._sources = self._register_state(functional)
        _insert_stand_ins(graph, calls)
        graph.lint()
        self._graph = graph
        self._runners: dict[str, fx.GraphModule] = {}
        self._output_index = _first_user_output(functional, name)
        self.to("cpu")

    # -------------------------------------------------------------- structure
    def _build_tree(self, program: torch.export.ExportedProgram, calls: dict[str, tuple[str, str, int]]) -> None:
        kinds: dict[str, str] = {}
        for path, kind, _ in calls.values():
            kinds.setdefault(path, kind)
        # module_call_graph lists the original modules in definition order, also those never called
        paths = [entry.fqn for entry in program.module_call_graph if entry.fqn and "@" not in entry.fqn]
        paths += sorted(set(kinds) - set(paths))
        aliases = _module_aliases(program, paths)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the program on ``x`` (shape checked first) and return its output."""
        x = x.contiguous()
        self.input_shape.check(x)
        inputs = [x if owner is None else (owner._parameters.get(leaf) if leaf in owner._parameters
                                             else owner._buffers[leaf])
                  for owner, leaf in self._sources]
        return self._runner(x.device)(*inputs)[self._output_index]


def _module_aliases(program: torch.export.ExportedProgram, paths: Sequence[str]) -> dict[str, str]:
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


def _module_calls(graph: fx.Graph) -> dict[str, tuple[str, str, int]]:
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


def _insert_stand_ins(graph: fx.Graph, calls: dict[str, tuple[str, str, int]]) -> None:
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


def _check_calls(graph: fx.Graph, name: str) -> None:
    """Refuse graphs that call anything but ATen operators and size arithmetic (checked before
    ``run_decompositions`` traces the graph, which calls each target)."""
    for node in graph.nodes:  # control flow first: its branches are get_attr nodes
        if node.op == "call_function" and isinstance(node.target, torch._ops.HigherOrderOperator):
            raise ModelError(f"the exported program {name} uses {node.target.name()} (control flow, or a block run "
                             "without gradients), which SegHiResCAM cannot look into; export the network without it")
    for node in graph.nodes:
        if node.op in ("call_module", "call_method", "get_attr"):
            raise ModelError(f"the exported program {name} has a {node.op} node ({node.target}); SegHiResCAM runs "
                             "programs made of ATen operators only (torch.export.export without torch.cond or "
                             "other control flow)")
        if node.op != "call_function":
            continue
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            if target.namespace != "aten" or target is torch.ops.aten.from_file.default:
                raise ModelError(f"the exported program {name} calls {target}, which is not an ATen tensor operator "
                                 "SegHiResCAM runs; export the network without custom operators")
        elif target not in _SIZE_ARITHMETIC:
            raise ModelError(f"the exported program {name} calls {getattr(target, '__name__', target)}, which is not "
                             "an ATen operator; SegHiResCAM runs programs made of ATen operators only")


def _check_inference_program(program: torch.export.ExportedProgram, name: str) -> None:
    """Refuse programs that change their own state or draw random numbers when they run."""
    from torch.export.graph_signature import InputKind, OutputKind

    training_hint = ("it was exported in training mode; call model.eval() before torch.export.export "
                     "(SegHiResCAMLib.models.exporting.export_model does)")
    kinds = {spec.kind for spec in program.graph_signature.output_specs}
    if OutputKind.BUFFER_MUTATION in kinds:
        raise ModelError(f"the exported program {name} updates its buffers when it runs (batch norm statistics): "
                         f"{training_hint}")
    odd = kinds - {OutputKind.USER_OUTPUT, OutputKind.USER_INPUT_MUTATION}
    if odd:
        raise ModelError(f"the exported program {name} returns {', '.join(sorted(k.name for k in odd))}: it is not "
                         "an inference program; export the model's forward in eval mode")
    inputs = [spec for spec in program.graph_signature.input_specs if spec.kind == InputKind.USER_INPUT]
    if len(inputs) != 1 or not isinstance(inputs[0].arg, torch.export.graph_signature.TensorArgument):
        raise ModelError(f"the exported program {name} takes {len(inputs)} inputs; SegHiResCAM explains programs "
                         "that take one image tensor (batch, channels, *spatial)")
    other = {spec.kind for spec in program.graph_signature.input_specs} - {
        InputKind.USER_INPUT, InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR}
    if other:
        raise ModelError(f"the exported program {name} takes {', '.join(sorted(k.name for k in other))} inputs "
                         "(script objects or effect tokens), which SegHiResCAM does not run")
    for node in program.graph.nodes:
        if isinstance(node.target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in node.target.tags:
            raise ModelError(f"the exported program {name} draws random numbers ({node.target}, e.g. dropout): "
                             f"{training_hint}")


def _first_user_output(program: torch.export.ExportedProgram, name: str) -> int:
    """Index, among the graph's outputs, of the model's output (the first of a tuple or list)."""
    from torch.export.graph_signature import OutputKind

    spec = program.call_spec.out_spec
    if spec is not None and not spec.is_leaf():
        if spec.type not in (tuple, list) or not spec.children_specs or not spec.children_specs[0].is_leaf():
            raise ModelError(f"the exported program {name} returns a {getattr(spec.type, '__name__', spec.type)}; "
                             "a segmentation model must return a tensor (or a list whose first entry is one)")
    kinds = [s.kind for s in program.graph_signature.output_specs]
    return kinds.index(OutputKind.USER_OUTPUT)

