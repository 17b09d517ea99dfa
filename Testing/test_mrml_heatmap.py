"""Heatmap display: node, colours, threshold, slice layers, 3D rendering, update in place, inputs untouched."""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

from mrml_helpers import add_segment, add_segmentation, add_volume, box_mask, oblique_ijk_to_ras  # noqa: E402

from SegHiResCAMLib.errors import InputError  # noqa: E402
from SegHiResCAMLib.mrml import heatmap_display  # noqa: E402
from SegHiResCAMLib.mrml.heatmap_display import (  # noqa: E402
    HEAT_TABLE_ATTRIBUTE,
    INFERNO_COLOR_NODE_ID,
    heat_palette,
    set_heatmap_opacity,
    set_lower_threshold,
    set_show_in_3d,
    show_heatmap,
)
from SegHiResCAMLib.mrml.scene import new_scene, node_ids  # noqa: E402
from SegHiResCAMLib.mrml.volumes import numpy_to_matrix, volume_from_node  # noqa: E402
from tolerances import geometry_atol  # noqa: E402

SHAPE = (6, 8, 10)


@pytest.fixture
def scene():
    return new_scene()


@pytest.fixture
def reference(scene):
    image = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    return add_volume(scene, image, oblique_ijk_to_ras(), name="CT")


@pytest.fixture
def heat():
    values = np.zeros(SHAPE, np.float32)
    values[1:4, 2:6, 3:8] = np.linspace(0.1, 1.0, 3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
    return values


def _composites(scene):
    return [
        scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))
    ]


def _rendering_nodes(node):
    return [
        node.GetNthDisplayNode(i)
        for i in range(node.GetNumberOfDisplayNodes())
        if node.GetNthDisplayNode(i).IsA("vtkMRMLVolumeRenderingDisplayNode")
    ]


def _opacity_at(rendering_node, value):
    return rendering_node.GetVolumePropertyNode().GetVolumeProperty().GetScalarOpacity().GetValue(value)


def test_heatmap_node_has_the_reference_geometry_and_values(scene, reference, heat):
    node = show_heatmap(scene, heat, reference)
    result = volume_from_node(node)
    np.testing.assert_array_equal(result.array, heat)
    assert result.array.dtype == np.float32
    np.testing.assert_allclose(result.ijk_to_ras, oblique_ijk_to_ras(), rtol=0,
                               atol=geometry_atol(oblique_ijk_to_ras()))
    assert node.GetName() == "CT heatmap"
    assert node.GetNodeReference(heatmap_display.REFERENCE_ROLE) is reference


def test_display_uses_window_0_to_1_and_hides_values_below_threshold(scene, reference, heat):
    node = show_heatmap(scene, heat, reference, lower_threshold=0.3)
    display = node.GetDisplayNode()
    assert not display.GetAutoWindowLevel()
    # exact, here and for the opacities and thresholds below: VTK keeps what was set as doubles (the window
    # 1 and level 0.5 give back 0.5 - 0.5 and 0.5 + 0.5)
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == (0.0, 1.0)
    assert display.GetApplyThreshold() and not display.GetAutoThreshold()
    assert display.GetLowerThreshold() == 0.3
    assert display.GetUpperThreshold() >= 1.0


def test_without_inferno_a_heat_table_is_made_once_and_reused(scene, reference, heat):
    first = show_heatmap(scene, heat, reference)
    second = show_heatmap(scene, heat, reference)
    assert first.GetID() != second.GetID()
    table = first.GetDisplayNode().GetColorNode()
    assert table.GetAttribute(HEAT_TABLE_ATTRIBUTE) == "1"
    assert second.GetDisplayNode().GetColorNodeID() == table.GetID()
    tables = [
        scene.GetNthNodeByClass(i, "vtkMRMLColorTableNode")
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode"))
    ]
    assert sum(t.GetAttribute(HEAT_TABLE_ATTRIBUTE) == "1" for t in tables) == 1
    lookup = table.GetLookupTable()
    # the table stores 8-bit colours: each channel within half a step of 1/255 (a whole step allowed)
    np.testing.assert_allclose(lookup.GetTableValue(0)[:3], heat_palette()[0], atol=1 / 255)
    np.testing.assert_allclose(lookup.GetTableValue(255)[:3], heat_palette()[-1], atol=1 / 255)


def test_heat_palette_is_never_grey_and_brightens(scene):
    palette = heat_palette(256)
    assert (palette[:, 0] - palette[:, 2] > 0.1).all()  # red always well above blue
    assert (np.diff(palette.sum(axis=1)) > 0).all()


def test_inferno_is_used_when_the_scene_has_it(scene, reference, heat):
    inferno = slicer.vtkMRMLColorTableNode()
    inferno.SetName("Inferno")
    inferno.SetSingletonTag("FileInferno.txt")  # gives Slicer's ID for its Inferno file table
    scene.AddNode(inferno)
    assert inferno.GetID() == INFERNO_COLOR_NODE_ID
    node = show_heatmap(scene, heat, reference)
    assert node.GetDisplayNode().GetColorNodeID() == INFERNO_COLOR_NODE_ID


def test_every_slice_view_shows_heatmap_over_the_reference(scene, reference, heat):
    node = show_heatmap(scene, heat, reference, opacity=0.35)
    composites = _composites(scene)
    assert len(composites) == 3
    for composite in composites:
        assert composite.GetForegroundVolumeID() == node.GetID()
        assert composite.GetBackgroundVolumeID() == reference.GetID()
        assert composite.GetForegroundOpacity() == 0.35


def test_volume_rendering_is_transparent_below_threshold(scene, reference, heat):
    node = show_heatmap(scene, heat, reference, lower_threshold=0.25, opacity=0.5)
    (rendering,) = _rendering_nodes(node)
    assert rendering.GetVisibility()
    assert not rendering.GetFollowVolumeDisplayNode()
    view = scene.GetFirstNodeByClass("vtkMRMLViewNode")
    assert rendering.IsDisplayableInView(view.GetID())
    assert _opacity_at(rendering, 0.0) == 0.0
    assert _opacity_at(rendering, 0.2) == 0.0
    assert 0.0 < _opacity_at(rendering, 0.6) < _opacity_at(rendering, 1.0) <= 0.5
    red, green, blue = rendering.GetVolumePropertyNode().GetVolumeProperty().GetRGBTransferFunction().GetColor(1.0)
    assert red > blue


def test_show_3d_false_makes_no_volume_rendering_and_can_be_toggled(scene, reference, heat):
    node = show_heatmap(scene, heat, reference, show_3d=False)
    assert _rendering_nodes(node) == []
    set_show_in_3d(scene, node, True)
    (rendering,) = _rendering_nodes(node)
    assert rendering.GetVisibility()
    set_show_in_3d(scene, node, False)
    assert _rendering_nodes(node) == [rendering]
    assert not rendering.GetVisibility()
    set_show_in_3d(scene, node, True)
    assert _rendering_nodes(node) == [rendering] and rendering.GetVisibility()


def test_live_sliders_change_opacity_and_threshold(scene, reference, heat):
    node = show_heatmap(scene, heat, reference, opacity=0.5, lower_threshold=0.2)
    (rendering,) = _rendering_nodes(node)
    peak_before = _opacity_at(rendering, 1.0)
    set_heatmap_opacity(scene, node, 0.9)
    assert all(c.GetForegroundOpacity() == 0.9 for c in _composites(scene))
    assert _opacity_at(rendering, 1.0) > peak_before
    set_lower_threshold(scene, node, 0.7)
    assert node.GetDisplayNode().GetLowerThreshold() == 0.7
    assert _opacity_at(rendering, 0.65) == 0.0
    assert _opacity_at(rendering, 0.9) > 0.0


def test_slider_values_out_of_range_raise_input_error(scene, reference, heat):
    node = show_heatmap(scene, heat, reference)
    with pytest.raises(InputError, match="opacity"):
        set_heatmap_opacity(scene, node, 1.5)
    with pytest.raises(InputError, match="lower_threshold"):
        set_lower_threshold(scene, node, -0.1)


def test_running_again_with_the_output_node_updates_it_in_place(scene, reference, heat):
    node = show_heatmap(scene, heat, reference)
    display_id = node.GetDisplayNodeID()
    (rendering,) = _rendering_nodes(node)
    ids = node_ids(scene)
    again = show_heatmap(scene, heat[::-1].copy(), reference, output_node=node, opacity=0.8)
    assert again is node
    assert node_ids(scene) == ids
    np.testing.assert_array_equal(volume_from_node(node).array, heat[::-1])
    assert node.GetDisplayNodeID() == display_id
    assert _rendering_nodes(node) == [rendering]
    assert all(c.GetForegroundOpacity() == 0.8 for c in _composites(scene))


def test_inputs_are_never_modified(scene, reference, heat):
    segmentation = add_segmentation(scene)
    add_segment(segmentation, box_mask(SHAPE, (1, 1, 1), (3, 3, 3)), oblique_ijk_to_ras(), "tumor", "Tumor")
    before_volume = volume_from_node(reference)
    display = reference.GetDisplayNode()
    before = (
        reference.GetMTime(),
        reference.GetImageData().GetMTime(),
        display.GetMTime(),
        display.GetColorNodeID(),
        reference.GetNumberOfDisplayNodes(),
        segmentation.GetSegmentation().GetMTime(),
        segmentation.GetMTime(),
    )
    node = show_heatmap(scene, heat, reference)
    set_heatmap_opacity(scene, node, 0.2)
    set_lower_threshold(scene, node, 0.5)
    show_heatmap(scene, heat * 0.5, reference, output_node=node)
    after_volume = volume_from_node(reference)
    np.testing.assert_array_equal(after_volume.array, before_volume.array)
    np.testing.assert_array_equal(after_volume.ijk_to_ras, before_volume.ijk_to_ras)
    after = (
        reference.GetMTime(),
        reference.GetImageData().GetMTime(),
        display.GetMTime(),
        display.GetColorNodeID(),
        reference.GetNumberOfDisplayNodes(),
        segmentation.GetSegmentation().GetMTime(),
        segmentation.GetMTime(),
    )
    assert after == before


def test_heatmap_follows_the_reference_parent_transform(scene, reference, heat):
    transform = slicer.vtkMRMLLinearTransformNode()
    scene.AddNode(transform)
    moved = np.eye(4)
    moved[:3, 3] = [1.0, 2.0, 3.0]
    transform.SetMatrixTransformToParent(numpy_to_matrix(moved))
    reference.SetAndObserveTransformNodeID(transform.GetID())
    node = show_heatmap(scene, heat, reference)
    assert node.GetTransformNodeID() == transform.GetID()


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((6, 8, 9), np.float32), r"shape \(6, 8, 9\)"),
        (np.full(SHAPE, np.nan, np.float32), "NaN"),
        (np.zeros(SHAPE, complex), "real numbers"),
    ],
)
def test_bad_heatmap_raises_input_error_and_adds_nothing(scene, reference, bad, message):
    ids = node_ids(scene)
    with pytest.raises(InputError, match=message):
        show_heatmap(scene, bad, reference)
    assert node_ids(scene) == ids


def test_output_node_cannot_be_the_input_image(scene, reference, heat):
    with pytest.raises(InputError, match="cannot be the input image"):
        show_heatmap(scene, heat, reference, output_node=reference)
    np.testing.assert_array_equal(volume_from_node(reference).array.shape, SHAPE)


def test_failure_half_way_leaves_no_new_nodes_and_views_as_they_were(scene, reference, heat, monkeypatch):
    other = add_volume(scene, np.zeros(SHAPE, np.float32), oblique_ijk_to_ras(), name="other")
    for composite in _composites(scene):
        composite.SetBackgroundVolumeID(other.GetID())
        composite.SetForegroundOpacity(0.1)
    ids = node_ids(scene)

    def broken_volume_rendering(*args, **kwargs):
        raise RuntimeError("volume rendering broke")

    # Fault injection at the last step, after the node, its display and the views were set.
    monkeypatch.setattr(heatmap_display, "_enable_volume_rendering", broken_volume_rendering)
    with pytest.raises(RuntimeError, match="volume rendering broke"):
        show_heatmap(scene, heat, reference)
    assert node_ids(scene) == ids
    for composite in _composites(scene):
        assert composite.GetBackgroundVolumeID() == other.GetID()
        assert composite.GetForegroundVolumeID() is None
        assert composite.GetForegroundOpacity() == 0.1


def test_failed_update_in_place_restores_the_previous_voxels(scene, reference, heat, monkeypatch):
    node = show_heatmap(scene, heat, reference, show_3d=False)
    ids = node_ids(scene)

    def broken_volume_rendering(*args, **kwargs):
        raise RuntimeError("volume rendering broke")

    monkeypatch.setattr(heatmap_display, "_enable_volume_rendering", broken_volume_rendering)
    with pytest.raises(RuntimeError):
        show_heatmap(scene, np.ones(SHAPE, np.float32), reference, output_node=node)
    assert node_ids(scene) == ids
    assert node.GetScene() is scene
    np.testing.assert_array_equal(volume_from_node(node).array, heat)


def test_a_given_volume_rendering_logic_makes_the_rendering_nodes(scene, reference, heat):
    logic = slicer.vtkSlicerVolumeRenderingLogic()
    logic.SetMRMLScene(scene)
    logic.SetDefaultRenderingMethod("vtkMRMLCPURayCastVolumeRenderingDisplayNode")
    node = show_heatmap(scene, heat, reference, lower_threshold=0.4, volume_rendering_logic=logic)
    (rendering,) = _rendering_nodes(node)
    assert rendering.IsA("vtkMRMLCPURayCastVolumeRenderingDisplayNode")
    assert logic.GetFirstVolumeRenderingDisplayNode(node) is rendering
    assert _opacity_at(rendering, 0.35) == 0.0
    assert _opacity_at(rendering, 1.0) > 0.0
    logic.SetMRMLScene(None)


def test_new_heatmap_goes_next_to_the_image_in_the_subject_hierarchy(scene, reference, heat):
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = hierarchy.CreateFolderItem(hierarchy.GetSceneItemID(), "Study")
    if not hierarchy.GetItemByDataNode(reference):
        hierarchy.CreateItem(study, reference)
    hierarchy.SetItemParent(hierarchy.GetItemByDataNode(reference), study)
    node = show_heatmap(scene, heat, reference)
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) == study


def test_reference_from_another_scene_raises_input_error(scene, heat):
    other_scene = new_scene()
    elsewhere = add_volume(other_scene, np.zeros(SHAPE, np.float32), np.eye(4), name="elsewhere")
    ids = node_ids(scene)
    with pytest.raises(InputError, match="'elsewhere' is not in the scene"):
        show_heatmap(scene, heat, elsewhere)
    assert node_ids(scene) == ids
