"""Turn a model file or folder into a module ``explain`` can use, plus its model card.

Supported here: a state dict (``.pt``/``.pth``) with a model card JSON beside it
(``<stem>.json`` or ``model.json``) whose ``network`` names a known builder.
Loading never unpickles arbitrary objects: ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import ModelError, UnsafeModelError
from .card import ModelCard


@dataclass(frozen=True)
class LoadedModel:
    """A network ready for ``explain`` (eval mode, on CPU) and the card describing it."""

    module: nn.Module
    card: ModelCard
    source: Path
    kind: str


def _build_unet(**args: Any) -> nn.Module:
    from .unet import UNet

    return UNet(**args)


# name in a card's "network" -> builder(**args)
BUILDERS: dict[str, Callable[..., nn.Module]] = {"SegHiResCAM.UNet": _build_unet}


def find_card(path: Path) -> Path | None:
    """The model card beside a weights file: ``<stem>.json``, else ``model.json``."""
    for candidate in (path.with_suffix(".json"), path.parent / "model.json"):
        if candidate.is_file():
            return candidate
    return None


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load tensors only; refuse files that would need arbitrary unpickling."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise ModelError(f"the model file {path} does not exist") from error
    except Exception as error:  # torch raises UnpicklingError or RuntimeError here
        message = str(error)
        if "weights_only" in message or "Unpickl" in type(error).__name__ or "unpickl" in message.lower():
            raise UnsafeModelError(
                f"{path.name} contains pickled Python objects, not just weights; loading it would run "
                "arbitrary code. Save the weights with torch.save(model.state_dict(), path), or export "
                "the network with torch.jit.script/trace, and try again."
            ) from error
        raise ModelError(f"cannot read the model file {path}: {message.splitlines()[0]}") from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path.name} is not a state dict (a mapping of names to tensors)")
    return state


def build_network(card: ModelCard, source: Path) -> nn.Module:
    if not card.network or "name" not in card.network:
        raise ModelError(f"the model card for {source.name} has no 'network' entry saying how to build the network")
    name = card.network["name"]
    if name not in BUILDERS:
        raise ModelError(f"network {name!r} in the model card is unknown; known networks: {', '.join(sorted(BUILDERS))}")
    return BUILDERS[name](**card.network.get("args", {}))


def load_model(path: str | Path) -> LoadedModel:
    """Load a model and its card from ``path``.

    Raises:
        ModelError: the file is missing, unreadable or not a segmentation model.
        UnsafeModelError: the file would need full unpickling.
    """
    source = Path(path)
    if not source.exists():
        raise ModelError(f"the model file {source} does not exist")
    card_path = find_card(source)
    if card_path is None:
        raise ModelError(
            f"no model card found beside {source.name}: write {source.with_suffix('.json').name} "
            "(see README, 'Model card') describing the network, its classes and its input"
        )
    card = ModelCard.load(card_path)
    module = build_network(card, source)
    state = load_state_dict(source)
    try:
        module.load_state_dict(state)
    except RuntimeError as error:
        raise ModelError(
            f"the weights in {source.name} do not fit the network in its model card: {str(error).splitlines()[0]}"
        ) from error
    module.eval()
    return LoadedModel(module=module, card=card, source=source, kind="state-dict")
