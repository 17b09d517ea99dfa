"""Heatmaps side by side: one linked slice view per heatmap, in a view layout of their own.

Seg-HiRes-Grad CAM next to Seg-Grad CAM of the same run: each view shows the image with one
heatmap over it, and the views are linked, so scrolling or panning one moves the others to the
same place.

How Slicer does it, read from its sources (Slicer 583e9b37):
- A layout is an XML description registered on the scene's singleton ``vtkMRMLLayoutNode``
  (``AddLayoutDescription`` / ``SetLayoutDescription``) and chosen with ``SetViewArrangement``;
  built-in layouts are numbered below 100, so a module picks a large number of its own
  (Docs/developer_guide/script_repository/gui.md, "customLayoutId"). Slicer's own side-by-side
  layout (``SlicerLayoutSideBySideView``, Libs/MRML/Logic/vtkMRMLLayoutLogic.cxx) reuses the
  Yellow view, whose orientation it sets only when the view is new (``action="default"``), so it
  stays sagittal; the layout here asks for axial views explicitly, also on relayout.
- ``vtkMRMLLayoutLogic::CreateMissingViews`` makes the slice nodes the description names; a view's
  layers are in the ``vtkMRMLSliceCompositeNode`` of the same layout name, which Slicer's slice logic
  finds by that name or creates (``vtkMRMLSliceLogic::UpdateSliceCompositeNode``); it is created the
  same way here when no view has shown it yet.
- Linked views (``SetLinkedControl``) pass on slice moves to views of the same orientation; layer
  changes are passed on only while a user changes them in a view's controller
  (``vtkMRMLSliceLinkLogic``: "if this is not the node that we are interacting with, short
  circuit"), so setting each view's foreground here keeps one heatmap per view.
"""

from __future__ import annotations

from collections.abc import Sequence

import slicer

from ..errors import DisplayError, InputError
from .heatmap_display import OPACITY_ATTRIBUTE, is_heatmap_node

#: The layout's number (Slicer's built-in layouts are numbered below 100).
SIDE_BY_SIDE_LAYOUT_ID = 5150
#: Layout names of the views, "SegHiResCAM1", "SegHiResCAM2", ...
VIEW_PREFIX = "SegHiResCAM"
_VIEW_COLOR = "#E17012"  # the colour Slicer gives its compare views


def side_by_side_layout(count: int, orientation: str = "Axial") -> str:
    """The layout description of ``count`` slice views in one row."""
    if count < 1:
        raise InputError("no heatmap to show side by side; run an explanation with several methods first")
    items = "".join(
        f'<item><view class="vtkMRMLSliceNode" singletontag="{VIEW_PREFIX}{index}">'
        f'<property name="orientation" action="default">{orientation}</property>'
        f'<property name="orientation" action="relayout">{orientation}</property>'
        f'<property name="viewlabel" action="default">{index}</property>'
        f'<property name="viewcolor" action="default">{_VIEW_COLOR}</property>'
        "</view></item>"
        for index in range(1, count + 1)
    )
    return f'<layout type="horizontal">{items}</layout>'


def show_side_by_side(scene: slicer.vtkMRMLScene, reference_volume_node, heatmap_nodes: Sequence,
                      layout_node=None, orientation: str = "Axial") -> list[str]:
    """Lay out one linked slice view per heatmap, each showing the image with that heatmap over it.

    Args:
        scene: the scene (``slicer.mrmlScene`` in Slicer).
        reference_volume_node: the explained image, the views' background.
        heatmap_nodes: heatmaps this module made, in view order (left to right).
        layout_node: the scene's layout node (Slicer:
            ``slicer.app.layoutManager().layoutLogic().GetLayoutNode()``); None = the scene's first.
        orientation: "Axial", "Sagittal" or "Coronal", for every view.

    Returns:
        The views' layout names, in order.

    Raises:
        InputError: no heatmap, or a node that is not a heatmap of this module.
        DisplayError: the scene has no view layout, or the layout made no views.
    """
    heatmaps = list(heatmap_nodes)
    for node in heatmaps:
        if not is_heatmap_node(node) or node.GetScene() is not scene:
            name = node.GetName() if node is not None else "None"
            raise InputError(f"'{name}' is not a SegHiResCAM heatmap of this scene; show its heatmaps side by side")
    description = side_by_side_layout(len(heatmaps), orientation)
    layout = layout_node if layout_node is not None else scene.GetFirstNodeByClass("vtkMRMLLayoutNode")
    if layout is None:
        raise DisplayError("this scene has no view layout to arrange; open the heatmaps in Slicer's views instead")
    if layout.IsLayoutDescription(SIDE_BY_SIDE_LAYOUT_ID):
        layout.SetLayoutDescription(SIDE_BY_SIDE_LAYOUT_ID, description)
    else:
        layout.AddLayoutDescription(SIDE_BY_SIDE_LAYOUT_ID, description)
    layout.SetViewArrangement(SIDE_BY_SIDE_LAYOUT_ID)
    names = [f"{VIEW_PREFIX}{index}" for index in range(1, len(heatmaps) + 1)]
    for name, heatmap in zip(names, heatmaps):
        if _node_of_view(scene, "vtkMRMLSliceNode", name) is None:
            raise DisplayError(f"the view layout made no view '{name}'; is a layout logic watching the scene?")
        composite = _composite_node(scene, name)
        was_modifying = composite.StartModify()
        try:
            composite.SetBackgroundVolumeID(reference_volume_node.GetID())
            composite.SetForegroundVolumeID(heatmap.GetID())
            composite.SetForegroundOpacity(float(heatmap.GetAttribute(OPACITY_ATTRIBUTE) or 0.5))
            composite.SetLinkedControl(1)
        finally:
            composite.EndModify(was_modifying)
    return names


def _node_of_view(scene, class_name: str, layout_name: str):
    """The scene's node of ``class_name`` that belongs to the view ``layout_name``, or None."""
    for index in range(scene.GetNumberOfNodesByClass(class_name)):
        node = scene.GetNthNodeByClass(index, class_name)
        if node.GetLayoutName() == layout_name:
            return node
    return None


def _composite_node(scene, layout_name: str):
    """The view's layer node, found by layout name or made as Slicer's slice logic makes it."""
    node = _node_of_view(scene, "vtkMRMLSliceCompositeNode", layout_name)
    if node is not None:
        return node
    node = scene.CreateNodeByClass("vtkMRMLSliceCompositeNode")  # the scene's default node, as Slicer does
    node.UnRegister(None)  # CreateNodeByClass is a factory method: the scene keeps the reference
    node.SetLayoutName(layout_name)
    scene.AddNode(node)
    return node
