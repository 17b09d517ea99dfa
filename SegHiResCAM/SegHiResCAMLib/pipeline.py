"""Explain a whole volume with a loaded model: model card in, heatmaps in the volume's grid out.

This is the one path from a volume to heatmaps that the application service (and so the worker,
the Slicer module, the command line and the demo) runs: fill the settings' defaults from the model
card, apply the card (channels, spacing, orientation, intensity), run the engine on the model's
grid, bring each heatmap back onto the volume's own voxel grid, and normalise over the whole
volume, so that a heatmap can be written with, or shown over, the exact geometry of the input.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .errors import InputError, InternalError
from .models.card import resolve_class  # noqa: F401  (public here before)
from .point_region import point_region, point_voxel
from .progress import ProgressCallback, scaled_progress
from .region import region_weights
from .settings import ExplainSettings
from .volume import Volume

# Share of the progress bar for the stages around the engine (the engine gets the rest).
_PREPARE_SHARE = 0.05
_RESTORE_SHARE = 0.05


def _normalised(heat: np.ndarray, relu: bool = True, normalize: bool = True) -> np.ndarray:
    """The finished heatmap on the volume grid: never NaN; with ``relu`` no negative values
    (resampling back can overshoot slightly below zero); with ``normalize`` divided by the maximum
    over the whole volume (an all-zero map stays zero)."""
    heat = np.nan_to_num(np.asarray(heat, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if relu:
        np.maximum(heat, 0.0, out=heat)
    peak = float(heat.max()) if heat.size else 0.0
    if normalize and peak > 0.0:
        heat /= peak
    return heat


def settings_for_model(settings: ExplainSettings, card) -> ExplainSettings:
    """The settings with the model card's defaults filled in (``ModelCard.settings_for``: layers,
    class index, slice axis, multilabel, probabilities, output_key), with a layer to explain.

    Raises:
        InputError: an unknown class, or no layer given and none named by the card.
    """
    settings = card.settings_for(settings)
    if not settings.layers:
        raise InputError(
            f"the model card of {card.name!r} names no default layer; choose one with --layer "
            "(list them with: seghirescam layers --model MODEL)"
        )
    return settings


def explain_volume(
    loaded,
    volume: Volume,
    settings: ExplainSettings | None = None,
    *,
    roi: np.ndarray | None = None,
    progress: ProgressCallback | None = None,
    **choices: Any,
):
    """Explain one volume and return heatmaps on its own voxel grid.

    Args:
        loaded: a :class:`~SegHiResCAMLib.models.loading.LoadedModel` (network and model card).
        volume: the image, ``(K, J, I)`` or ``(C, K, J, I)`` with its IJK-to-RAS matrix.
        settings: what to explain (:class:`~SegHiResCAMLib.settings.ExplainSettings`); empty layers,
            a class name, and None for slice axis, multilabel, probabilities and output_key take the
            model card's.
        roi: the region of ``volume.spatial_shape`` whose prediction is explained: a mask (bool or
            whole-number labels, non-zero = inside) or weights in [0, 1] (used as m(p), resampled
            linearly onto the model's grid); None = the model's own prediction of the class (or the
            settings' region kind).
        progress: ``progress(fraction, message)``; raising CancelledError from it stops the run.
        **choices: instead of ``settings``, its fields as keywords
            (``explain_volume(loaded, volume, target_class=2, layers=("bottleneck",))``).

    Returns:
        ``(maps, explanation)``: method -> float32 :class:`Volume` with the input's exact geometry
        (in [0, 1], normalised over the whole volume, unless the settings ask for signed or raw
        maps), and the engine's Explanation (device, region size, seconds, warnings).

    Raises:
        InputError: bad class, region of the wrong shape or with weights outside [0, 1], a region that
            vanishes on the model's grid, an image the model cannot take (or with NaN/inf values).
        LayerError: unknown layer (with the nearest names).
    """
    from .engine.capture import check_layers
    from .engine.explain import explain_with_settings
    from .models.preprocess import prepare_input

    if settings is None:
        settings = ExplainSettings(**choices)
    elif choices:
        raise InputError(f"give either settings or their fields as keywords, not both (got {sorted(choices)})")
    card = loaded.card
    if settings.slice_axis is not None and settings.slice_axis != card.slice_axis:
        # The slice axis also decides which axis preprocessing leaves unpadded.
        card = dataclasses.replace(card, slice_axis=settings.slice_axis)
    settings = settings_for_model(settings, card)
    check_layers(loaded.module, settings.layers)
    kind = settings.region_kind(roi is not None)
    roi = _region_on_volume(settings, roi, volume)

    if progress is not None:
        progress(0.0, "preparing the image for the model")
    prepared = prepare_input(volume, card)
    plan = window_plan(loaded, prepared, settings, card)  # refused here, before the work, when it does not fit
    if progress is not None:
        progress(0.0, plan.describe())
    notes: tuple[str, ...] = ()
    if kind == "point":
        if progress is not None:
            progress(0.0, "predicting the class on the whole image to find the region at the point")
        region = point_region(predicted_region_on_volume(loaded, prepared, settings, card, plan.window),
                              volume.ijk_to_ras, settings.point)
        roi = region.mask
        if not region.predicted:  # the user pointed at a lesion the model does not see: say so
            notes = (region.describe(settings.point, settings.target_class),)
    roi_model = None if roi is None else np.asarray(prepared.roi_to_model(roi))  # weights stay float
    if roi_model is not None and roi.any() and not roi_model.any():
        raise InputError(
            f"the region ({int(np.count_nonzero(roi))} voxels) covers no voxel of the model's grid once resampled "
            "to it (it is smaller than the model's voxels, or outside its crop); choose a larger region"
        )
    if roi_model is None and settings.region_kind(False) == "prediction":
        roi_model = _prediction_inside_image(loaded, prepared, volume, settings, card, plan.window)
    explanation = explain_with_settings(
        loaded.module,
        prepared.image,
        # The region is applied; maps are normalised once, after mapping back onto the volume grid.
        dataclasses.replace(settings, region=None, point=None, normalize=False),
        roi=roi_model,
        spatial_dims=card.spatial_dims,
        progress=scaled_progress(progress, _PREPARE_SHARE, 1.0 - _PREPARE_SHARE - _RESTORE_SHARE),
        plan=plan,
    )
    if progress is not None:
        progress(1.0 - _RESTORE_SHARE, "mapping the heatmaps back onto the image grid")
    maps = {method: _on_volume_grid(prepared, method, heat, volume, settings)
            for method, heat in explanation.maps.items()}
    if progress is not None:
        progress(1.0, "done")
    if notes:
        explanation = dataclasses.replace(explanation, warnings=notes + explanation.warnings)
    return maps, explanation


def window_plan(loaded, prepared, settings: ExplainSettings, card):
    """How the model goes over the prepared image (``engine.window_plan.plan_windows`` with the card's
    own tiling, divisibility and classes): one pass or sliding windows, with its memory estimate.

    Raises:
        NotEnoughMemoryError: the chosen (or forced) way does not fit the device's memory.
    """
    from .engine.window_plan import plan_windows
    from .windows import window_for_card

    return plan_windows(loaded.module, np.shape(prepared.image), settings, card_window=window_for_card(card),
                        divisible_by=card.divisible_by, spatial_dims=card.spatial_dims,
                        classes=len(card.class_names) or None)


def predicted_region_on_volume(loaded, prepared, settings: ExplainSettings, card, window=None) -> np.ndarray:
    """The model's predicted region of ``settings.target_class`` on the volume's own voxel grid.

    The one place that predicts a whole volume for a region (the point region, the evaluation's
    region): the model runs on the prepared image (the card's preprocessing, as the explanation sees
    it) with the explanation's own rule (``engine.prediction.predicted_mask``), on the fused
    sliding-window prediction when ``window`` (the run's :class:`WindowPlan` window) is given, and
    the mask comes back as heatmaps do (voxels at least half inside).
    """
    from .engine.prediction import predicted_mask

    on_model_grid = predicted_mask(loaded.module, prepared.image, settings, spatial_dims=card.spatial_dims,
                                   window=window)
    return np.asarray(prepared.heatmap_to_volume(on_model_grid.astype(np.float32))) >= 0.5


def _prediction_inside_image(loaded, prepared, volume: Volume, settings: ExplainSettings, card,
                             window=None) -> np.ndarray | None:
    """The "prediction" region on the model's grid, cut to the voxels that come from the image.

    Padding (``divisible_by``) and crops put voxels on the model's grid that are not the image's;
    what the model predicts there is not the image's segmentation and must neither enter the target
    nor the region's size. None when every model voxel is an image voxel: the engine then finds
    the prediction in the explanation's own forward pass (no extra pass). ``window``: the run's
    sliding window, whose fused prediction is then the one cut.
    """
    inside = np.asarray(prepared.roi_to_model(np.ones(volume.spatial_shape, bool)))
    if inside.all():
        return None
    if settings.target == "probability-threshold":
        return inside  # the engine keeps the voxels above the threshold inside the given region
    from .engine.prediction import predicted_mask

    return predicted_mask(loaded.module, prepared.image, settings, spatial_dims=card.spatial_dims,
                          window=window) & inside


def _region_on_volume(settings: ExplainSettings, roi, volume: Volume) -> np.ndarray | None:
    """The region of the settings' kind on the volume's grid (only the image's voxels, never the
    padding preprocessing adds), the given mask checked for shape; for a point, None (it needs the
    prediction) once the point is found inside the image."""
    from .engine.arrange import region_array

    if volume.array.ndim not in (3, 4):
        raise InputError(f"the image must be a 3D volume (K, J, I), got an array of shape {volume.array.shape}")
    if not np.isfinite(volume.array).all():  # before normalisation, which would turn inf into NaN with a warning
        raise InputError("the image contains NaN or infinite values; fix or mask them before explaining")
    if roi is None and settings.point is not None:
        point_voxel(volume.ijk_to_ras, volume.spatial_shape, settings.point.ras)  # refused before any work
        return None
    if roi is not None:
        roi = np.asarray(roi)
        if roi.shape != volume.spatial_shape:
            raise InputError(
                f"the ROI has shape {roi.shape} but the image has {volume.spatial_shape}; "
                "give a mask on the image's voxel grid"
            )
        roi = region_weights(roi)  # labels -> bool mask; non-integer values -> weights in [0, 1], kept
    return region_array(settings, roi, volume.spatial_shape)


def _on_volume_grid(prepared, method: str, heat: np.ndarray, volume: Volume, settings: ExplainSettings) -> Volume:
    """One heatmap brought back from the model grid onto the volume's, finished (ReLU, normalised)."""
    back = np.asarray(prepared.heatmap_to_volume(heat))
    if back.shape != volume.spatial_shape:
        raise InternalError(  # a preprocessing bug, not the user's: say exactly what went wrong
            f"the {method} heatmap came back with shape {back.shape}, not the image's {volume.spatial_shape}"
        )
    return Volume(_normalised(back, settings.relu, settings.normalize), volume.ijk_to_ras)
