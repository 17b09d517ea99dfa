"""Which exported programs SegHiResCAM runs: ATen operators and size arithmetic only, in eval
mode (no buffer updates, no random numbers), one image in, a tensor (or a list starting with one) out."""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

from ..errors import ModelError

# What a program may call besides ATen operators: the size arithmetic torch's verifier allows.
_SIZE_ARITHMETIC = frozenset({
    operator.getitem, operator.add, operator.mul, operator.sub, operator.truediv, operator.floordiv,
    operator.mod, operator.pow, operator.neg, operator.pos, operator.abs, operator.eq, operator.ne,
    operator.le, operator.ge, operator.lt, operator.gt, operator.and_, operator.or_, operator.not_,
    operator.lshift, operator.rshift, round, torch.sym_int, torch.sym_float, torch.sym_ite, torch.sym_max,
    torch.sym_min, torch.sym_not, torch.sym_sqrt,
})


# ATen operators whose schema states all they do: nothing in place, no hidden state, no randomness.
_PURE = frozenset({
    "convolution", "_convolution", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
    "conv_transpose3d", "linear", "addmm", "mm", "bmm", "matmul", "relu", "leaky_relu", "gelu", "silu", "sigmoid",
    "tanh", "hardtanh", "elu", "prelu", "_prelu_kernel", "softmax", "_softmax", "log_softmax", "_log_softmax",
    "cat", "stack", "add", "sub", "mul", "div", "neg", "pow", "sqrt", "rsqrt", "exp", "log", "abs", "clamp",
    "clamp_min", "clamp_max", "where", "maximum", "minimum", "mean", "sum", "amax", "amin", "max_pool1d",
    "max_pool2d", "max_pool3d", "max_pool2d_with_indices", "max_pool3d_with_indices", "avg_pool1d", "avg_pool2d",
    "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "_adaptive_avg_pool2d",
    "_adaptive_avg_pool3d", "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "upsample_linear1d",
    "upsample_bilinear2d", "upsample_trilinear3d", "_upsample_nearest_exact2d", "_upsample_nearest_exact3d",
    "pad", "constant_pad_nd", "reflection_pad2d", "reflection_pad3d", "replication_pad2d", "replication_pad3d",
    "view", "reshape", "_unsafe_view", "permute", "transpose", "t", "contiguous", "clone", "flatten", "unflatten",
    "unsqueeze", "squeeze", "expand", "slice", "select", "narrow", "split", "split_with_sizes", "chunk",
    "alias", "detach", "to", "_to_copy", "type_as", "group_norm", "native_group_norm", "layer_norm",
    "native_layer_norm", "sym_size", "sym_numel", "sym_stride", "_assert_tensor_metadata", "_assert_scalar",
    "scalar_tensor", "zeros", "ones", "full", "zeros_like", "ones_like", "full_like", "arange",
})
# Pure only while this flag argument is False: in training they update running statistics or draw noise.
_PURE_UNLESS = {"batch_norm": "training", "dropout": "train", "feature_dropout": "train", "alpha_dropout": "train",
                "feature_alpha_dropout": "train"}


def _argument(node: fx.Node, schema, name: str):
    names = [argument.name for argument in schema.arguments]
    position = names.index(name)
    return node.args[position] if position < len(node.args) else node.kwargs.get(name)


def _aliases_of_inputs(graph: fx.Graph) -> set[fx.Node]:
    """The placeholders (weights, buffers, the image) and every value that may share their memory (views)."""
    found = {node for node in graph.nodes if node.op == "placeholder"}
    for node in graph.nodes:
        target = node.target
        viewed = target is operator.getitem or (
            isinstance(target, torch._ops.OpOverload) and any(r.alias_info is not None for r in target._schema.returns))
        if node.op == "call_function" and viewed and any(arg in found for arg in node.all_input_nodes):
            found.add(node)
    return found


def needs_functionalization(graph: fx.Graph) -> bool:
    """False when the graph, run as exported, does what the eager module did and nothing more: pure
    operators (``_PURE``, batch norm and dropout in eval mode, instance norm without running
    statistics) and in-place versions of them (``relu_``, ``add_``) that write only to values the
    graph computed, never to weights, buffers or the image. In-place writes after a layer are then
    met as in a Python model: the engine's hook hands on a clone. True for anything else (training
    mode, writes to the inputs, unknown operators): torch makes the graph functional first."""
    inputs = None
    for node in graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        schema = target._schema
        packet = schema.name.split("::")[-1]
        if torch.Tag.nondeterministic_seeded in target.tags:
            return True
        if schema.is_mutable:
            if not (packet.endswith("_") and packet[:-1] in _PURE):
                return True
            inputs = _aliases_of_inputs(graph) if inputs is None else inputs
            written = [_argument(node, schema, a.name) for a in schema.arguments if a.alias_info and a.alias_info.is_write]
            if any(value in inputs for value in written):
                return True
        elif packet in _PURE_UNLESS:
            if _argument(node, schema, _PURE_UNLESS[packet]) is not False:
                return True
        elif packet == "instance_norm":
            statistics = _argument(node, schema, "running_mean") is not None
            if statistics and _argument(node, schema, "use_input_stats") is not False:
                return True
        elif packet not in _PURE:
            return True
    return False


def check_calls(graph: fx.Graph, name: str) -> None:
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


def check_inputs(program: torch.export.ExportedProgram, name: str) -> None:
    """Refuse programs that take anything but one image tensor besides their weights."""
    from torch.export.graph_signature import InputKind, TensorArgument

    inputs = [spec for spec in program.graph_signature.input_specs if spec.kind == InputKind.USER_INPUT]
    if len(inputs) != 1 or not isinstance(inputs[0].arg, TensorArgument):
        raise ModelError(f"the exported program {name} takes {len(inputs)} inputs; SegHiResCAM explains programs "
                         "that take one image tensor (batch, channels, *spatial)")
    other = {spec.kind for spec in program.graph_signature.input_specs} - {
        InputKind.USER_INPUT, InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR}
    if other:
        raise ModelError(f"the exported program {name} takes {', '.join(sorted(k.name for k in other))} inputs "
                         "(script objects or effect tokens), which SegHiResCAM does not run")


def check_inference_program(program: torch.export.ExportedProgram, name: str) -> None:
    """Refuse programs that change their own state or draw random numbers when they run (seen once
    the graph is functional: batch norm in training mode then returns its updated statistics)."""
    from torch.export.graph_signature import OutputKind

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
    check_inputs(program, name)
    for node in program.graph.nodes:
        if isinstance(node.target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in node.target.tags:
            raise ModelError(f"the exported program {name} draws random numbers ({node.target}, e.g. dropout): "
                             f"{training_hint}")


def user_outputs(program: torch.export.ExportedProgram) -> tuple[list[int], Any]:
    """Indices, among the graph's outputs, of the model's own outputs, and how they nest (the
    program's output tree spec; None when the model returns one tensor). The engine picks the
    segmentation from a tuple, list or dict as for a Python model (``engine.capture.select_output``)."""
    from torch.export.graph_signature import OutputKind

    indices = [i for i, spec in enumerate(program.graph_signature.output_specs) if spec.kind == OutputKind.USER_OUTPUT]
    spec = program.call_spec.out_spec
    return indices, (None if spec is None or spec.is_leaf() else spec)
