"""Weights in and out of networks: read tensors only, and load them with a message that says what does not fit.

Shared by every loader (``models.loading`` for state dicts, bundles and builders; ``models.nnunet``
for checkpoints). Reading never unpickles arbitrary objects: ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelError, UnsafeModelError


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load tensors only; refuse files that would need arbitrary unpickling."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise ModelError(f"the model file {path} does not exist") from error
    except pickle.UnpicklingError as error:  # what torch's weights-only unpickler raises
        raise UnsafeModelError(
            f"{path.name} contains pickled Python objects, not just weights; loading it would run "
            "arbitrary code. Save the weights with torch.save(model.state_dict(), path), or export "
            "the network with torch.jit.script/trace, and try again."
        ) from error
    except Exception as error:  # noqa: BLE001 - torch reports unreadable files with several types
        raise ModelError(f"cannot read the model file {path}: {str(error).splitlines()[0]}") from error
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
