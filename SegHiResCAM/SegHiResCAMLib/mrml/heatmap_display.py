"""Show a heatmap array as a coloured overlay: slice-view foreground and 3D volume rendering.

The heatmap becomes a scalar volume node with the reference volume's geometry, a heat
colour table (Slicer's Inferno where the scene has it, a built-in heat table otherwise),
window 0..1 and a lower threshold below which voxels are transparent. Running again with
the same output node updates it in place. The reference volume (and anything else the
user made) is never modified: an output node must be a heatmap this module made (it
carries :data:`HEATMAP_ATTRIBUTE`, which the panel's output selector also filters on),
and only nodes made here are named here. A call that fails leaves no new node behind,
the slice views as they were, and an output node updated in place with its previous voxels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import slicer

from ..catalog import method as method_choice
from ..errors import DisplayError, InputError
from ..volume import Volume
from .scene import node_ids, remove_nodes_added_since
from .volumes import array_from_node, ijk_to_ras_of_node, update_node_from_volume, volume_from_node

#: Slicer's Inferno colour table (present in Slicer, absent in bare slicer-core scenes).
INFERNO_COLOR_NODE_ID = "vtkMRMLColorTableNodeFileInferno.txt"
#: Attribute that marks the heat colour table this module creates when Inferno is absent.
HEAT_TABLE_ATTRIBUTE = "SegHiResCAM.HeatColorTable"
HEAT_TABLE_NAME = "SegHiResCAM Heat"
#: Marks a volume node as a heatmap this module made (value "1"): only such a node may be
#: overwritten as an output. Attributes are kept on it so the live sliders can rebuild the 3D look.
HEATMAP_ATTRIBUTE = "SegHiResCAM.Heatmap"
OPACITY_ATTRIBUTE = "SegHiResCAM.Opacity"
REFERENCE_ROLE = "SegHiResCAMReference"

# Heat palette: value -> RGB anchors, linearly interpolated. Dark red through orange to
# pale yellow; never grey, so heat stays distinguishable from the anatomy underneath.
_HEAT_ANCHORS = np.array(
    [
        [0.00, 0.20, 0.00, 0.05],
        [0.35, 0.80, 0.10, 0.05],
        [0.70, 1.00, 0.55, 0.00],
        [1.00, 1.00, 0.95, 0.35],
    ]
)
_TABLE_SIZE = 256
# Highest opacity of the 3D rendering, relative to the slice-view opacity: a volume
# accumulates opacity along each ray, so it needs much less per sample.
_VOLUME_RENDERING_OPACITY_SCALE = 0.6


def show_heatmap(
    scene: slicer.vtkMRMLScene,
    heatmap: np.ndarray,
    reference_volume_node: slicer.vtkMRMLScalarVolumeNode,
    output_node: slicer.vtkMRMLScalarVolumeNode | None = None,
    name: str | None = None,
    opacity: float = 0.5,
    lower_threshold: float = 0.2,
    show_3d: bool = True,
    volume_rendering_logic: slicer.vtkSlicerVolumeRenderingLogic | None = None,
    color_legend: bool = False,
) -> slicer.vtkMRMLScalarVolumeNode:
    """Create (or update in place) the heatmap volume node and show it in every view.

    Args:
        scene: the scene (``slicer.mrmlScene`` inside Slicer).
        heatmap: ``(K, J, I)`` float array in [0, 1], in the reference volume's voxel grid.
        reference_volume_node: the explained image; gives the geometry and stays the
            slice views' background. It is not modified.
        output_node: a heatmap node from an earlier run (or an empty node carrying
            :data:`HEATMAP_ATTRIBUTE`) to update in place, keeping its name; None creates one.
        name: the name of a new node; default :func:`heatmap_node_name`. An output node
            given is never renamed.
        opacity: foreground opacity in the slice views (0..1).
        lower_threshold: values below it are transparent (0..1).
        show_3d: also show it with volume rendering in the 3D views.
        volume_rendering_logic: Slicer's volume rendering logic
            (``slicer.modules.volumerendering.logic()``), which picks the user's rendering
            method; None makes the rendering nodes directly (GPU ray casting).
        color_legend: show the colour bar (Slicer's colour legend display node) in the slice views
            that show the heatmap; False hides one shown before.

    Returns:
        The heatmap scalar volume node.

    Raises:
        InputError: the heatmap does not fit the reference volume, an option is out of
            range, or the output node is not a heatmap this module made.
    """
    heatmap = _checked_heatmap(heatmap, reference_volume_node)
    if reference_volume_node.GetScene() is not scene:
        raise InputError(f"the image '{reference_volume_node.GetName()}' is not in the scene given")
    _check_fraction("opacity", opacity)
    _check_fraction("lower_threshold", lower_threshold)
    if output_node is not None:
        check_output_node(scene, output_node, reference_volume_node)

    ids_before = node_ids(scene)
    views_before = _slice_view_layers(scene)
    previous_voxels = _voxels_if_any(output_node)
    try:
        node = output_node
        if node is None:
            node = slicer.vtkMRMLScalarVolumeNode()
            node.SetName(name or heatmap_node_name(reference_volume_node.GetName()))
            # Marked before it enters the scene, so that selectors filtering on it list it at once.
            node.SetAttribute(HEATMAP_ATTRIBUTE, "1")
            scene.AddNode(node)
        update_node_from_volume(node, Volume(heatmap, ijk_to_ras_of_node(reference_volume_node)))
        # Under the same transform as the image, so it overlays wherever the image is moved.
        node.SetAndObserveTransformNodeID(reference_volume_node.GetTransformNodeID())
        node.SetAttribute(HEATMAP_ATTRIBUTE, "1")
        node.SetAttribute(OPACITY_ATTRIBUTE, repr(float(opacity)))
        node.SetNodeReferenceID(REFERENCE_ROLE, reference_volume_node.GetID())
        _style_display_node(scene, node, lower_threshold)
        _show_in_slice_views(scene, node, reference_volume_node, opacity)
        if show_3d:
            _enable_volume_rendering(scene, node, volume_rendering_logic)
        else:
            _hide_volume_rendering(node)
        set_color_legend(scene, node, color_legend)
        if output_node is None:
            _place_next_to(scene, node, reference_volume_node)
    except BaseException:
        _restore_slice_view_layers(views_before)
        if previous_voxels is not None:
            update_node_from_volume(output_node, previous_voxels)
        remove_nodes_added_since(scene, ids_before)
        raise
    return node


def heatmap_node_name(reference_name: str, method: str | None = None, layers: Sequence[str] = ()) -> str:
    """The one default name of a new heatmap node: "<image> <method label> <layers> heatmap"
    ("Ball Seg-Grad CAM decoder.0 heatmap"; several layers joined by "+"), so the heatmaps of
    several methods and layers can be told apart in the views; "<image> heatmap" without a method."""
    if method is None:
        return f"{reference_name} heatmap"
    layer_text = f" {'+'.join(layers)}" if layers else ""
    return f"{reference_name} {method_choice(method).label}{layer_text} heatmap"


def set_color_legend(scene: slicer.vtkMRMLScene, node: slicer.vtkMRMLScalarVolumeNode, show: bool) -> None:
    """Show or hide the heatmap's colour bar.

    Slicer's colour legend display node (``vtkSlicerColorLogic.AddDefaultColorLegendDisplayNode``,
    titled with the node's name) is drawn by the colour legend displayable manager in each slice
    view whose layers show the heatmap, so with one heatmap per view each view shows its own bar.
    Hiding keeps the legend node (hidden), so showing it again restores the user's changes to it.
    """
    _check_heatmap_node(node)
    legend = slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(node)
    if legend is None and not show:
        return
    if legend is None:
        if node.GetDisplayNode() is None:
            raise InputError(f"the heatmap '{node.GetName()}' has no display settings; run the explanation again")
        if not scene.IsNodeClassRegistered("vtkMRMLColorLegendDisplayNode"):
            # Slicer's Colors module registers it at start; a bare MRML scene (slicer-core) has not.
            scene.RegisterNodeClass(slicer.vtkMRMLColorLegendDisplayNode())
        legend = slicer.vtkSlicerColorLogic.AddDefaultColorLegendDisplayNode(node.GetDisplayNode())
        if legend is None:
            raise DisplayError(f"Slicer could not create a colour bar for '{node.GetName()}'")
    legend.SetVisibility(bool(show))


def set_heatmap_opacity(scene: slicer.vtkMRMLScene, node: slicer.vtkMRMLScalarVolumeNode, opacity: float) -> None:
    """Change the heatmap's opacity in the slice views showing it (and its 3D rendering)."""
    _check_fraction("opacity", opacity)
    _check_heatmap_node(node)
    node.SetAttribute(OPACITY_ATTRIBUTE, repr(float(opacity)))
    for composite in _slice_composite_nodes(scene):
        if composite.GetForegroundVolumeID() == node.GetID():
            composite.SetForegroundOpacity(float(opacity))
    _update_volume_rendering_functions(node)


def set_lower_threshold(
    scene: slicer.vtkMRMLScene, node: slicer.vtkMRMLScalarVolumeNode, lower_threshold: float
) -> None:
    """Change the value below which the heatmap is transparent (slice views and 3D)."""
    _check_fraction("lower_threshold", lower_threshold)
    _check_heatmap_node(node)
    display = node.GetDisplayNode()
    if display is None:
        raise InputError(f"the heatmap '{node.GetName()}' has no display settings; run the explanation again")
    display.SetLowerThreshold(float(lower_threshold))
    _update_volume_rendering_functions(node)


def set_show_in_3d(
    scene: slicer.vtkMRMLScene,
    node: slicer.vtkMRMLScalarVolumeNode,
    show: bool,
    volume_rendering_logic: slicer.vtkSlicerVolumeRenderingLogic | None = None,
) -> None:
    """Show or hide the heatmap's volume rendering in the 3D views."""
    _check_heatmap_node(node)
    if show:
        _enable_volume_rendering(scene, node, volume_rendering_logic)
    else:
        _hide_volume_rendering(node)


def heat_color_node(scene: slicer.vtkMRMLScene) -> slicer.vtkMRMLColorNode:
    """Slicer's Inferno table when the scene has it; else this module's heat table (made once, then reused)."""
    inferno = scene.GetNodeByID(INFERNO_COLOR_NODE_ID)
    if inferno is not None:
        return inferno
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode")):
        table = scene.GetNthNodeByClass(index, "vtkMRMLColorTableNode")
        if table.GetAttribute(HEAT_TABLE_ATTRIBUTE) == "1" and table.GetNumberOfColors() == _TABLE_SIZE:
            return table
    table = slicer.vtkMRMLColorTableNode()
    table.SetName(HEAT_TABLE_NAME)
    table.SetTypeToUser()
    table.SetNumberOfColors(_TABLE_SIZE)
    for index, (red, green, blue) in enumerate(heat_palette(_TABLE_SIZE)):
        table.SetColor(index, f"heat {index}", red, green, blue, 1.0)
    table.SetAttribute(HEAT_TABLE_ATTRIBUTE, "1")
    table.SetHideFromEditors(False)
    scene.AddNode(table)
    return table


def heat_palette(size: int = _TABLE_SIZE) -> np.ndarray:
    """The fallback heat palette as ``(size, 3)`` RGB values in [0, 1], dark red to pale yellow."""
    values = np.linspace(0.0, 1.0, size)
    channels = [np.interp(values, _HEAT_ANCHORS[:, 0], _HEAT_ANCHORS[:, channel]) for channel in (1, 2, 3)]
    return np.stack(channels, axis=1)


def _checked_heatmap(heatmap, reference_volume_node) -> np.ndarray:
    if reference_volume_node is None or not reference_volume_node.IsA("vtkMRMLScalarVolumeNode"):
        raise InputError("a reference image volume is needed to place the heatmap; select the explained image")
    reference_shape = array_from_node(reference_volume_node).shape
    heatmap = np.asarray(heatmap)
    if heatmap.shape != reference_shape:
        raise InputError(
            f"the heatmap has shape {heatmap.shape} (K, J, I) but the image '{reference_volume_node.GetName()}' "
            f"has {reference_shape}; compute the heatmap on this image"
        )
    if not np.issubdtype(heatmap.dtype, np.number) or np.iscomplexobj(heatmap):
        raise InputError(f"the heatmap must hold real numbers, got dtype {heatmap.dtype}")
    heatmap = heatmap.astype(np.float32)
    if not np.isfinite(heatmap).all():
        raise InputError("the heatmap contains NaN or infinite values; the explanation failed, run it again")
    return heatmap


def _check_fraction(label: str, value: float) -> None:
    if not (0.0 <= float(value) <= 1.0):
        raise InputError(f"{label} must be between 0 and 1, got {value}")


def is_heatmap_node(node) -> bool:
    """True for a volume node this module made as a heatmap (or an empty one made to receive it)."""
    return node is not None and node.GetAttribute(HEATMAP_ATTRIBUTE) == "1"


def check_output_node(scene, output_node, reference_volume_node) -> None:
    """Refuse an output node that running would wrongly overwrite (call before any long work).

    Raises:
        InputError: not a scalar volume of ``scene``, the input image itself, or a volume
            this module did not make (an image of the user's, which would be overwritten).
    """
    if not output_node.IsA("vtkMRMLScalarVolumeNode") or output_node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputError(
            f"the output '{output_node.GetName()}' is not a scalar volume; choose a heatmap volume or create a new one"
        )
    if output_node.GetScene() is not scene:
        raise InputError(
            f"the output '{output_node.GetName()}' is not in this scene; choose a heatmap volume from this scene"
        )
    if output_node.GetID() == reference_volume_node.GetID():
        raise InputError(
            "the output heatmap cannot be the input image itself; choose another output volume or create a new one"
        )
    if not is_heatmap_node(output_node):
        raise InputError(
            f"the output '{output_node.GetName()}' is not a heatmap made by SegHiResCAM and would be overwritten; "
            "choose one of its heatmaps or create a new one"
        )


def _check_heatmap_node(node) -> None:
    if node is None or not node.IsA("vtkMRMLScalarVolumeNode"):
        raise InputError("a heatmap volume is needed; run an explanation first")


def _style_display_node(scene, node, lower_threshold: float) -> None:
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    was_modifying = display.StartModify()
    try:
        display.SetAndObserveColorNodeID(heat_color_node(scene).GetID())
        display.SetAutoWindowLevel(0)
        display.SetWindowLevelMinMax(0.0, 1.0)
        display.SetAutoThreshold(0)
        display.SetApplyThreshold(1)
        # Above any heat value, so only the lower threshold ever hides voxels.
        display.SetUpperThreshold(1e30)
        display.SetLowerThreshold(float(lower_threshold))
        display.SetInterpolate(1)
    finally:
        display.EndModify(was_modifying)


def _slice_composite_nodes(scene) -> list:
    return [
        scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
        for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))
    ]


def _voxels_if_any(node) -> Volume | None:
    if node is None or node.GetImageData() is None or node.GetImageData().GetPointData().GetScalars() is None:
        return None
    return volume_from_node(node)


def _slice_view_layers(scene) -> list[tuple]:
    return [
        (
            composite,
            composite.GetBackgroundVolumeID(),
            composite.GetForegroundVolumeID(),
            composite.GetForegroundOpacity(),
        )
        for composite in _slice_composite_nodes(scene)
    ]


def _restore_slice_view_layers(layers: list[tuple]) -> None:
    for composite, background_id, foreground_id, opacity in layers:
        composite.SetBackgroundVolumeID(background_id)
        composite.SetForegroundVolumeID(foreground_id)
        composite.SetForegroundOpacity(opacity)


def _show_in_slice_views(scene, node, reference_volume_node, opacity: float) -> None:
    for composite in _slice_composite_nodes(scene):
        was_modifying = composite.StartModify()
        try:
            composite.SetBackgroundVolumeID(reference_volume_node.GetID())
            composite.SetForegroundVolumeID(node.GetID())
            composite.SetForegroundOpacity(float(opacity))
        finally:
            composite.EndModify(was_modifying)


def _volume_rendering_display_nodes(node) -> list:
    nodes = []
    for index in range(node.GetNumberOfDisplayNodes()):
        display = node.GetNthDisplayNode(index)
        if display is not None and display.IsA("vtkMRMLVolumeRenderingDisplayNode"):
            nodes.append(display)
    return nodes


def _enable_volume_rendering(scene, node, logic=None) -> None:
    rendering_nodes = _volume_rendering_display_nodes(node)
    if not rendering_nodes:
        if logic is not None:
            created = logic.CreateDefaultVolumeRenderingNodes(node)
        else:
            created = _create_volume_rendering_nodes(scene, node)
        if created is None or created.GetVolumePropertyNode() is None:
            raise DisplayError(f"Slicer could not create volume rendering for '{node.GetName()}'")
        rendering_nodes = [created]
    for rendering in rendering_nodes:
        # Our transfer functions, not a copy of the slice display's step threshold.
        rendering.SetFollowVolumeDisplayNode(0)
        rendering.SetVisibility(1)
    _update_volume_rendering_functions(node)


def _create_volume_rendering_nodes(scene, node):
    """What the volume rendering logic's CreateDefaultVolumeRenderingNodes makes, without a logic.

    A temporary vtkSlicerVolumeRenderingLogic would re-register its node classes in the
    scene (with a warning each time), so the two nodes are made here directly.
    """
    property_node = slicer.vtkMRMLVolumePropertyNode()
    property_node.SetName(scene.GenerateUniqueName(f"{node.GetName()} volume property"))
    scene.AddNode(property_node)
    rendering = slicer.vtkMRMLGPURayCastVolumeRenderingDisplayNode()
    rendering.SetName(scene.GenerateUniqueName("VolumeRendering"))
    scene.AddNode(rendering)
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLViewNode")):
        rendering.AddViewNodeID(scene.GetNthNodeByClass(index, "vtkMRMLViewNode").GetID())
    rendering.SetAndObserveVolumePropertyNodeID(property_node.GetID())
    node.AddAndObserveDisplayNodeID(rendering.GetID())
    return rendering


def _hide_volume_rendering(node) -> None:
    for rendering in _volume_rendering_display_nodes(node):
        rendering.SetVisibility(0)


def _update_volume_rendering_functions(node) -> None:
    """Colour from the heat table; opacity 0 below the threshold, rising to a peak at 1."""
    display = node.GetDisplayNode()
    if display is None:
        return
    threshold = float(display.GetLowerThreshold())
    peak = _VOLUME_RENDERING_OPACITY_SCALE * float(node.GetAttribute(OPACITY_ATTRIBUTE) or 0.5)
    lookup = display.GetColorNode().GetLookupTable() if display.GetColorNode() is not None else None
    for rendering in _volume_rendering_display_nodes(node):
        property_node = rendering.GetVolumePropertyNode()
        if property_node is None:
            continue
        volume_property = property_node.GetVolumeProperty()
        was_modifying = property_node.StartModify()
        try:
            scalar_opacity = volume_property.GetScalarOpacity()
            scalar_opacity.RemoveAllPoints()
            scalar_opacity.AddPoint(0.0, 0.0)
            if 0.0 < threshold < 1.0:
                scalar_opacity.AddPoint(threshold, 0.0)
            scalar_opacity.AddPoint(1.0, peak)
            colors = volume_property.GetRGBTransferFunction()
            colors.RemoveAllPoints()
            samples = np.linspace(0.0, 1.0, 32)
            palette = _lookup_colors(lookup, samples) if lookup is not None else heat_palette(32)
            for value, (red, green, blue) in zip(samples, palette):
                colors.AddRGBPoint(float(value), float(red), float(green), float(blue))
            volume_property.SetShade(0)
            volume_property.DisableGradientOpacityOn()
        finally:
            property_node.EndModify(was_modifying)
        property_node.Modified()


def _lookup_colors(lookup, samples: np.ndarray) -> np.ndarray:
    # The table's colours spread evenly over the window 0..1, as in the slice views.
    count = lookup.GetNumberOfTableValues()
    indices = np.clip(np.round(samples * (count - 1)).astype(int), 0, count - 1)
    return np.array([lookup.GetTableValue(int(index))[:3] for index in indices])


def _place_next_to(scene, node, reference_volume_node) -> None:
    """Put the new heatmap in the reference's study/folder of the subject hierarchy, when there is one."""
    if scene.GetFirstNodeByClass("vtkMRMLSubjectHierarchyNode") is None:
        return
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    reference_item = hierarchy.GetItemByDataNode(reference_volume_node)
    if not reference_item:
        return
    parent_item = hierarchy.GetItemParent(reference_item)
    heatmap_item = hierarchy.GetItemByDataNode(node)
    if heatmap_item:
        hierarchy.SetItemParent(heatmap_item, parent_item)
    else:
        # Without Slicer's subject hierarchy logic (slicer-core) no item was made for the node.
        hierarchy.CreateItem(parent_item, node)
