"""What the Slicer panel keeps when the scene or the model changes (pure functions: no Qt, no MRML).

The panel's parameter node is the truth; these rules say which of its values still hold
after the user picks another segmentation or model, so that a stale choice never reaches
a run without a word. The widget in ``SegHiResCAM.py`` applies them; they are tested here
because the widget itself only runs inside Slicer.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

#: Input channels the panel offers volume selectors for: the input volume and three more (BraTS's
#: T1, T1ce, T2 and FLAIR). Models with more channels run from the console or the command line.
PANEL_CHANNELS = 4


def segment_id_to_keep(segment_ids: Sequence[str] | None, wanted: str, shown: str = "") -> str:
    """The segment ID the parameter node should hold for the chosen segmentation.

    Args:
        segment_ids: the IDs of the chosen segmentation's segments; None when no
            segmentation is chosen.
        wanted: the ID the parameter node holds.
        shown: the ID the segment selector shows. The selector keeps the last ID it
            showed when the segmentation it shows has no segments (Slicer's
            ``qMRMLSegmentSelectorWidget::populateSegmentCombobox`` returns before clearing
            it), so it counts only when the segmentation has that segment.

    Returns:
        ``wanted`` when the segmentation has it, else ``shown`` when the segmentation has
        that, else "" (no segment chosen: the panel asks for one before Apply).
    """
    if segment_ids is None:
        return ""
    if wanted and wanted in segment_ids:
        return wanted
    if shown and shown in segment_ids:
        return shown
    return ""


def layer_to_keep(layer: str, previous_model: str | None, model: str, model_layers: Sequence[str] | None) -> str:
    """The layer the parameter node should hold once the model path is ``model``.

    A layer chosen for one model means nothing for another: it is cleared when the model
    changes, unless the new model has a layer of that name. Cleared means the model card's
    default layer.

    Args:
        layer: the layer the parameter node holds ("" = the card's default).
        previous_model: the model path the layer was chosen with; None when the panel has
            not seen one yet (a scene just loaded keeps its saved layer).
        model: the model path now ("" = none).
        model_layers: the new model's layer names; None when they could not be listed.

    Returns:
        ``layer``, or "" when it does not belong to the new model.
    """
    if not layer or previous_model is None or _same_path(previous_model, model):
        return layer
    if model_layers is not None and layer in model_layers:
        return layer
    return ""


def model_path_text(path: str | os.PathLike | None) -> str:
    """The text the model field shows for a stored path: "" for none.

    The parameter node stores "no model" as ``Path()``, whose text is "." (the current
    folder), which the field must not show as if it were a model.
    """
    text = "" if path is None else os.fspath(path)
    return "" if text in ("", ".") else text


def _same_path(first: str, second: str) -> bool:
    return model_path_text(first) == model_path_text(second)


def layer_choices(listing: Mapping) -> list[tuple[str, str]]:
    """The layer list's rows from the worker's layer listing: ``(name, "Type  C×D×H×W")`` for each
    layer with an output to explain, the model card's recommended layers first, marked with a star.
    A layer the listing marks ``unusable`` (it runs several times, or returns no tensor) is left out:
    it cannot be explained (``seghirescam layers`` prints why).

    Args:
        listing: the worker's "result" event of a layers request (``jobs.LayersJob.result()``).
    """
    described = {
        row["name"]: f"{row['type']}  {'×'.join(map(str, row['output_shape'][1:]))}"
        for row in listing["layers"]
        if row["output_shape"] and not row.get("unusable")  # containers and unused modules have no output
    }
    first = [name for name in listing.get("default_layers", ()) if name in described]
    return [(name, described[name] + "  ★") for name in first] + [
        (name, text) for name, text in described.items() if name not in first
    ]


def extra_channels_to_show(in_channels: int) -> tuple[int, str]:
    """How many additional input volume selectors the panel shows for a model with ``in_channels``
    input channels, and why the panel cannot run it ("" when it can).

    The input volume is channel 1; selectors 1, 2, ... are channels 2, 3, ... in the model card's order.
    """
    needed = max(int(in_channels), 1) - 1
    if needed <= PANEL_CHANNELS - 1:
        return needed, ""
    return PANEL_CHANNELS - 1, (
        f"this model takes {in_channels} input channels and the panel offers {PANEL_CHANNELS}; run it from the "
        "Python console (logic.start with extraVolumes) or the command line (one --image per channel)"
    )


def sliding_window_choice(auto: bool, patch_size: int):
    """``ExplainSettings.sliding_window`` of the panel's "Sliding windows: auto" box and patch size:
    "auto" when checked; else windows of ``patch_size`` voxels along every axis of the model, or the
    whole image in one pass for 0."""
    from .settings import AUTO_WINDOW
    from .windows import SlidingWindow

    if auto:
        return AUTO_WINDOW
    return SlidingWindow((int(patch_size),)) if int(patch_size) > 0 else None
