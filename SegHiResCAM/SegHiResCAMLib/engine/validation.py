"""Masking validation (SPIE 2022): does the map keep what the model needs, and how little of the image?

The input is masked with the map, ``x~ = baseline + a (x - baseline)`` (``a`` the map in [0, 1],
or ``1[map > threshold]``), and predicted again. With ``P = m s_c`` (class-c probability inside
the ROI ``m`` of the ORIGINAL prediction) and ``P~`` the same on ``x~``:

- Prediction Preserved ``PP = sum_p min(P~(p), P(p)) / sum_p P(p)`` in [0, 1], higher is better;
- Image Preserved ``IP = mean_p a(p)`` in [0, 1], lower is better (the map keeps less of the image).

``roi_prediction`` (``P`` and its ROI) is shared with ``engine.kernel_weighted``, whose ablations
use the same ``min(P~, P)`` terms.
"""

from __future__ import annotations

import warnings as _warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from .capture import segmentation_output
from .device import fitting_count, in_chunks, prepared_model, resolve_device
from .explain import _arrange, _image_tensor
from .held_model import held_model
from .targets import class_probabilities, predicted_roi, roi_on_output_grid


@dataclass(frozen=True)
class MaskingScores:
    """Prediction Preserved (higher = the map keeps what the model needs; NaN when the ROI is
    empty) and Image Preserved (lower = the map keeps less of the image)."""

    prediction_preserved: float
    image_preserved: float


def masking_scores(model: nn.Module, image, heatmap, *, target_class: int, roi=None, threshold: float | None = None,
                   baseline: float = 0.0, spatial_dims: int | None = None, slice_axis: int | None = None,
                   device: str = "auto", multilabel: bool | None = None, probabilities: bool | None = None,
                   output_key: int | str | None = None) -> MaskingScores:
    """Score a heatmap by masking the image with it and predicting again.

    Args:
        model, image, target_class, roi, spatial_dims, slice_axis, device, multilabel, probabilities, output_key: as in
            :func:`engine.explain.explain` (roi None = the model's own prediction on ``image``).
        heatmap: array of the image's spatial shape with values in [0, 1] (a normalised map).
        threshold: None multiplies the image by the map; a number keeps the voxels whose map
            value is above it, unchanged, and sets the others to ``baseline``.
        baseline: the intensity that replaces what the map removes (0 for normalised images).

    Returns:
        MaskingScores(prediction_preserved, image_preserved).

    Raises:
        InputError: the heatmap has the wrong shape, NaN values or values outside [0, 1].
    """
    held = held_model(model)
    model, given = held.module, held.choices(
        spatial_dims=spatial_dims, slice_axis=slice_axis, multilabel=multilabel, probabilities=probabilities,
        output_key=output_key, image_dims=np.ndim(image) - 1, layer_required=False)
    spatial_dims, slice_axis, output_key = given.spatial_dims, given.slice_axis, given.output_key
    multilabel, probabilities = given.multilabel, given.probabilities
    for message in held.notes:
        _warnings.warn(message, RuntimeWarning, stacklevel=2)
    image_t = _image_tensor(image, model)
    kept_fraction = _kept_fraction(heatmap, tuple(image_t.shape[1:]), threshold)
    keep = kept_fraction.to(image_t.dtype)
    # Where the map keeps everything the image is used exactly as it is (no rounding from the baseline).
    masked = torch.where(keep == 1, image_t, baseline + keep * (image_t - baseline))
    samples, roi_t, _ = _arrange(image_t, roi, spatial_dims, slice_axis)
    masked_samples, _, _ = _arrange(masked, None, spatial_dims, slice_axis)
    run_device = resolve_device(device)
    sums = torch.zeros(2, dtype=torch.float64)
    with prepared_model(model, run_device), torch.inference_mode():

        def predict_both(index: torch.Tensor) -> None:
            batch = torch.cat([samples[index], masked_samples[index]]).to(run_device)
            output = segmentation_output(model(batch), batch, target_class, output_key)
            given = None if roi_t is None else roi_t[index].to(run_device)
            original, weights = roi_prediction(output[: len(index)], target_class, given, multilabel, probabilities)
            changed, _ = roi_prediction(output[len(index):], target_class, weights, multilabel, probabilities)
            sums[0] += original.sum().cpu()
            sums[1] += torch.minimum(changed, original).sum().cpu()

        # Each chunk holds every sample twice (original and masked).
        size = fitting_count(model, samples[:1].to(run_device), samples.shape[0], factor=2)
        in_chunks(samples.shape[0], size, run_device, predict_both)
    if sums[0] <= 0:
        _warnings.warn(f"the region to score (class {target_class}) is empty, so Prediction Preserved is undefined "
                       "(NaN); choose a region or class that is present", RuntimeWarning, stacklevel=2)
        preserved = float("nan")
    else:
        preserved = float(sums[1] / sums[0])
    return MaskingScores(preserved, float(kept_fraction.mean()))


def _kept_fraction(heatmap, spatial: tuple[int, ...], threshold: float | None) -> torch.Tensor:
    heat = heatmap.detach().cpu() if isinstance(heatmap, torch.Tensor) else torch.as_tensor(np.asarray(heatmap))
    if tuple(heat.shape) != spatial:
        raise InputError(f"the heatmap has shape {tuple(heat.shape)} but the image's spatial shape is {spatial}; "
                         "give the map computed for this image")
    heat = heat.to(torch.float64)
    if not torch.isfinite(heat).all():
        raise InputError("the heatmap contains NaN or infinite values; recompute it or replace them by 0")
    if heat.numel() and (heat.min() < 0 or heat.max() > 1):
        raise InputError(f"the heatmap has values in [{float(heat.min()):g}, {float(heat.max()):g}], outside [0, 1]; "
                         "normalise it (divide by its maximum) before scoring")
    if threshold is None:
        return heat
    if not np.isfinite(threshold):
        raise InputError(f"the threshold {threshold} is not a number; give a value in [0, 1] or None")
    return (heat > threshold).to(torch.float64)


def roi_prediction(output: torch.Tensor, class_index: int, roi: torch.Tensor | None,
                   multilabel: bool = False, probabilities: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, m)`` in float64: ``P = m * s_c`` with ``m`` the ROI on the output grid, or the prediction."""
    if roi is None:
        roi = predicted_roi(output, class_index, multilabel, probabilities)
    else:
        roi = roi_on_output_grid(roi, tuple(output.shape[2:]))
    weights = roi.to(torch.float64)
    scores = class_probabilities(output, multilabel, probabilities)[:, class_index].to(torch.float64)
    return scores * weights, weights
