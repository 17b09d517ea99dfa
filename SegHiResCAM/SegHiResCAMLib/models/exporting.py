"""Save a network as a ``.pt2`` program that SegHiResCAM can explain, with its model card beside it."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import InputError
from .card import ModelCard


def export_model(model: nn.Module, example: torch.Tensor, path: str | Path, *, card: ModelCard | None = None,
                 dynamic: bool = True) -> Path:
    """Export ``model`` with ``torch.export`` in eval mode and save it as ``path`` (``.pt2``).

    Args:
        model: the network; exported in eval mode (batch norm with its running statistics, no
            dropout), its training flags restored afterwards.
        example: an input ``(batch, channels, *spatial)`` on the model's device.
        path: where to write; must end in ``.pt2``. ``card`` is written beside it as ``<stem>.json``.
        card: the model card (classes, spacing, intensity, layers, ...), or None.
        dynamic: let batch and spatial sizes vary (``torch.export.Dim.AUTO``): torch records which
            sizes the network accepts (e.g. multiples of 16) and the program runs on all of them.
            False fixes every size to the example's.

    Returns:
        The path written.

    Example:
        >>> export_model(net, torch.zeros(2, 1, 96, 96, 96), "liver.pt2", card=ModelCard(class_names=("bg", "liver")))  # doctest: +SKIP
    """
    target = Path(path)
    if target.suffix != ".pt2":
        raise InputError(f"the exported program must be saved as a .pt2 file, got {target.name}")
    example = example.detach()
    shapes = None
    if dynamic:
        if example.shape[0] == 1:  # torch fixes axes whose example size is 1; a batch of two keeps it free
            example = torch.cat([example, example])
        shapes = ({axis: torch.export.Dim.AUTO for axis in [0, *range(2, example.ndim)]},)
    training = {name: module.training for name, module in model.named_modules()}
    try:
        model.eval()
        program = torch.export.export(model, (example,), dynamic_shapes=shapes)
    finally:
        for name, module in model.named_modules():
            module.training = training[name]
    torch.export.save(program, str(target))
    if card is not None:
        card.save(target.with_suffix(".json"))
    return target
