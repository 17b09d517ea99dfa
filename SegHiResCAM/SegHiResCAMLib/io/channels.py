"""Several image files as one multi-channel volume: one file per model input channel.

A model trained on several sequences (T1, T1ce, T2, FLAIR) takes one channel per sequence, in the
order of its model card. The first file's voxel grid is the grid of the explanation and of every
heatmap; a later file on another grid is resampled onto it (linear interpolation, 0 outside), with
a warning, since its voxels then are no longer the ones the scanner wrote.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError, SegHiResCAMWarning
from ..volume import Volume, itk_geometry_from_ijk_to_ras
from .images import read_image, same_grid


def read_channels(paths: Sequence[str | Path]) -> Volume:
    """Read one scalar 3D image per channel and stack them on the first image's grid.

    Args:
        paths: image files (or DICOM series folders), in the model card's channel order.

    Returns:
        One file: its :class:`Volume` as :func:`~.images.read_image` gives it, ``(K, J, I)``.
        Several: float32 ``(C, K, J, I)`` on the first image's grid.

    Raises:
        InputError: no path, or a file that :func:`~.images.read_image` refuses.
    """
    if not paths:
        raise InputError("no image was given; give one image per model input channel")
    volumes = [read_image(path) for path in paths]
    first = volumes[0]
    if len(volumes) == 1:
        return first
    channels = [np.asarray(first.array, np.float32)]
    for path, volume in zip(paths[1:], volumes[1:]):
        if same_grid(volume, first):
            channels.append(np.asarray(volume.array, np.float32))
            continue
        channels.append(_resampled_onto(volume, first))
        warnings.warn(
            f"the image {Path(path).name} lies on another voxel grid than {Path(paths[0]).name}; it was resampled "
            "onto the first image's grid (linear interpolation, 0 outside it)",
            SegHiResCAMWarning,
            stacklevel=2,
        )
    return Volume(np.stack(channels), first.ijk_to_ras)


def _itk_image(array: np.ndarray, ijk_to_ras: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    origin, spacing, direction = itk_geometry_from_ijk_to_ras(ijk_to_ras)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


def _resampled_onto(volume: Volume, reference: Volume) -> np.ndarray:
    moving = _itk_image(np.asarray(volume.array, np.float32), volume.ijk_to_ras)
    grid = _itk_image(np.zeros(reference.spatial_shape, np.float32), reference.ijk_to_ras)
    resampled = sitk.Resample(moving, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(resampled)
