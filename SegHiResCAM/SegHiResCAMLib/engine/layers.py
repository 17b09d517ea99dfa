"""List a model's layers with their output shapes, for the panel's layer list and for messages."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import SegHiResCAMWarning
from .device import model_device, prepared_model
from .held_model import held_model


@dataclass(frozen=True)
class LayerInfo:
    """One module: its dotted name, class name, output shape in the probe, and whether it can be explained.

    Attributes:
        name: the layer's path, as ``layer=`` takes it.
        type: the module's class name.
        output_shape: its output's shape in the probe; None when it is not called or returns no tensor.
        unusable: why it cannot be explained (it runs several times, is never called, returns no
            tensor, ...); None when it can.
    """

    name: str
    type: str
    output_shape: tuple[int, ...] | None
    unusable: str | None = None


def probe_shape(model: nn.Module, example_shape: Sequence[int]) -> tuple[int, ...]:
    """``example_shape``, with the sizes a model accepts only one value for (an exported program's
    fixed axes, from its ``accepted_shape``) put in."""
    accepted = getattr(model, "accepted_shape", None)
    return tuple(accepted(example_shape)) if accepted is not None else tuple(example_shape)


def list_layers(model, example_shape: Sequence[int]) -> list[LayerInfo]:
    """Every named submodule with the shape of its output, marking those that cannot be explained.

    One no-grad forward pass runs on zeros of ``example_shape`` (with batch, e.g. ``(1, 1, 64, 64, 64)``;
    see :func:`probe_shape`), with the model in its owner's inference mode (see
    ``engine.device.prepared_model``). ``model`` may also be a TorchScript module or a ``LoadedModel``,
    as for ``explain``.
    """
    held = held_model(model)
    model = held.module
    for message in held.notes:
        warnings.warn(message, SegHiResCAMWarning, stacklevel=2)
    device = model_device(model)
    floating = [t.dtype for t in list(model.parameters()) + list(model.buffers()) if t.dtype.is_floating_point]
    example = torch.zeros(probe_shape(model, example_shape), device=device,
                          dtype=floating[0] if floating else torch.float32)
    if hasattr(model, "forward_capturing"):
        return _list_scripted(model, example, device)
    shapes: dict[str, tuple[int, ...] | None] = {}
    calls: dict[str, int] = {}
    returned: dict[str, str] = {}

    def recorder(name: str):
        def hook(module, inputs, output):
            calls[name] = calls.get(name, 0) + 1
            if isinstance(output, torch.Tensor):
                shapes.setdefault(name, tuple(output.shape))
            else:
                returned.setdefault(name, type(output).__name__)

        return hook

    modules = [(name, module) for name, module in model.named_modules() if name]
    handles = [module.register_forward_hook(recorder(name)) for name, module in modules]
    try:
        with torch.no_grad(), prepared_model(model, device):
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    # Stand-ins of exported programs carry the original class name.
    return [LayerInfo(name, getattr(module, "original_name", type(module).__name__), shapes.get(name),
                      _why_unusable(calls.get(name, 0), returned.get(name)))
            for name, module in modules]


def _why_unusable(calls: int, returned: str | None) -> str | None:
    """The same reasons the hooks give when such a layer is explained (engine.capture)."""
    if calls == 0:
        return "it is not used when the model runs"
    if calls > 1:
        return f"it runs {calls} times in one forward pass, so its output is ambiguous"
    if returned is not None:
        return f"it returns {returned}, not a tensor"
    return None


def _list_scripted(model: nn.Module, example: torch.Tensor, device: torch.device) -> list[LayerInfo]:
    """TorchScript adapters: shapes of every capturable layer from one run, the others with their reason."""
    problems = model.layer_problems() if hasattr(model, "layer_problems") else {}
    names = model.layer_names()
    usable = [name for name, _ in names if name not in problems]
    with torch.no_grad(), prepared_model(model, device):
        _, outputs = model.forward_capturing(example, usable)
    shapes = {name: tuple(out.shape) for name, out in zip(usable, outputs) if isinstance(out, torch.Tensor)}
    return [LayerInfo(name, kind, shapes.get(name), problems[name][0] if name in problems else None)
            for name, kind in names]
