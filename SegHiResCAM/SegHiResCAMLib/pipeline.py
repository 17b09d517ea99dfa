"""Explain a whole volume with a loaded model: model card in, heatmaps in the volume's grid out.

This is the one path that the worker (and so the Slicer module) and the command line share:
apply the model card (channels, spacing, orientation, intensity), run the engine on the model's
grid, bring each map back onto the volume's own voxel grid, and renormalise over the whole
volume, so that a heatmap can be written with, or shown over, the exact geometry of the input.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from .errors import InputError
from .volume import Volume

ProgressCallback = Callable[[float, str], None]

# Share of the progress bar for the stages around the engine (the engine gets the rest).
_PREPARE_SHARE = 0.05
_RESTORE_SHARE = 0.05


def resolve_class(target_class: int | str, class_names: Sequence[str]) -> int:
    """The class index for an index or a class name, checked against the model card.

    Raises:
        InputError: unknown name, or an index outside the model's classes.
    """
    names = list(class_names)
    if isinstance(target_class, str) and not target_class.strip().lstrip("-").isdigit():
        lowered = {name.lower(): index for index, name in enumerate(names)}
        if target_class.lower() in lowered:
            return lowered[target_class.lower()]
        listed = ", ".join(f"{i} = {n}" for i, n in enumerate(names)) or "the model card names none"
        raise InputError(f"the model has no class named {target_class!r}; classes: {listed}")
    try:
        index = int(target_class)
    except (TypeError, ValueError) as error:
        raise InputError(f"the class must be an index or a class name, got {target_class!r}") from error
    if index < 0 or (names and index >= len(names)):
        listed = ", ".join(f"{i} = {n}" for i, n in enumerate(names))
        raise InputError(f"class {index} does not exist; the model has {len(names)} classes: {listed}")
    return index


def _normalised(heat: np.ndarray) -> np.ndarray:
    """Divide by the maximum over the whole volume; an all-zero map stays zero (never NaN)."""
    heat = np.nan_to_num(np.asarray(heat, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    np.maximum(heat, 0.0, out=heat)  # resampling back can overshoot slightly below zero
    peak = float(heat.max()) if heat.size else 0.0
    if peak > 0.0:
        heat /= peak
    return heat


def explain_volume(
    loaded,
    volume: Volume,
    *,
    target_class: int | str,
    roi: np.ndarray | None = None,
    layer: str | Sequence[str] | None = None,
    methods: Sequence[str] = ("seg-hires-grad-cam",),
    target: str = "logits",
    threshold: float = 0.5,
    device: str = "auto",
    slice_axis: int | None = None,
    progress: ProgressCallback | None = None,
):
    """Explain one volume and return heatmaps on its own voxel grid.

    Args:
        loaded: a :class:`~SegHiResCAMLib.models.loading.LoadedModel` (network and model card).
        volume: the image, ``(K, J, I)`` or ``(C, K, J, I)`` with its IJK-to-RAS matrix.
        target_class: class index, or a class name from the model card.
        roi: bool mask of ``volume.spatial_shape`` whose prediction is explained; None = the
            model's own prediction of ``target_class``.
        layer: layer name(s); None = the model card's default layer.
        methods: CAM methods to compute (see ``SegHiResCAMLib.METHODS``).
        target: "logits" or "probability-threshold" (see the engine).
        threshold: probability threshold of the "probability-threshold" target.
        slice_axis: for 2D models, the axis of the model's input grid to slice along;
            None = the model card's.
        device: "auto", "cpu", "cuda" or "cuda:N".
        progress: ``progress(fraction, message)``; raising CancelledError from it stops the run.

    Returns:
        ``(maps, explanation)``: method -> float32 :class:`Volume` in [0, 1] with the input's
        exact geometry (normalised over the whole volume), and the engine's Explanation
        (device, ROI size, seconds, warnings).

    Raises:
        InputError: bad class, ROI of the wrong shape, image the model cannot take.
        LayerError: unknown layer (with the nearest names).
    """
    from .engine.capture import check_layers
    from .engine.explain import explain_detailed, scaled_progress
    from .models.preprocess import prepare_input

    card = loaded.card
    if slice_axis is not None and int(slice_axis) != card.slice_axis:
        # The slice axis also decides which axis preprocessing leaves unpadded.
        card = dataclasses.replace(card, slice_axis=int(slice_axis))
    class_index = resolve_class(target_class, card.class_names)
    chosen = layer if layer is not None else card.default_layer
    if chosen is None or (not isinstance(chosen, str) and len(chosen) == 0):
        raise InputError(
            f"the model card of {card.name!r} names no default layer; choose one with --layer "
            "(list them with: seghirescam layers --model MODEL)"
        )
    layers = [chosen] if isinstance(chosen, str) else list(chosen)
    check_layers(loaded.module, layers)
    if volume.array.ndim not in (3, 4):
        raise InputError(f"the image must be a 3D volume (K, J, I), got an array of shape {volume.array.shape}")
    if roi is not None:
        roi = np.asarray(roi)
        if roi.shape != volume.spatial_shape:
            raise InputError(
                f"the ROI has shape {roi.shape} but the image has {volume.spatial_shape}; "
                "give a mask on the image's voxel grid"
            )
        roi = roi.astype(bool)

    if progress is not None:
        progress(0.0, "preparing the image for the model")
    prepared = prepare_input(volume, card)
    roi_model = None if roi is None else np.asarray(prepared.roi_to_model(roi)).astype(bool)
    explanation = explain_detailed(
        loaded.module,
        prepared.image,
        layer=chosen if isinstance(chosen, str) else layers,
        target_class=class_index,
        roi=roi_model,
        methods=tuple(methods),
        target=target,
        threshold=threshold,
        spatial_dims=card.spatial_dims,
        slice_axis=card.slice_axis,
        normalize=False,  # normalised once, after mapping back onto the volume grid (_normalised)
        multilabel=card.multilabel,
        probabilities=card.outputs == "probabilities",
        output_key=card.output_key,
        device=device,
        progress=scaled_progress(progress, _PREPARE_SHARE, 1.0 - _PREPARE_SHARE - _RESTORE_SHARE),
    )
    if progress is not None:
        progress(1.0 - _RESTORE_SHARE, "mapping the heatmaps back onto the image grid")
    maps: dict[str, Volume] = {}
    for method, heat in explanation.maps.items():
        back = np.asarray(prepared.heatmap_to_volume(heat))
        if back.shape != volume.spatial_shape:
            raise RuntimeError(  # a preprocessing bug, not the user's: say exactly what went wrong
                f"the {method} map came back with shape {back.shape}, not the image's {volume.spatial_shape}"
            )
        maps[method] = Volume(_normalised(back), volume.ijk_to_ras)
    if progress is not None:
        progress(1.0, "done")
    return maps, explanation
