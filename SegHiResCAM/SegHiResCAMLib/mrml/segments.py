"""A segment of a segmentation node as a binary mask in a volume's voxel grid.

Uses the Segmentations logic's static methods and vtkOrientedImageData resampling, which
exist in slicer-core and in Slicer; no ``slicer.modules`` and no temporary nodes. The
segmentation is never modified: a segment stored only as a closed surface is converted on
a temporary copy, as Slicer's ``GetSegmentBinaryLabelmapRepresentation`` does.
"""

from __future__ import annotations

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from ..errors import InputError
from .volumes import array_from_node, ijk_to_ras_of_node, numpy_to_matrix


def segment_names(segmentation_node: slicer.vtkMRMLSegmentationNode) -> dict[str, str]:
    """Segment ID -> segment name, in the segmentation's order."""
    segmentation = segmentation_node.GetSegmentation()
    names = {}
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        names[segment_id] = segmentation.GetSegment(segment_id).GetName()
    return names


def find_segment_id(segmentation_node: slicer.vtkMRMLSegmentationNode, id_or_name: str) -> str:
    """The ID of a segment given its ID or its name.

    Raises:
        InputError: no segment has that ID or name (the message lists the segments).
    """
    _check_segmentation(segmentation_node)
    names = segment_names(segmentation_node)
    if id_or_name in names:
        return id_or_name
    matches = [segment_id for segment_id, name in names.items() if name == id_or_name]
    if matches:
        return matches[0]
    listed = ", ".join(f"'{name}'" for name in names.values()) or "none"
    raise InputError(
        f"the segmentation '{segmentation_node.GetName()}' has no segment '{id_or_name}'; "
        f"its segments are: {listed}. Pick one of them."
    )


def segment_mask(
    segmentation_node: slicer.vtkMRMLSegmentationNode,
    segment_id: str,
    reference_volume_node: slicer.vtkMRMLVolumeNode,
) -> np.ndarray:
    """The segment as a boolean ``(K, J, I)`` mask in the reference volume's voxel grid.

    A segmentation stored with another geometry (spacing, orientation, extent) or under
    another parent transform is resampled (nearest neighbour) into the volume's grid.

    Args:
        segmentation_node: the segmentation holding the segment (left unchanged).
        segment_id: the segment's ID (a segment name is accepted too).
        reference_volume_node: the volume whose grid the mask follows.

    Returns:
        Boolean array of the reference volume's shape, True inside the segment.

    Raises:
        InputError: the segment does not exist, cannot be made into a labelmap, or is
            empty inside the image.
    """
    segment_id = find_segment_id(segmentation_node, segment_id)
    reference_shape = array_from_node(reference_volume_node).shape[-3:]
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    segment_name = segment.GetName()

    labelmap = slicer.vtkOrientedImageData()
    # Parent transforms are applied below, relative to the reference volume's own one.
    if not slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
        segmentation_node, segment_id, labelmap, False
    ):
        raise InputError(
            f"the segment '{segment_name}' cannot be turned into a voxel mask; "
            "open it in the Segment Editor once (that creates its labelmap) and try again"
        )

    reference = slicer.vtkOrientedImageData()
    reference.SetExtent(0, reference_shape[2] - 1, 0, reference_shape[1] - 1, 0, reference_shape[0] - 1)
    reference.SetImageToWorldMatrix(numpy_to_matrix(ijk_to_ras_of_node(reference_volume_node)))
    reference.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)

    segmentation_to_reference = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(
        segmentation_node.GetParentTransformNode(),
        reference_volume_node.GetParentTransformNode(),
        segmentation_to_reference,
    )
    resampled = slicer.vtkOrientedImageData()
    if _labelmap_is_empty(labelmap):
        mask = np.zeros(reference_shape, dtype=bool)
    else:
        if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            labelmap, reference, resampled, False, False, segmentation_to_reference, 0
        ):
            raise InputError(f"the segment '{segment_name}' could not be resampled into the volume's grid")
        mask = _values_in_reference_grid(resampled, reference_shape) == _label_value(segment)

    if not mask.any():
        raise InputError(
            f"the segment '{segment_name}' is empty inside the image '{reference_volume_node.GetName()}'; "
            "draw it in the Segment Editor, or choose the volume it was drawn on"
        )
    return mask


def _check_segmentation(segmentation_node) -> None:
    if segmentation_node is None or not segmentation_node.IsA("vtkMRMLSegmentationNode"):
        raise InputError("a segmentation node is needed; select the segmentation that holds the region to explain")


def _label_value(segment: slicer.vtkSegment) -> int:
    # Segments may share one labelmap layer; each owns one label value in it.
    return int(segment.GetLabelValue())


def _labelmap_is_empty(labelmap: slicer.vtkOrientedImageData) -> bool:
    extent = labelmap.GetExtent()
    no_voxels = extent[0] > extent[1] or extent[2] > extent[3] or extent[4] > extent[5]
    return no_voxels or labelmap.GetPointData().GetScalars() is None


def _values_in_reference_grid(image: slicer.vtkOrientedImageData, shape: tuple[int, int, int]) -> np.ndarray:
    """The resampled image's voxels as a ``shape`` array, zero where its extent does not reach."""
    k_size, j_size, i_size = shape
    out = np.zeros(shape, dtype=np.int64)
    extent = image.GetExtent()
    if extent[0] > extent[1] or image.GetPointData().GetScalars() is None:
        return out
    values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    values = values.reshape(extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    # Clip the image's extent to the reference grid (resampling may pad beyond it).
    lo = [max(extent[4], 0), max(extent[2], 0), max(extent[0], 0)]
    hi = [min(extent[5], k_size - 1), min(extent[3], j_size - 1), min(extent[1], i_size - 1)]
    if any(low > high for low, high in zip(lo, hi)):
        return out
    out[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1] = values[
        lo[0] - extent[4] : hi[0] - extent[4] + 1,
        lo[1] - extent[2] : hi[1] - extent[2] + 1,
        lo[2] - extent[0] : hi[2] - extent[0] + 1,
    ]
    return out
