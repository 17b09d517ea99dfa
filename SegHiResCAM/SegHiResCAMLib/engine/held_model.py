"""Models as users hold them: an ``nn.Module``, a TorchScript module, or a ``LoadedModel``.

Every engine entry point starts with :func:`held_model`, so ``explain(torch.jit.load(path), ...)``
and ``explain(load_model(path), ...)`` work like ``explain(module, ...)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import InputError, ModelError
from .device import training_mode_warning


@dataclass(frozen=True)
class ModelChoices:
    """What the engine needs to know about running a model, after the card filled what the user left out."""

    layer: str | Sequence[str] | None
    spatial_dims: int | None
    slice_axis: int
    multilabel: bool
    probabilities: bool
    output_key: int | str | None


@dataclass(frozen=True)
class HeldModel:
    """The module the engine runs, the model card that came with it (None for a bare module),
    and what the user must be told (a model wholly in training mode)."""

    module: nn.Module
    card: Any = None
    notes: tuple[str, ...] = ()

    def choices(self, *, layer: str | Sequence[str] | None = None, spatial_dims: int | None = None, slice_axis: int | None = None,
                multilabel: bool | None = None, probabilities: bool | None = None,
                output_key: int | str | None = None, image_dims: int | None = None,
                layer_required: bool = True) -> ModelChoices:
        """The user's choices, with None filled from the model card, then from the engine's defaults.

        ``image_dims`` (the image's spatial rank) keeps a card's ``spatial_dims`` of 3 from applying
        to a 2D image, where only the 2D application exists.
        """
        card = self.card
        if card is not None:
            layer = layer if layer is not None else card.default_layer
            if spatial_dims is None and (image_dims is None or card.spatial_dims <= image_dims):
                spatial_dims = card.spatial_dims
            slice_axis = card.slice_axis if slice_axis is None else slice_axis
            multilabel = card.multilabel if multilabel is None else multilabel
            probabilities = card.outputs == "probabilities" if probabilities is None else probabilities
            output_key = card.output_key if output_key is None else output_key
        if layer_required and (layer is None or (not isinstance(layer, str) and len(layer) == 0)):
            raise InputError("no layer was given; pick at least one layer to explain (list them with list_layers, "
                             "or name a default in the model card's \"layers\")")
        return ModelChoices(layer, spatial_dims, 0 if slice_axis is None else int(slice_axis), bool(multilabel),
                            bool(probabilities), output_key)


def held_model(model) -> HeldModel:
    """The module to run for ``model``: itself, a TorchScript module wrapped for capture, or a
    ``LoadedModel``'s module with its card.

    A ``LoadedModel``'s card gives defaults only: the image is used as given, without the card's
    preprocessing (``pipeline.explain_volume`` applies that to volumes).

    Raises:
        ModelError: ``model`` is none of these.
    """
    card = None
    if not isinstance(model, nn.Module) and hasattr(model, "module") and hasattr(model, "card"):
        model, card = model.module, model.card  # a LoadedModel (duck-typed: the engine does not import models)
    if isinstance(model, torch.jit.ScriptModule):
        # The one place the engine reaches the models package: hooks do not fire on ScriptModules,
        # and the adapter that edits their graph lives with the TorchScript loader.
        from ..models.torchscript import ScriptedModel

        model = ScriptedModel(model)
    if not isinstance(model, nn.Module):
        raise ModelError(f"the model is a {type(model).__name__}; give a torch.nn.Module, a TorchScript module "
                         "(torch.jit.load) or a model from load_model")
    note = training_mode_warning(model)
    return HeldModel(model, card, (note,) if note else ())
