"""nnU-Net v2's resampling (``resample_data_or_seg_to_shape``), for images and maps, written from its code.

Per channel, a spline of the plans' order (3 for images, 1 for logits) with edge values
repeated beyond the borders and the result clipped to the input's range (skimage's
``resize(..., mode="edge", anti_aliasing=False)``, i.e. ``scipy.ndimage.zoom`` with
``grid_mode=True``). When the spacing is anisotropic (the largest over the smallest above 3,
in the current or the new spacing), the thick axis is resampled separately: each slice
in-plane with the spline, then along the thick axis with order ``order_z`` (0: nearest).
scipy is needed only here (the nnunet extra).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .optional import require

ANISOTROPY_THRESHOLD = 3.0


def separate_axis(current: Sequence[float], new: Sequence[float], force_separate_z: bool | None,
                  threshold: float = ANISOTROPY_THRESHOLD) -> int | None:
    """The axis nnU-Net resamples on its own, or None (its ``determine_do_sep_z_and_axis``)."""
    def lowres(spacing: Sequence[float]) -> list[int]:
        spacing = np.asarray(spacing, dtype=float)
        return [int(a) for a in np.where(max(spacing) / spacing == 1)[0]]

    def anisotropic(spacing: Sequence[float]) -> bool:
        return bool(np.max(spacing) / np.min(spacing) > threshold)

    if force_separate_z is not None:
        axes = lowres(current) if force_separate_z else None
    elif anisotropic(current):
        axes = lowres(current)
    elif anisotropic(new):
        axes = lowres(new)
    else:
        axes = None
    return axes[0] if axes is not None and len(axes) == 1 else None


def _resize(image: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """skimage.transform.resize(image, shape, order, mode="edge", anti_aliasing=False) for float input."""
    ndimage = require("scipy.ndimage", "nnunet")
    factors = np.divide(image.shape, shape)
    out = ndimage.zoom(image, [1 / f for f in factors], order=order, mode="nearest", grid_mode=True)
    np.clip(out, np.min(image), np.max(image), out=out)
    return out


def resample(data: np.ndarray, new_shape: Sequence[int], current_spacing: Sequence[float],
             new_spacing: Sequence[float], recipe: dict[str, Any],
             threshold: float = ANISOTROPY_THRESHOLD) -> np.ndarray:
    """``(C, *spatial)`` resampled to ``new_shape`` as nnU-Net does; the dtype is kept.

    ``recipe``: {"order": spline order, "order_z": order along a separate axis,
    "force_separate_z": None (decide from the spacing), True or False}.
    """
    new_shape = tuple(int(s) for s in new_shape)
    if tuple(data.shape[1:]) == new_shape:
        return data
    order, order_z = int(recipe.get("order", 3)), int(recipe.get("order_z", 0))
    axis = separate_axis(current_spacing, new_spacing, recipe.get("force_separate_z"), threshold)
    source = data.astype(np.float64, copy=False)
    out = np.zeros((data.shape[0], *new_shape), dtype=data.dtype)
    for c, channel in enumerate(source):
        if axis is None:
            out[c] = _resize(channel, new_shape, order)
            continue
        in_plane = [s for a, s in enumerate(new_shape) if a != axis]
        slices = np.moveaxis(channel, axis, 0)
        stacked = np.stack([_resize(plane, in_plane, order) for plane in slices])
        stacked = np.moveaxis(stacked, 0, axis)
        if stacked.shape[axis] == new_shape[axis]:
            out[c] = stacked
            continue
        ndimage = require("scipy.ndimage", "nnunet")
        scales = [float(o) / n for o, n in zip(stacked.shape, new_shape)]
        grids = np.mgrid[tuple(slice(0, n) for n in new_shape)].astype(np.float64)
        coordinates = np.array([scale * (grid + 0.5) - 0.5 for scale, grid in zip(scales, grids)])
        out[c] = ndimage.map_coordinates(stacked, coordinates, order=order_z, mode="nearest")
    return out
