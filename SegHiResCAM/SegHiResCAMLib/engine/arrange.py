"""Input arrangement shared by every engine entry point: the image as a tensor, its samples, its region.

A 3D model sees one sample, the whole image; a 2D model over a volume sees one sample per slice
along ``slice_axis``. :func:`arrange_samples` turns ``(C, *spatial)`` into ``(S, C, *model_spatial)``
and the region alike, and :class:`Layout` puts per-sample maps back into the image's shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..settings import ExplainSettings

_INTEGER_TYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)


@dataclass(frozen=True)
class Layout:
    """How samples (a batch of model inputs) map back to the image's spatial shape."""

    slice_axis: int | None

    def restore(self, maps: torch.Tensor) -> torch.Tensor:
        """``(S, *model_spatial)`` per-sample maps -> the image's spatial shape."""
        if self.slice_axis is None:
            return maps[0]
        return maps.movedim(0, self.slice_axis)


def image_tensor(image, model: nn.Module) -> torch.Tensor:
    """The image as a tensor of the model's floating dtype, checked for shape and finite values."""
    tensor = image if isinstance(image, torch.Tensor) else torch.as_tensor(np.asarray(image))
    if not (tensor.dtype.is_floating_point or tensor.dtype in _INTEGER_TYPES):
        raise InputError(f"the image has data type {tensor.dtype}; give real-valued intensities")
    floating = [p.dtype for p in list(model.parameters()) + list(model.buffers()) if p.dtype.is_floating_point]
    tensor = tensor.detach().to(floating[0] if floating else torch.float32)
    if tensor.ndim < 3:
        raise InputError(
            f"the image has shape {tuple(tensor.shape)}; give (channels, *spatial), e.g. (1, 64, 64) or (1, 96, 96, 96)"
        )
    if not torch.isfinite(tensor).all():
        raise InputError("the image contains NaN or infinite values; fix or mask them before explaining")
    return tensor


def region_tensor(roi, spatial: tuple[int, ...]) -> torch.Tensor | None:
    """The region as a tensor of the image's spatial shape: float weights as they are, anything else
    as a bool mask (non-zero = inside); None stays None."""
    if roi is None:
        return None
    roi_t = roi.detach() if isinstance(roi, torch.Tensor) else torch.as_tensor(np.asarray(roi))
    if tuple(roi_t.shape) != tuple(spatial):
        raise InputError(
            f"the region has shape {tuple(roi_t.shape)} but the image's spatial shape is {tuple(spatial)}; "
            "give a mask on the same grid as the image"
        )
    return roi_t if roi_t.dtype.is_floating_point else roi_t != 0


def arrange_samples(image: torch.Tensor, roi, spatial_dims: int | None, slice_axis: int):
    """Samples ``(S, C, *model_spatial)``, the region ``(S, *model_spatial)`` (or None) and their Layout."""
    spatial = tuple(image.shape[1:])
    dims = len(spatial) if spatial_dims is None else int(spatial_dims)
    if dims not in (2, 3) or dims > len(spatial) or len(spatial) - dims > 1:
        raise InputError(
            f"spatial_dims={spatial_dims} does not fit an image of spatial shape {spatial}; "
            "use 3 for a 3D model, 2 for a 2D model (on 2D images or slice by slice on volumes)"
        )
    roi_t = region_tensor(roi, spatial)
    if dims == len(spatial):
        return image[None], (None if roi_t is None else roi_t[None]), Layout(None)
    if slice_axis not in (0, 1, 2):
        raise InputError(f"slice_axis must be 0, 1 or 2 for a volume, got {slice_axis}")
    samples = image.movedim(1 + slice_axis, 0)
    return samples, (None if roi_t is None else roi_t.movedim(slice_axis, 0)), Layout(slice_axis)


def region_array(settings: ExplainSettings, roi, spatial_shape: tuple[int, ...]):
    """The region the target sums over, for the settings' region kind: the given ``roi`` ("mask"),
    None ("prediction": the model's own prediction, found on the output), or ones over the image
    ("whole-image"). Checked before any work (see ``ExplainSettings.region_kind``)."""
    kind = settings.region_kind(roi is not None)
    if kind == "point":
        raise InputError("the region kind 'point' needs the image's geometry and the model's prediction on it; "
                         "explain a volume with pipeline.explain_volume (or the command line, or Slicer)")
    if kind == "whole-image":
        return np.ones(tuple(spatial_shape), bool)
    return roi
