"""Masking validation (SPIE 2022): does the map keep what the model needs, and how little of the image?

The input is masked with the map, ``x~ = baseline + a (x - baseline)`` (``a`` the map in [0, 1],
or ``1[map > threshold]``), and predicted again. With ``P = m s_c`` (class-c probability inside
the ROI ``m`` of the ORIGINAL prediction) and ``P~`` the same on ``x~``:

- Prediction Preserved ``PP = sum_p min(P~(p), P(p)) / sum_p P(p)`` in [0, 1], higher is better;
- Image Preserved ``IP = mean_p a(p)`` in [0, 1], lower is better (the map keeps less of the image);
- Excess Prediction (AttributionQuality, JMI 2023) ``EP = sum_p max(P~(p) - P(p), 0) / sum_p P(p)``,
  ``>= 0``, lower is better: prediction inside the ROI that the masked image has and the original
  had not (the masking created evidence instead of keeping it).

``targets.roi_prediction`` (``P`` and its ROI) is shared with ``engine.kernel_weighted``, whose
ablations use the same ``min(P~, P)`` terms. The ``threshold`` of :func:`masking_scores` is the
keep threshold (map values above it are kept), not the target's or the display's threshold.
"""

from __future__ import annotations

import warnings as _warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import InputError, SegHiResCAMWarning
from ..settings import ExplainSettings
from .capture import segmentation_output
from .device import fitting_count, in_chunks, prepared_model, resolve_device
from .arrange import arrange_samples, image_tensor
from .held_model import held_model
from .targets import roi_prediction


@dataclass(frozen=True)
class MaskingScores:
    """Prediction Preserved (higher = the map keeps what the model needs; NaN when the ROI is
    empty), Image Preserved (lower = the map keeps less of the image) and Excess Prediction
    (lower = the masking created less prediction that was not there; NaN when the ROI is empty)."""

    prediction_preserved: float
    image_preserved: float
    excess_prediction: float


def masking_scores(model: nn.Module, image, heatmap, *, target_class: int, roi=None, threshold: float | None = None,
                   baseline: float = 0.0, spatial_dims: int | None = None, slice_axis: int | None = None,
                   device: str = "auto", multilabel: bool | None = None, probabilities: bool | None = None,
                   output_key: int | str | None = None) -> MaskingScores:
    """Score a heatmap by masking the image with it and predicting again.

    Args:
        model, image, target_class, roi, spatial_dims, slice_axis, device, multilabel, probabilities,
            output_key: as in :func:`engine.explain.explain` (roi None = the model's own prediction on
            ``image``; a ``LoadedModel``'s card gives what is left as None).
        heatmap: array of the image's spatial shape with values in [0, 1] (a normalised map).
        threshold: None multiplies the image by the map; a number keeps the voxels whose map
            value is above it, unchanged, and sets the others to ``baseline``.
        baseline: the intensity that replaces what the map removes (0 for normalised images).

    Returns:
        MaskingScores(prediction_preserved, image_preserved, excess_prediction).

    Raises:
        InputError: the heatmap has the wrong shape, NaN values or values outside [0, 1].
    """
    held = held_model(model)
    model, spatial_dims = held.module, held.spatial_dims(spatial_dims, image)
    chosen = held.settings(ExplainSettings(target_class=target_class, device=device, slice_axis=slice_axis,
                                           multilabel=multilabel, probabilities=probabilities, output_key=output_key))
    target_class, slice_axis = chosen.target_class, 0 if chosen.slice_axis is None else chosen.slice_axis
    multilabel, probabilities = bool(chosen.multilabel), bool(chosen.probabilities)
    for message in held.notes:
        _warnings.warn(message, SegHiResCAMWarning, stacklevel=2)
    image_t = image_tensor(image, model)
    kept_fraction = _kept_fraction(heatmap, tuple(image_t.shape[1:]), threshold)
    keep = kept_fraction.to(image_t.dtype)
    # Where the map keeps everything the image is used exactly as it is (no rounding from the baseline).
    masked = torch.where(keep == 1, image_t, baseline + keep * (image_t - baseline))
    samples, roi_t, _ = arrange_samples(image_t, roi, spatial_dims, slice_axis)
    masked_samples, _, _ = arrange_samples(masked, None, spatial_dims, slice_axis)
    run_device = resolve_device(device)
    sums = torch.zeros(3, dtype=torch.float64)
    with prepared_model(model, run_device), torch.inference_mode():

        def predict_both(index: torch.Tensor) -> None:
            batch = torch.cat([samples[index], masked_samples[index]]).to(run_device)
            output = segmentation_output(model(batch), batch, target_class, chosen.output_key)
            given = None if roi_t is None else roi_t[index].to(run_device)
            original, weights = roi_prediction(output[: len(index)], target_class, given, multilabel, probabilities)
            changed, _ = roi_prediction(output[len(index):], target_class, weights, multilabel, probabilities)
            sums[0] += original.sum().cpu()
            sums[1] += torch.minimum(changed, original).sum().cpu()
            sums[2] += torch.clamp(changed - original, min=0).sum().cpu()

        # Each chunk holds every sample twice (original and masked).
        size = fitting_count(model, samples[:1].to(run_device), samples.shape[0], factor=2)
        in_chunks(samples.shape[0], size, run_device, predict_both)
    if sums[0] <= 0:
        _warnings.warn(f"the region to score (class {target_class}) is empty, so Prediction Preserved is undefined "
                       "(NaN); choose a region or class that is present", SegHiResCAMWarning, stacklevel=2)
        preserved = excess = float("nan")
    else:
        preserved, excess = float(sums[1] / sums[0]), float(sums[2] / sums[0])
    return MaskingScores(preserved, float(kept_fraction.mean()), excess)


def _kept_fraction(heatmap, spatial: tuple[int, ...], keep_threshold: float | None) -> torch.Tensor:
    heat = heatmap.detach().cpu() if isinstance(heatmap, torch.Tensor) else torch.as_tensor(np.asarray(heatmap))
    if tuple(heat.shape) != spatial:
        raise InputError(f"the heatmap has shape {tuple(heat.shape)} but the image's spatial shape is {spatial}; "
                         "give the heatmap computed for this image")
    heat = heat.to(torch.float64)
    if not torch.isfinite(heat).all():
        raise InputError("the heatmap contains NaN or infinite values; recompute it or replace them by 0")
    if heat.numel() and (heat.min() < 0 or heat.max() > 1):
        raise InputError(f"the heatmap has values in [{float(heat.min()):g}, {float(heat.max()):g}], outside [0, 1]; "
                         "normalise it (divide by its maximum) before scoring")
    if keep_threshold is None:
        return heat
    if not np.isfinite(keep_threshold):
        raise InputError(f"the threshold {keep_threshold} is not a number; give a value in [0, 1] or None")
    return (heat > keep_threshold).to(torch.float64)
