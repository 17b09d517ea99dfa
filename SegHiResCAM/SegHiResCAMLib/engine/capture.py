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
    """Raise LayerError naming the closest existing names when a layer is unknown, or saying why
    a layer cannot be explained where the model knows before running (TorchScript adapters)."""
    known = layer_names(model)
    known_set = set(known)
    problems = model.layer_problems() if hasattr(model, "layer_problems") else {}
    for layer in layers:
        if layer not in known_set:
            close = difflib.get_close_matches(layer, known, n=5, cutoff=0.5) or known[:5]
            raise LayerError(f"layer '{layer}' does not exist; nearest names: {', '.join(close)}")
        if layer in problems:
            why, instead = problems[layer]
            raise LayerError(f"layer '{layer}' cannot be explained: {why}; {instead}")


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
    model: nn.Module, inputs: torch.Tensor, layers: Sequence[str], output_key: int | str | None = None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run ``model(inputs)`` and return its segmentation output and the listed layers' outputs.

    The activations require grad and the output depends on them differentiably.
    Models that cannot take hooks (TorchScript adapters) provide ``forward_capturing``.
    ``output_key`` picks the segmentation from a tuple, list or dict output (see :func:`select_output`).
    """
    if hasattr(model, "forward_capturing"):
        # Without hooks the graph cannot be cut at the layer: record it from the input, so the
        # activations reach the output differentiably even when every parameter is frozen.
        with torch.enable_grad():
            output, activations = model.forward_capturing(inputs.detach().requires_grad_(), list(layers))
        return select_output(output, inputs, output_key), list(activations)

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
    return select_output(output, inputs, output_key), [recorder.outputs[name] for name in layers]


def select_output(output, batch: torch.Tensor, output_key: int | str | None = None) -> torch.Tensor:
    """The segmentation among what the model returned for inputs shaped like ``batch``.

    A tensor is used as it is. From a tuple, list or dict (deep supervision, UNet++, auxiliary
    heads) comes entry ``output_key`` (index or key) when given; otherwise the one entry of shape
    ``(N, classes, *spatial)`` at the input's full resolution (nnU-Net and HD-BET put it first,
    then coarser ones), or, when none is at full resolution, the one such entry. Several
    candidates and no key: a refusal that says how to choose, never a guess.

    Raises:
        ModelError: no entry qualifies, several do, or ``output_key`` names no tensor entry.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        entries = list(output.items())
    elif isinstance(output, (list, tuple)):
        entries = list(enumerate(output))
    else:
        raise ModelError(f"the model returned {type(output).__name__}; a segmentation model must return a tensor "
                         "(or a tuple, list or dict of tensors)")
    keys = ", ".join(repr(key) for key, _ in entries) or "none"
    if output_key is not None:
        if isinstance(output, (list, tuple)) and isinstance(output_key, int) and -len(output) <= output_key < 0:
            output_key += len(output)  # -1: the last entry
        chosen = dict(entries).get(output_key) if not isinstance(output_key, bool) else None
        if not isinstance(chosen, torch.Tensor):
            raise ModelError(f"the model's output has no tensor entry {output_key!r} (output_key); its entries: {keys}")
        return chosen
    shaped = [(key, value) for key, value in entries if isinstance(value, torch.Tensor) and value.ndim == batch.ndim]
    full = [(key, value) for key, value in shaped if tuple(value.shape[2:]) == tuple(batch.shape[2:])]
    candidates = full or shaped
    if len(candidates) == 1:
        return candidates[0][1]
    if not candidates:
        raise ModelError(f"the model returned a {type(output).__name__} with no (N, classes, *spatial) tensor "
                         f"(entries: {keys}); SegHiResCAM explains segmentation outputs")
    listed = ", ".join(f"{key!r} {tuple(value.shape)}" for key, value in candidates)
    where = "at the input's resolution" if full else "of segmentation shape"
    raise ModelError(
        f"the model returns {len(candidates)} outputs {where} ({listed}) and nothing says which is the segmentation; "
        "name it with output_key (the model card's \"output_key\", or output_key= in Python): for UNet++ with deep "
        "supervision the last entry is the full network's output"
    )


def segmentation_output(output, batch: torch.Tensor, class_index: int,
                        output_key: int | str | None = None) -> torch.Tensor:
    """The model's output as ``(B, classes, *spatial)`` with ``class_index`` among its classes, or a clear error."""
    output = select_output(output, batch, output_key)
    if output.ndim != batch.ndim:
        how = "without the spatial dimensions of" if output.ndim < batch.ndim else "with more dimensions than"
        raise ModelError(
            f"the model's output has shape {tuple(output.shape)}, {how} its input {tuple(batch.shape)}; "
            "SegHiResCAM explains segmentation models whose output is (N, classes, *spatial)"
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
