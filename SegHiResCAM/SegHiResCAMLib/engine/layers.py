"""List a model's layers with their output shapes, for the panel's layer list and for messages."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .device import model_device, prepared_model


@dataclass(frozen=True)
class LayerInfo:
    """One module: its dotted name, class name, and output shape in the probe (None if unused or not a tensor)."""

    name: str
    type: str
    output_shape: tuple[int, ...] | None


def probe_shape(model: nn.Module, example_shape: Sequence[int]) -> tuple[int, ...]:
    """``example_shape``, with the sizes a model accepts only one value for (an exported program's
    fixed axes, from its ``accepted_shape``) put in."""
    accepted = getattr(model, "accepted_shape", None)
    return tuple(accepted(example_shape)) if accepted is not None else tuple(example_shape)


def list_layers(model: nn.Module, example_shape: Sequence[int]) -> list[LayerInfo]:
    """Run one no-grad forward pass on zeros of ``example_shape`` (with batch, e.g. ``(1, 1, 64, 64, 64)``;
    see :func:`probe_shape`) and return every named submodule with the shape of its output."""
    device = model_device(model)
    example = torch.zeros(probe_shape(model, example_shape), device=device)
    if hasattr(model, "forward_capturing"):
        names = model.layer_names()
        with torch.no_grad(), prepared_model(model, device):
            _, outputs = model.forward_capturing(example, [name for name, _ in names])
        return [
            LayerInfo(name, kind, tuple(out.shape) if isinstance(out, torch.Tensor) else None)
            for (name, kind), out in zip(names, outputs)
        ]
    shapes: dict[str, tuple[int, ...] | None] = {}

    def recorder(name: str):
        def hook(module, inputs, output):
            shapes.setdefault(name, tuple(output.shape) if isinstance(output, torch.Tensor) else None)

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
    return [LayerInfo(name, getattr(module, "original_name", type(module).__name__), shapes.get(name))
            for name, module in modules]
