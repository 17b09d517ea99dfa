"""A Markups point as the region's point: where a radiologist clicked, in the image's own frame.

The worker reads the image with its own IJK-to-RAS matrix and no parent transform (see
``mrml.volumes``), so a point placed in the views (world coordinates) is brought into the
image's frame here: through the inverse of the image's parent transforms, if it has any.
"""

from __future__ import annotations

import slicer
import vtk

from ..errors import InputError


def markup_point_ras(markups_node, volume_node) -> tuple[tuple[float, float, float], str]:
    """The last placed point of a Markups point list, in ``volume_node``'s own RAS frame, and its label.

    The last point is the one just placed: adding a point to the list and running again explains
    the new spot. Points still being placed (no position yet) are skipped.

    Args:
        markups_node: a ``vtkMRMLMarkupsFiducialNode`` (a point list).
        volume_node: the explained image.

    Returns:
        ``((r, a, s), label)``.

    Raises:
        InputError: not a point list, or no placed point in it.
    """
    if markups_node is None or not markups_node.IsA("vtkMRMLMarkupsFiducialNode"):
        raise InputError("a point list (Markups) is needed for the region at a point; place a point on the lesion")
    placed = [index for index in range(markups_node.GetNumberOfControlPoints())
              if markups_node.GetNthControlPointPositionStatus(index) == slicer.vtkMRMLMarkupsNode.PositionDefined]
    if not placed:
        raise InputError(f"the point list '{markups_node.GetName()}' has no placed point; place a point on the "
                         "lesion to explain (Markups toolbar) and try again")
    index = placed[-1]
    world = [0.0, 0.0, 0.0]
    markups_node.GetNthControlPointPositionWorld(index, world)
    to_volume = vtk.vtkGeneralTransform()  # identity when the image has no parent transform
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(None, volume_node.GetParentTransformNode(), to_volume)
    ras = to_volume.TransformPoint(world)
    return (float(ras[0]), float(ras[1]), float(ras[2])), markups_node.GetNthControlPointLabel(index)
