"""Every hook the engine puts on a model: capture layers' outputs, and gate a layer's channels.

The forward pass runs with autograd off until the first captured layer produces its
output; the hook turns that output into a fresh leaf (``detach().requires_grad_()``)
and switches autograd on for the rest of the pass. The encoder in front of the layer
then stores nothing for backward, and ``torch.autograd.grad(y, activation)`` walks
only the part of the network between the layer and the output. :func:`channel_gate`
multiplies a layer's output by per-sample channel masks (the ablations of
Kernel-Weighted Contribution). Hooks are always removed, also on error.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import InputError, LayerError, ModelError
from .torch_errors import is_inplace_modification


def layer_names(model: nn.Module) -> list[str]:
    """Names a user may pick as layers (submodule paths)."""
    if hasattr(model, "layer_names"):
        return [name for name, _ in model.layer_names()]
    return [name for name, _ in model.named_modules() if name]


def check_layers(model: nn.Module, layers: Sequence[str]) -> None:
    """Raise LayerError naming the closest existing names when a layer is unknown."""
    known = layer_names(model)
    known_set = set(known)
    for layer in layers:
        if layer not in known_set:
            close = difflib.get_close_matches(layer, known, n=5, cutoff=0.5) or known[:5]
            raise LayerError(f"layer '{layer}' does not exist; nearest names: {', '.join(close)}")


class _Recorder:
    """Forward hooks that keep each layer's output and cut the graph in front of the first."""

    def __init__(self, layers: Sequence[str]) -> None:
        self.layers = list(layers)
        self.outputs: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = dict.fromkeys(layers, 0)

    def hook_for(self, name: str):
        def hook(module: nn.Module, inputs, output):
            self.calls[name] += 1
            if self.calls[name] > 1:
                raise LayerError(
                    f"layer '{name}' runs more than once in one forward pass, so its output is ambiguous; "
                    "choose a module that is used once (for example one of its callers)"
                )
            if not isinstance(output, torch.Tensor):
                raise LayerError(
                    f"layer '{name}' returns {type(output).__name__}, not a tensor; choose one of its submodules"
                )
            if not output.requires_grad:
                # The first captured layer (autograd is still off), or one that does not depend on an
                # earlier captured layer: make it a leaf and record the graph from here on.
                output = output.detach().requires_grad_()
                torch.set_grad_enabled(True)
            self.outputs[name] = output
            # The clone keeps the captured values intact if the next operation works in place.
            return output.clone()

        return hook


@contextmanager
def _grad_mode_restored() -> Iterator[None]:
    previous = torch.is_grad_enabled()
    try:
        yield
    finally:
        torch.set_grad_enabled(previous)


def forward_with_activations(
    model: nn.Module, inputs: torch.Tensor, layers: Sequence[str]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run ``model(inputs)`` and return its output and the listed layers' outputs.

    The activations require grad and the output depends on them differentiably.
    Models that cannot take hooks (TorchScript adapters) provide ``forward_capturing``.
    """
    if hasattr(model, "forward_capturing"):
        # Without hooks the graph cannot be cut at the layer: record it from the input, so the
        # activations reach the output differentiably even when every parameter is frozen.
        with torch.enable_grad():
            output, activations = model.forward_capturing(inputs.detach().requires_grad_(), list(layers))
        return _as_output_tensor(output), list(activations)

    modules = dict(model.named_modules())
    recorder = _Recorder(layers)
    handles = [modules[name].register_forward_hook(recorder.hook_for(name)) for name in layers]
    try:
        with _grad_mode_restored():
            torch.set_grad_enabled(False)
            try:
                output = model(inputs)
            except RuntimeError as error:
                if is_inplace_modification(error):
                    raise LayerError(
                        f"the output of layer(s) {', '.join(layers)} is changed in place further on; "
                        "choose the module after the in-place operation"
                    ) from error
                raise
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in layers if name not in recorder.outputs]
    if missing:
        raise LayerError(
            f"layer '{missing[0]}' is not used when the model runs, so it cannot explain the output; "
            "choose a layer on the path from the input to the output"
        )
    return _as_output_tensor(output), [recorder.outputs[name] for name in layers]


def _as_output_tensor(output) -> torch.Tensor:
    # Deep-supervision networks return a list whose first entry is the full-resolution output.
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], torch.Tensor):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise ModelError(f"the model returned {type(output).__name__}; a segmentation model must return a tensor")
    return output


def segmentation_output(output, batch: torch.Tensor, class_index: int) -> torch.Tensor:
    """The model's output as ``(B, classes, *spatial)`` with ``class_index`` among its classes, or a clear error."""
    output = _as_output_tensor(output)
    if output.ndim != batch.ndim:
        raise ModelError(
            f"the model's output has shape {tuple(output.shape)}, without the spatial dimensions of its input "
            f"{tuple(batch.shape)}; SegHiResCAM explains segmentation models whose output is (N, classes, *spatial)"
        )
    classes = output.shape[1]
    if not 0 <= class_index < classes:
        raise InputError(
            f"class {class_index} is out of range: the model outputs {classes} class"
            f"{'es' if classes > 1 else ''} (0 to {classes - 1})"
        )
    return output


class ChannelGate:
    """While active: multiplies one layer's output by per-sample channel masks (``masks`` of shape
    ``(B, K)``, None = unchanged) and records its channel count K."""

    def __init__(self, layer: str) -> None:
        self.layer = layer
        self.masks: torch.Tensor | None = None
        self.channels = 0

    def hook(self, module: nn.Module, inputs, output):
        if not isinstance(output, torch.Tensor) or output.ndim < 3:
            raise LayerError(f"layer '{self.layer}' does not return a (N, channels, *spatial) tensor; "
                             "choose a convolution or block output")
        self.channels = output.shape[1]
        if self.masks is None:
            return None
        return output * self.masks.view(*self.masks.shape, *(1,) * (output.ndim - 2)).to(output.dtype)


@contextmanager
def channel_gates(model: nn.Module, layers: Sequence[str]) -> Iterator[dict[str, ChannelGate]]:
    """One :class:`ChannelGate` per layer, hooked for the duration of the ``with`` block."""
    modules = dict(model.named_modules())
    gates = {name: ChannelGate(name) for name in layers}
    handles = []
    try:
        for name, gate in gates.items():
            handles.append(modules[name].register_forward_hook(gate.hook))
        yield gates
    finally:
        for handle in handles:
            handle.remove()
