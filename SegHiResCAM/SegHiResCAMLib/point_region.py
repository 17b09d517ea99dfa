"""The region a radiologist points at: the model's predicted region of a class connected to a point,
or, where the model predicts nothing there, a sphere around the point.

"Why is *this* lesion called tumour?" is one click: the point picks one connected piece of the
prediction, and the explanation's target sums the class over that piece only.

Connectivity is 6 (voxels sharing a face), not 26: two lesions that touch only at an edge or a
corner stay two regions, which matters most on thick slices, where a diagonal neighbour can lie
several millimetres away. It is also what Slicer's Islands effect uses
(``SegmentEditorIslandsEffect.py``: ``SetFullyConnected(False)``) and the default of ITK's
``ConnectedComponent`` and ``scipy.ndimage.label``.

numpy and SimpleITK only (no torch): the points are checked before any model is loaded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .settings import RegionPoint


@dataclass(frozen=True)
class PointRegion:
    """The region of a point on the image's voxel grid.

    Attributes:
        mask: bool ``(K, J, I)``.
        voxel: ``(k, j, i)`` of the voxel that holds the point.
        predicted: True when ``mask`` is the predicted component connected to that voxel; False when
            the model predicts nothing there and ``mask`` is the sphere around the point.
    """

    mask: np.ndarray
    voxel: tuple[int, int, int]
    predicted: bool

    def describe(self, point: RegionPoint, class_index: int) -> str:
        """One sentence for the user saying which region this is."""
        where = "({:.1f}, {:.1f}, {:.1f})".format(*point.ras)
        voxels = int(self.mask.sum())
        if self.predicted:
            return (f"the region is the predicted class-{class_index} region connected to the point {where}, "
                    f"{voxels} voxels")
        return (f"the model predicts no voxel of class {class_index} at the point {where}, so the region is the sphere "
                f"of radius {point.radius_mm:g} mm around it ({voxels} voxels)")


def point_voxel(ijk_to_ras: np.ndarray, spatial_shape: Sequence[int], ras: Sequence[float],
                image_name: str = "the image") -> tuple[int, int, int]:
    """``(k, j, i)`` of the voxel whose cell holds the RAS point (the voxel with the nearest centre).

    Raises:
        InputError: the point lies outside the image, saying where it is in voxels.
    """
    matrix = np.asarray(ijk_to_ras, dtype=float)
    ijk = (np.linalg.inv(matrix) @ np.array([*map(float, ras), 1.0]))[:3]
    sizes = np.array(list(spatial_shape)[::-1], dtype=float)  # I, J, K
    # A voxel's cell reaches half a voxel beyond its centre: the image spans [-0.5, size - 0.5).
    if not (np.all(ijk >= -0.5) and np.all(ijk < sizes - 0.5)):
        where = "({:.1f}, {:.1f}, {:.1f})".format(*map(float, ras))
        raise InputError(
            f"the point {where} lies outside {image_name} (at voxel I, J, K = "
            f"{', '.join(f'{value:.1f}' for value in ijk)} of {' x '.join(str(int(s)) for s in sizes)}); "
            "place the point inside the image"
        )
    i, j, k = (int(min(math.floor(value + 0.5), size - 1)) for value, size in zip(ijk, sizes))
    return k, j, i


def predicted_component(predicted: np.ndarray, voxel: Sequence[int]) -> np.ndarray:
    """The 6-connected component of the bool mask ``predicted`` that holds ``voxel`` ``(k, j, i)``;
    all False when the mask is False there."""
    predicted = np.asarray(predicted, dtype=bool)
    index = tuple(int(v) for v in voxel)
    if not predicted[index]:
        return np.zeros(predicted.shape, dtype=bool)
    # A copy, not a view: a view would outlive the temporary image that owns its memory.
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(predicted.astype(np.uint8)), False))
    return labels == labels[index]


def sphere_around(ijk_to_ras: np.ndarray, spatial_shape: Sequence[int], ras: Sequence[float],
                  radius_mm: float) -> np.ndarray:
    """bool ``(K, J, I)``: the voxels whose centres lie within ``radius_mm`` of the RAS point (any
    spacing and direction), plus the voxel that holds the point, so the region is never empty."""
    matrix = np.asarray(ijk_to_ras, dtype=float)
    shape = tuple(int(s) for s in spatial_shape)
    inverse = np.linalg.inv(matrix[:3, :3])
    centre = inverse @ (np.asarray(ras, dtype=float) - matrix[:3, 3])  # continuous (i, j, k)
    # The sphere's extent along index axis a is radius * |row a of the inverse direction matrix|.
    reach = radius_mm * np.linalg.norm(inverse, axis=1)
    sizes = shape[::-1]
    low = [max(0, int(math.floor(c - r))) for c, r in zip(centre, reach)]
    high = [min(size, int(math.ceil(c + r)) + 1) for c, r, size in zip(centre, reach, sizes)]
    mask = np.zeros(shape, dtype=bool)
    if all(lo < hi for lo, hi in zip(low, high)):
        i, j, k = np.meshgrid(*(np.arange(lo, hi) for lo, hi in zip(low, high)), indexing="ij")
        offsets = matrix[:3, :3] @ np.stack([i.ravel(), j.ravel(), k.ravel()]).astype(float)
        offsets += (matrix[:3, 3] - np.asarray(ras, dtype=float))[:, None]
        inside = (np.einsum("ij,ij->j", offsets, offsets) <= radius_mm**2).reshape(i.shape)
        mask[low[2]:high[2], low[1]:high[1], low[0]:high[0]] = inside.transpose(2, 1, 0)
    mask[point_voxel(matrix, shape, ras)] = True
    return mask


def point_region(predicted: np.ndarray, ijk_to_ras: np.ndarray, point: RegionPoint) -> PointRegion:
    """The region of ``point``: the predicted component that holds it, else the sphere around it.

    Args:
        predicted: bool ``(K, J, I)``, the model's predicted region of the class on the image's grid.
        ijk_to_ras: the image's 4x4 IJK-to-RAS matrix.
        point: the point and the sphere's radius.

    Raises:
        InputError: the point lies outside the image.
    """
    predicted = np.asarray(predicted, dtype=bool)
    voxel = point_voxel(ijk_to_ras, predicted.shape, point.ras)
    if predicted[voxel]:
        return PointRegion(predicted_component(predicted, voxel), voxel, True)
    return PointRegion(sphere_around(ijk_to_ras, predicted.shape, point.ras, point.radius_mm), voxel, False)
