"""nnU-Net's ensemble of trained folds as one model: the mean of the folds' logits.

nnU-Net's predictor averages the (sliding-window) logits of every fold it finds. Here a layer
name ("decoder.stages.1") names that layer in every fold, and its activation is the folds'
activations side by side along the channel axis. The target of the ensemble is
``y = sum_p m(p) (1/F) sum_f z_{f,c}(p)``, so ``dy/dA`` holds each fold's gradient of its share,
and every method, being a sum over channels of per-channel terms, gives the sum of the folds'
maps for their shares: the ensemble's map, exactly.

The engine captures such a model through ``forward_capturing`` (the protocol TorchScript models
use): each fold first runs to the layer without a graph, then again with the layer's output
replaced by its slice of the concatenated leaf, so the graph starts at the layer in every fold.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import LayerError


class _Stop(Exception):
    """Ends a fold's forward pass once the layer of interest has run."""


class FoldEnsemble(nn.Module):
    """The mean of ``folds``' outputs (same architecture, different weights)."""

    def __init__(self, folds: Sequence[nn.Module], names: Sequence[str]) -> None:
        super().__init__()
        self.folds = nn.ModuleList(folds)
        self.fold_names = tuple(names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for fold in self.folds:
            out = fold(x)
            total = out if total is None else total + out
        return total / len(self.folds)

    def layer_names(self) -> list[tuple[str, str]]:
        """Layer names (one network's, standing for that layer in every fold) and their types."""
        return [(name, type(module).__name__) for name, module in self.folds[0].named_modules() if name]

    def forward_capturing(self, x: torch.Tensor, layers: Sequence[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The ensemble's output and, per layer, the folds' activations concatenated along channels.

        Layers later in the network stay attached to earlier ones (their total derivative), as in
        the engine's hook-based capture.
        """
        layers = list(layers)
        known = dict(self.folds[0].named_modules())
        for name in layers:
            if name not in known or not name:
                raise LayerError(f"layer '{name}' does not exist in the folds' network")
        previous = torch.is_grad_enabled()
        try:
            order, first = self._first_outputs(x, layers)
            leaves = {order[0]: torch.cat(first, dim=1).detach().requires_grad_()}
            for name in order[1:]:
                parts = [self._run(fold, x, leaves, stop_at=name) for fold in self.folds]
                leaves[name] = torch.cat(parts, dim=1)
            total = None
            for fold in self.folds:
                out = self._run(fold, x, leaves, stop_at=None)
                total = out if total is None else total + out
        finally:
            torch.set_grad_enabled(previous)
        return total / len(self.folds), [leaves[name] for name in layers]

    def _first_outputs(self, x: torch.Tensor, layers: list[str]) -> tuple[list[str], list[torch.Tensor]]:
        """The layers in the order they run, and each fold's output of the first of them (no graph)."""
        order = list(layers) if len(layers) == 1 else _execution_order(self.folds[0], x, layers)
        return order, [_output_of(fold, x, order[0]) for fold in self.folds]

    def _run(self, fold: nn.Module, x: torch.Tensor, leaves: dict[str, torch.Tensor],
             stop_at: str | None) -> torch.Tensor:
        """One fold with each captured layer's output replaced by its slice of the leaves; the graph
        starts at the first of them. With ``stop_at``, returns that layer's (attached) output."""
        index = list(self.folds).index(fold)
        modules = dict(fold.named_modules())
        captured: list[torch.Tensor] = []

        def replace(name: str):
            def hook(module, inputs, output):
                if name == stop_at:
                    captured.append(output)
                    raise _Stop()
                width = output.shape[1]
                torch.set_grad_enabled(True)
                return leaves[name][:, index * width:(index + 1) * width].clone()

            return hook

        handles = [modules[name].register_forward_hook(replace(name))
                   for name in (*leaves, *([stop_at] if stop_at else []))]
        try:
            torch.set_grad_enabled(False)
            out = fold(x)
        except _Stop:
            return captured[0]
        finally:
            for handle in handles:
                handle.remove()
        if isinstance(out, (list, tuple)):
            out = out[0]
        return out


def _execution_order(fold: nn.Module, x: torch.Tensor, layers: list[str]) -> list[str]:
    """The order in which ``layers`` run in one forward pass (each must run exactly once)."""
    seen: list[str] = []
    modules = dict(fold.named_modules())

    def recorder(name: str):
        def hook(module, inputs, output):
            if name in seen:
                raise LayerError(f"layer '{name}' runs more than once in one forward pass, so its output is "
                                 "ambiguous; choose a module that is used once")
            seen.append(name)

        return hook

    handles = [modules[name].register_forward_hook(recorder(name)) for name in layers]
    try:
        with torch.no_grad():
            fold(x)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in layers if name not in seen]
    if missing:
        raise LayerError(f"layer '{missing[0]}' is not used when the model runs, so it cannot explain the output; "
                         "choose a layer on the path from the input to the output")
    return seen


def _output_of(fold: nn.Module, x: torch.Tensor, name: str) -> torch.Tensor:
    """``name``'s output in one forward pass of ``fold`` without a graph; the pass stops there."""
    kept: list[torch.Tensor] = []

    def hook(module, inputs, output):
        if not isinstance(output, torch.Tensor):
            raise LayerError(f"layer '{name}' returns {type(output).__name__}, not a tensor; choose one of its "
                             "submodules")
        kept.append(output.detach())
        raise _Stop()

    handle = dict(fold.named_modules())[name].register_forward_hook(hook)
    try:
        with torch.no_grad():
            fold(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not kept:
        raise LayerError(f"layer '{name}' is not used when the model runs, so it cannot explain the output; "
                         "choose a layer on the path from the input to the output")
    return kept[0]
