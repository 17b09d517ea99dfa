"""A fresh MRML scene set up like Slicer's, for use outside Slicer (pytest, the demo, screenshots).

Inside Slicer, use ``slicer.mrmlScene`` instead: it already has all of this.
"""

from __future__ import annotations

import slicer
import vtk

#: Slice view layout name -> orientation, as in Slicer's conventional layout.
SLICE_VIEWS = {"Red": "Axial", "Yellow": "Sagittal", "Green": "Coronal"}


def new_scene(slice_views: dict[str, str] | None = None, view_3d: bool = True) -> slicer.vtkMRMLScene:
    """A new scene with Slicer's default colour tables, slice views and a 3D view.

    Args:
        slice_views: layout name -> orientation of the slice nodes to create
            (default Red/Yellow/Green as Axial/Sagittal/Coronal).
        view_3d: also add a 3D view node (layout name "1"), for volume rendering.

    Returns:
        The scene. Its colour nodes stay after the logic that made them is gone.
    """
    register_segmentation_converters()
    scene = slicer.vtkMRMLScene()
    add_default_color_nodes(scene)
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    for layout_name, orientation in (slice_views or SLICE_VIEWS).items():
        add_slice_view(scene, layout_name, orientation)
    if view_3d:
        view = slicer.vtkMRMLViewNode()
        view.SetLayoutName("1")
        view.SetName("View1")
        scene.AddNode(view)
    return scene


def register_segmentation_converters() -> None:
    """Register the labelmap <-> surface conversion rules, as Slicer's Segmentations module does at start.

    Without them a segmentation cannot even hold an empty labelmap segment. Safe to call again.
    """
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    registered = {rule.GetClassName() for rule in factory.GetConverterRules()}
    for rule_class in (
        slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
        slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule,
        slicer.vtkClosedSurfaceToFractionalLabelmapConversionRule,
        slicer.vtkFractionalLabelmapToClosedSurfaceConversionRule,
    ):
        if rule_class.__name__ not in registered:
            factory.RegisterConverterRule(rule_class())


def add_default_color_nodes(scene: slicer.vtkMRMLScene) -> None:
    """Add Slicer's built-in colour tables (Grey, Labels, PET, ...) to ``scene``.

    The file-based tables (Inferno, Viridis, ...) exist only inside Slicer.
    """
    logic = slicer.vtkMRMLColorLogic()
    logic.SetMRMLScene(scene)
    # The logic removes "its" colour nodes when deleted, unless it no longer has a scene.
    logic.SetMRMLScene(None)


def add_slice_view(scene: slicer.vtkMRMLScene, layout_name: str, orientation: str) -> slicer.vtkMRMLSliceNode:
    """Add a slice node and its slice composite node (what a slice view shows) to ``scene``."""
    logic = slicer.vtkMRMLSliceLogic()
    logic.SetMRMLScene(scene)
    slice_node = logic.AddSliceNode(layout_name)
    ensure_orientation_presets(slice_node)
    slice_node.SetOrientation(orientation)
    logic.SetMRMLScene(None)
    return slice_node


def ensure_orientation_presets(slice_node: slicer.vtkMRMLSliceNode) -> None:
    """Give the slice node the Axial/Sagittal/Coronal presets when the scene's default lacked them."""
    makers = {
        "Axial": slicer.vtkMRMLSliceNode.GetAxialSliceToRASMatrix,
        "Sagittal": slicer.vtkMRMLSliceNode.GetSagittalSliceToRASMatrix,
        "Coronal": slicer.vtkMRMLSliceNode.GetCoronalSliceToRASMatrix,
    }
    for name, make in makers.items():
        if not slice_node.HasSliceOrientationPreset(name):
            matrix = vtk.vtkMatrix3x3()
            make(matrix)
            slice_node.AddSliceOrientationPreset(name, matrix)


def node_ids(scene: slicer.vtkMRMLScene) -> set[str]:
    """IDs of all nodes now in the scene (take one before a change that must be undone on failure)."""
    return {scene.GetNthNode(index).GetID() for index in range(scene.GetNumberOfNodes())}


def remove_nodes_added_since(scene: slicer.vtkMRMLScene, ids_before: set[str]) -> None:
    """Remove every node whose ID was not in ``ids_before`` (no half-made nodes left behind)."""
    new_nodes = [scene.GetNodeByID(node_id) for node_id in node_ids(scene) - ids_before]
    for node in new_nodes:
        if node is not None and node.GetScene() is scene:
            scene.RemoveNode(node)
