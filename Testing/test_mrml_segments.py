"""Segment -> boolean mask in a volume's grid, against real slicer-core segmentation nodes."""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

from mrml_helpers import add_segment, add_segmentation, add_volume, box_mask, oblique_ijk_to_ras  # noqa: E402

from SegHiResCAMLib.errors import InputError  # noqa: E402
from SegHiResCAMLib.mrml.scene import new_scene  # noqa: E402
from SegHiResCAMLib.mrml.segments import find_segment_id, segment_mask, segment_names  # noqa: E402
from SegHiResCAMLib.mrml.volumes import numpy_to_matrix, update_node_from_volume  # noqa: E402
from SegHiResCAMLib.volume import Volume  # noqa: E402

SHAPE = (6, 8, 10)  # K, J, I


@pytest.fixture
def scene():
    return new_scene()


@pytest.fixture
def reference(scene):
    return add_volume(scene, np.zeros(SHAPE, np.float32), oblique_ijk_to_ras(), name="CT")


def _labelmap_array(segmentation_node, segment_id):
    """The segment's stored labelmap voxels (to prove they do not change)."""
    from vtk.util import numpy_support

    labelmap = segmentation_node.GetSegmentation().GetSegment(segment_id).GetRepresentation("Binary labelmap")
    return numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars()).copy(), labelmap.GetExtent()


def test_mask_in_the_same_oblique_grid_is_exact(scene, reference):
    expected = box_mask(SHAPE, (1, 2, 3), (4, 6, 8))
    expected[2, 3, 1] = True
    segmentation = add_segmentation(scene)
    add_segment(segmentation, expected, oblique_ijk_to_ras(), "tumor", "Tumor")
    mask = segment_mask(segmentation, "tumor", reference)
    assert mask.dtype == bool
    np.testing.assert_array_equal(mask, expected)


def test_segment_on_a_finer_grid_is_resampled_to_the_volume(scene, reference):
    fine_matrix = oblique_ijk_to_ras()
    fine_matrix[:3, :3] /= 2.0  # same origin, half the spacing: volume voxel v == fine voxel 2v
    fine = box_mask((12, 16, 20), (3, 4, 5), (9, 13, 16))
    segmentation = add_segmentation(scene)
    add_segment(segmentation, fine, fine_matrix, "tumor", "Tumor")
    mask = segment_mask(segmentation, "tumor", reference)
    np.testing.assert_array_equal(mask, fine[::2, ::2, ::2])
    assert mask.any() and not mask.all()


def test_segment_on_a_permuted_and_flipped_grid_is_resampled_exactly(scene, reference):
    # Segmentation voxel (i', j', k') sits at volume voxel (k', J-1-j', i').
    k_size, j_size, i_size = SHAPE
    permutation = np.array([[0, 0, 1, 0], [0, -1, 0, j_size - 1], [1, 0, 0, 0], [0, 0, 0, 1]], float)
    expected = box_mask(SHAPE, (0, 1, 2), (3, 5, 9))
    expected[5, 7, 9] = True
    stored = expected[:, ::-1, :].transpose(2, 1, 0)
    segmentation = add_segmentation(scene)
    add_segment(segmentation, stored, oblique_ijk_to_ras() @ permutation, "organ", "Organ")
    np.testing.assert_array_equal(segment_mask(segmentation, "organ", reference), expected)


def test_parent_transform_of_the_segmentation_is_applied(scene, reference):
    drawn = box_mask(SHAPE, (1, 2, 3), (4, 5, 6))
    segmentation = add_segmentation(scene)
    add_segment(segmentation, drawn, oblique_ijk_to_ras(), "tumor", "Tumor")
    # Move the segmentation by exactly one voxel step along the volume's I axis.
    transform = slicer.vtkMRMLLinearTransformNode()
    scene.AddNode(transform)
    shift = np.eye(4)
    shift[:3, 3] = oblique_ijk_to_ras()[:3, 0]
    transform.SetMatrixTransformToParent(numpy_to_matrix(shift))
    segmentation.SetAndObserveTransformNodeID(transform.GetID())
    np.testing.assert_array_equal(segment_mask(segmentation, "tumor", reference), np.roll(drawn, 1, axis=2))


def test_same_parent_transform_on_both_changes_nothing(scene, reference):
    drawn = box_mask(SHAPE, (1, 2, 3), (4, 5, 6))
    segmentation = add_segmentation(scene)
    add_segment(segmentation, drawn, oblique_ijk_to_ras(), "tumor", "Tumor")
    transform = slicer.vtkMRMLLinearTransformNode()
    scene.AddNode(transform)
    moved = np.eye(4)
    moved[:3, 3] = [5.0, -7.0, 11.0]
    transform.SetMatrixTransformToParent(numpy_to_matrix(moved))
    segmentation.SetAndObserveTransformNodeID(transform.GetID())
    reference.SetAndObserveTransformNodeID(transform.GetID())
    np.testing.assert_array_equal(segment_mask(segmentation, "tumor", reference), drawn)


def test_segments_sharing_one_labelmap_give_separate_masks(scene, reference):
    labels = np.zeros(SHAPE, np.uint8)
    labels[1:3, 1:4, 1:5] = 1
    labels[4:6, 5:8, 6:9] = 2
    labelmap_node = slicer.vtkMRMLLabelMapVolumeNode()
    scene.AddNode(labelmap_node)
    update_node_from_volume(labelmap_node, Volume(labels, oblique_ijk_to_ras()))
    segmentation = add_segmentation(scene)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap_node, segmentation)
    ids = list(segment_names(segmentation))
    assert len(ids) == 2
    layer = segmentation.GetSegmentation().GetSegment(ids[0]).GetRepresentation("Binary labelmap")
    assert layer is segmentation.GetSegmentation().GetSegment(ids[1]).GetRepresentation("Binary labelmap")
    by_label = {segmentation.GetSegmentation().GetSegment(i).GetLabelValue(): i for i in ids}
    np.testing.assert_array_equal(segment_mask(segmentation, by_label[1], reference), labels == 1)
    np.testing.assert_array_equal(segment_mask(segmentation, by_label[2], reference), labels == 2)


def test_segment_can_be_named_instead_of_identified(scene, reference):
    drawn = box_mask(SHAPE, (1, 1, 1), (3, 3, 3))
    segmentation = add_segmentation(scene)
    add_segment(segmentation, drawn, oblique_ijk_to_ras(), "Segment_1", "Liver")
    assert find_segment_id(segmentation, "Liver") == "Segment_1"
    np.testing.assert_array_equal(segment_mask(segmentation, "Liver", reference), drawn)


def test_unknown_segment_raises_input_error_listing_the_segments(scene, reference):
    segmentation = add_segmentation(scene)
    add_segment(segmentation, box_mask(SHAPE, (1, 1, 1), (2, 2, 2)), oblique_ijk_to_ras(), "a", "Liver")
    add_segment(segmentation, box_mask(SHAPE, (3, 3, 3), (4, 4, 4)), oblique_ijk_to_ras(), "b", "Spleen")
    with pytest.raises(InputError, match=r"no segment 'Kidney'.*'Liver', 'Spleen'"):
        segment_mask(segmentation, "Kidney", reference)


def test_empty_segment_raises_input_error(scene, reference):
    segmentation = add_segmentation(scene)
    add_segment(segmentation, np.zeros(SHAPE, bool), oblique_ijk_to_ras(), "tumor", "Tumor")
    with pytest.raises(InputError, match="'Tumor' is empty inside the image 'CT'"):
        segment_mask(segmentation, "tumor", reference)


def test_segment_outside_the_image_raises_input_error(scene, reference):
    far_away = oblique_ijk_to_ras()
    far_away[:3, 3] += [500.0, 0.0, 0.0]
    segmentation = add_segmentation(scene)
    add_segment(segmentation, box_mask(SHAPE, (1, 1, 1), (5, 5, 5)), far_away, "tumor", "Tumor")
    with pytest.raises(InputError, match="empty inside the image"):
        segment_mask(segmentation, "tumor", reference)


def test_segment_partly_outside_keeps_only_the_inside_part(scene, reference):
    shifted = oblique_ijk_to_ras()
    shifted[:3, 3] += 3 * oblique_ijk_to_ras()[:3, 0]  # three voxels along +I
    segmentation = add_segmentation(scene)
    add_segment(segmentation, box_mask(SHAPE, (1, 1, 4), (3, 3, 10)), shifted, "tumor", "Tumor")
    expected = box_mask(SHAPE, (1, 1, 7), (3, 3, 10))
    np.testing.assert_array_equal(segment_mask(segmentation, "tumor", reference), expected)


def test_segmentation_is_not_modified(scene, reference):
    fine_matrix = oblique_ijk_to_ras()
    fine_matrix[:3, :3] /= 2.0
    segmentation = add_segmentation(scene)
    add_segment(segmentation, box_mask((12, 16, 20), (2, 2, 2), (8, 8, 8)), fine_matrix, "tumor", "Tumor")
    voxels_before, extent_before = _labelmap_array(segmentation, "tumor")
    mtime_before = segmentation.GetSegmentation().GetMTime()
    segment_mask(segmentation, "tumor", reference)
    voxels_after, extent_after = _labelmap_array(segmentation, "tumor")
    np.testing.assert_array_equal(voxels_after, voxels_before)
    assert extent_after == extent_before
    assert segmentation.GetSegmentation().GetMTime() == mtime_before
    assert not segmentation.GetSegmentation().ContainsRepresentation("Closed surface")


def test_non_segmentation_node_raises_input_error(scene, reference):
    with pytest.raises(InputError, match="segmentation node is needed"):
        segment_mask(reference, "tumor", reference)


def test_segment_stored_only_as_a_surface_is_voxelised_without_changing_the_segmentation(scene):
    import vtk

    matrix = oblique_ijk_to_ras()
    shape = (12, 16, 20)
    reference = add_volume(scene, np.zeros(shape, np.float32), matrix, name="CT")
    centre = (matrix @ np.array([10.0, 8.0, 6.0, 1.0]))[:3]
    radius = 6.0
    sphere = vtk.vtkSphereSource()
    sphere.SetCenter(*centre)
    sphere.SetRadius(radius)
    sphere.SetThetaResolution(64)
    sphere.SetPhiResolution(64)
    sphere.Update()
    segmentation = add_segmentation(scene)
    segmentation.SetSourceRepresentationToClosedSurface()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    segment_id = segmentation.AddSegmentFromClosedSurfaceRepresentation(sphere.GetOutput(), "Ball")

    mask = segment_mask(segmentation, segment_id, reference)

    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    ras = matrix @ np.stack([i, j, k, np.ones_like(i)]).reshape(4, -1)
    distance = np.linalg.norm(ras[:3].T - centre, axis=1).reshape(shape)
    margin = 1.5  # mm: about half a voxel diagonal (spacing 0.7, 1.3, 2.5 mm)
    assert mask[distance < radius - margin].all()
    assert not mask[distance > radius + margin].any()
    assert not segmentation.GetSegmentation().ContainsRepresentation("Binary labelmap")
