"""Shared builders for the MRML glue tests: real slicer-core nodes, small grids."""

from __future__ import annotations

import numpy as np
import slicer

from SegHiResCAMLib.mrml.volumes import image_data_from_array, numpy_to_matrix, update_node_from_volume
from SegHiResCAMLib.volume import Volume


def rotation(axis, degrees: float) -> np.ndarray:
    """3x3 rotation about ``axis`` (Rodrigues)."""
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    angle = np.radians(degrees)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def oblique_ijk_to_ras() -> np.ndarray:
    """Rotation about a skew axis, anisotropic spacing, non-zero origin."""
    matrix = np.eye(4)
    matrix[:3, :3] = rotation([1.0, 2.0, 3.0], 27.0) @ np.diag([0.7, 1.3, 2.5])
    matrix[:3, 3] = [12.5, -40.25, 73.0]
    return matrix


def axis_aligned_ijk_to_ras() -> np.ndarray:
    """Anisotropic spacing and non-zero origin, axes along R, A, S."""
    matrix = np.diag([1.0, 1.5, 2.0, 1.0])
    matrix[:3, 3] = [-10.0, 20.0, 5.0]
    return matrix


def add_volume(scene, array: np.ndarray, ijk_to_ras: np.ndarray, name: str = "image") -> slicer.vtkMRMLScalarVolumeNode:
    """A scalar volume node with display node, holding a copy of ``array`` (KJI)."""
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName(name)
    scene.AddNode(node)
    update_node_from_volume(node, Volume(array, ijk_to_ras))
    node.CreateDefaultDisplayNodes()
    return node


def add_segmentation(scene, name: str = "Segmentation") -> slicer.vtkMRMLSegmentationNode:
    node = slicer.vtkMRMLSegmentationNode()
    node.SetName(name)
    scene.AddNode(node)
    return node


def oriented_image(array: np.ndarray, ijk_to_ras: np.ndarray) -> slicer.vtkOrientedImageData:
    image = slicer.vtkOrientedImageData()
    image.ShallowCopy(image_data_from_array(np.asarray(array, dtype=np.uint8)))
    image.SetImageToWorldMatrix(numpy_to_matrix(ijk_to_ras))
    return image


def add_segment(segmentation_node, mask: np.ndarray, ijk_to_ras: np.ndarray, segment_id: str, name: str) -> str:
    """Add a segment whose binary labelmap is ``mask`` (KJI) on the grid ``ijk_to_ras``."""
    added = segmentation_node.GetSegmentation().AddEmptySegment(segment_id, name)
    if added != segment_id:
        raise RuntimeError(f"could not add segment {segment_id!r}")
    if mask.any() and not slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        oriented_image(mask, ijk_to_ras), segmentation_node, segment_id
    ):
        raise RuntimeError(f"could not set the labelmap of segment {segment_id!r}")
    return segment_id


def box_mask(shape, low, high) -> np.ndarray:
    """Boolean KJI array, True on ``[low, high)`` per axis."""
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(lo, hi) for lo, hi in zip(low, high))] = True
    return mask


def matrix_of(node) -> np.ndarray:
    from SegHiResCAMLib.mrml.volumes import ijk_to_ras_of_node

    return ijk_to_ras_of_node(node)
