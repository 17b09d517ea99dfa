"""Weights in and out of networks: read tensors only, and load them with a message that says what does not fit.

Shared by every loader (``models.loading`` for state dicts, bundles and builders; ``models.nnunet``
for checkpoints). Reading never unpickles arbitrary objects: ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import ModelError


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load tensors only; refuse files that would need arbitrary unpickling, and files that are no
    weights (empty, damaged, an image, text, a TorchScript file: ``models.model_file``)."""
    from .model_file import load_weights, model_file_kind

    if not path.is_file():
        raise ModelError(f"the model file {path} does not exist")
    if model_file_kind(path) == "torchscript":
        raise ModelError(f"{path.name} is a TorchScript file, not a state dict; choose it as the model itself")
    state = load_weights(path, "Save the weights with torch.save(model.state_dict(), path), or export the network "
                               "with torch.jit.script/trace, and try again.")
    for key in ("state_dict", "model", "network_weights"):  # Lightning, MONAI checkpoints, nnU-Net
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path.name} is not a state dict (a mapping of names to tensors)")
    return state


def fit_weights(module: nn.Module, state: dict[str, torch.Tensor], weights: str, network: str) -> None:
    """Load ``state`` into ``module``, or say which weights do not fit which network."""
    try:
        module.load_state_dict(state)
    except RuntimeError as error:
        raise ModelError(f"{weights} do not fit {network}: {str(error).splitlines()[0]}") from error
