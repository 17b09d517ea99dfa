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


def list_layers(model: nn.Module, example_shape: Sequence[int]) -> list[LayerInfo]:
    """Run one no-grad forward pass on zeros of ``example_shape`` (with batch, e.g. ``(1, 1, 64, 64, 64)``)
    and return every named submodule with the shape of its output."""
    device = model_device(model)
    example = torch.zeros(tuple(example_shape), device=device)
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
    return [LayerInfo(name, type(module).__name__, shapes.get(name)) for name, module in modules]
