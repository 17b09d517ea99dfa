"""Where the windows lie and how much each voxel of a window counts, as nnU-Net v2's predictor does it.

Written from nnU-Net v2's ``compute_steps_for_sliding_window``, ``compute_gaussian`` and
``pad_nd_image`` (``nnunetv2/inference/sliding_window_prediction.py``,
``predict_from_raw_data.py``), so that fused logits equal nnU-Net's own sliding-window logits:
- an image smaller than the patch is zero-padded to the patch, split evenly on both sides
  (the odd voxel after);
- along each axis the windows start at ``round(i * (size - patch) / (n - 1))`` for
  ``n = ceil((size - patch) / (patch * step)) + 1`` windows, so the first and the last window
  touch the image's borders and the step is at most ``patch * step``;
- the importance map is a Gaussian with sigma = patch / 8 centred on voxel ``patch // 2``,
  scaled to a maximum of 10 and rounded to float16 (nnU-Net keeps it in half precision);
  voxels where it underflows to 0 take the smallest non-zero value, so no voxel has weight 0.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

# nnU-Net's constants (predict_from_raw_data.py: sigma_scale=1/8, value_scaling_factor=10)
SIGMA_SCALE = 1.0 / 8.0
VALUE_SCALING = 10.0
_TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter's default kernel radius, in sigmas


def padding_to_patch(image_size: Sequence[int], patch_size: Sequence[int]) -> list[tuple[int, int]]:
    """``(before, after)`` zero padding per axis that makes the image at least the patch's size."""
    pads = []
    for size, patch in zip(image_size, patch_size):
        missing = max(int(patch) - int(size), 0)
        pads.append((missing // 2, missing // 2 + missing % 2))
    return pads


def tile_starts(image_size: Sequence[int], patch_size: Sequence[int], step: float) -> list[list[int]]:
    """The first voxel of every window along each axis (the image is at least the patch's size)."""
    starts = []
    for size, patch in zip(image_size, patch_size):
        size, patch = int(size), int(patch)
        if size < patch:
            raise ValueError(f"image size {size} is smaller than the patch {patch}; pad it first")
        count = int(math.ceil((size - patch) / (patch * float(step)))) + 1
        spacing = (size - patch) / (count - 1) if count > 1 else 0.0
        # round() is round-half-even like numpy's np.round, which nnU-Net uses
        starts.append([int(round(spacing * i)) for i in range(count)])
    return starts


def window_corners(image_size: Sequence[int], patch_size: Sequence[int], step: float) -> list[tuple[int, ...]]:
    """Every window's first voxel, in nnU-Net's order (the last axis fastest)."""
    return list(itertools.product(*tile_starts(image_size, patch_size, step)))


def _gaussian_kernel_1d(size: int, sigma: float) -> np.ndarray:
    """scipy.ndimage.gaussian_filter's response along one axis to a unit impulse at ``size // 2``."""
    radius = int(_TRUNCATE * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 / (sigma * sigma) * offsets**2)
    kernel /= kernel.sum()
    out = np.zeros(size, dtype=np.float64)
    distance = np.arange(size) - size // 2
    inside = np.abs(distance) <= radius
    out[inside] = kernel[distance[inside] + radius]
    return out


def gaussian_importance(patch_size: Sequence[int], sigma_scale: float = SIGMA_SCALE,
                        value_scaling: float = VALUE_SCALING) -> np.ndarray:
    """nnU-Net's importance map for one patch, as float32 holding its float16 values.

    A unit impulse at the patch's centre blurred with sigma = ``sigma_scale * patch`` per axis
    (separable, so the product of 1-D responses), divided by its maximum over ``value_scaling``,
    rounded to float16; zeros (underflow) are replaced by the smallest non-zero value.
    """
    patch = [int(s) for s in patch_size]
    if min(patch) < 1:
        raise ValueError(f"patch size {patch_size} must be positive")
    blurred = np.ones((), dtype=np.float64)
    for axis, size in enumerate(patch):
        # sigma 0 (a patch of 1 voxel... or sigma_scale 0) is an impulse, as scipy leaves it
        sigma = size * sigma_scale
        kernel = _gaussian_kernel_1d(size, sigma) if sigma > 0 else np.eye(1, size, size // 2)[0]
        blurred = blurred[..., None] * kernel.reshape((1,) * axis + (size,))
    blurred = blurred / (blurred.max() / value_scaling)
    half = blurred.astype(np.float16)
    zero = half == 0
    if zero.any():
        half[zero] = half[~zero].min()
    return half.astype(np.float32)


def importance_map(patch_size: Sequence[int], gaussian: bool) -> np.ndarray:
    """The per-voxel weight of one window: nnU-Net's Gaussian, or ones (uniform averaging)."""
    if gaussian:
        return gaussian_importance(patch_size)
    return np.ones(tuple(int(s) for s in patch_size), dtype=np.float32)


def mirror_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """The flips nnU-Net averages: none first, then every non-empty combination of ``axes``."""
    axes = list(axes)
    return [()] + [combo for count in range(1, len(axes) + 1) for combo in itertools.combinations(axes, count)]
