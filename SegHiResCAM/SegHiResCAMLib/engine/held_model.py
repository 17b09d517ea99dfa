"""Models as users hold them: an ``nn.Module``, a TorchScript module, an exported program, or a
``LoadedModel``.

Every engine door that runs a model starts with :func:`held_model` (``engine.job.explain_samples``,
so ``explain``, ``explain_detailed``, ``explain_with_settings`` and Kernel-Weighted Contribution;
``masking_scores``; ``list_layers``; ``engine.prediction.predicted_mask``; ``engine.sliding_window``'s
``predict`` and ``explain_windows_with_settings``), so ``explain(torch.jit.load(path), ...)``,
``explain(torch.export.load(path), ...)`` and ``explain(load_model(path), ...)`` work like
``explain(module, ...)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import InputError, ModelError
from ..settings import ExplainSettings
from .device import training_mode_warning


@dataclass(frozen=True)
class HeldModel:
    """The module the engine runs, the model card that came with it (None for a bare module),
    and what the user must be told (a model wholly in training mode)."""

    module: nn.Module
    card: Any = None
    notes: tuple[str, ...] = ()

    def settings(self, settings: ExplainSettings) -> ExplainSettings:
        """``settings`` with what they leave to the model (None, no layers, a class name) taken from the
        model card (``ModelCard.settings_for``); a bare module's settings stay as they are, and the
        engine reads None as slice axis 0, single-label logits, and the output at full resolution.

        Raises:
            InputError: the class is a name and no card says which index it is (or the card names
                no such class).
        """
        settings = settings if self.card is None else self.card.settings_for(settings)
        if not isinstance(settings.target_class, int):
            raise InputError(f"the class {settings.target_class!r} is a name; the engine takes a class index, and "
                             "class names are looked up in the model card (a model from load_model, "
                             "pipeline.explain_volume, the command line)")
        return settings

    def output_key(self, given: int | str | None) -> int | str | None:
        """``given``, else the model card's ``output_key`` (None: the one output at full resolution);
        for doors that take the key alone (``engine.sliding_window``)."""
        return given if given is not None or self.card is None else self.card.output_key

    def spatial_dims(self, spatial_dims: int | None, image) -> int | None:
        """The given spatial dims, else the card's: a 2D model card applies to 2D images and, slice by
        slice, to volumes; a 3D one only to volumes (a 2D image has no 3D application)."""
        if spatial_dims is not None or self.card is None:
            return spatial_dims
        return self.card.spatial_dims if self.card.spatial_dims <= np.ndim(image) - 1 else None


def held_model(model) -> HeldModel:
    """The module to run for ``model``: itself, a TorchScript module or an ``ExportedProgram``
    (``torch.export.load``) wrapped for capture, or a ``LoadedModel``'s module with its card.

    A ``LoadedModel``'s card gives defaults only: the image is used as given, without the card's
    preprocessing (``pipeline.explain_volume`` applies that to volumes).

    Raises:
        ModelError: ``model`` is none of these.
    """
    card = None
    if not isinstance(model, nn.Module) and hasattr(model, "module") and hasattr(model, "card"):
        model, card = model.module, model.card  # a LoadedModel (duck-typed: the engine does not import models)
    # The one place the engine reaches the models package: hooks do not fire on ScriptModules, and an
    # ExportedProgram has no submodules; their adapters live with their loaders.
    if isinstance(model, torch.jit.ScriptModule):
        from ..models.torchscript import ScriptedModel

        model = ScriptedModel(model)
    elif isinstance(model, torch.export.ExportedProgram):
        from ..models.exported import ExportedModel

        model = ExportedModel(model)
    if not isinstance(model, nn.Module):
        raise ModelError(f"the model is a {type(model).__name__}; give a torch.nn.Module, a TorchScript module "
                         "(torch.jit.load), an exported program (torch.export.load) or a model from load_model")
    note = training_mode_warning(model)
    return HeldModel(model, card, (note,) if note else ())
