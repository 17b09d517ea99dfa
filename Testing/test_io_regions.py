"""Region files: labels pick one region, non-integer files are weight maps, Slicer segments by layer."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import SimpleITK as sitk
from test_io_images import make_image

from SegHiResCAMLib.errors import InputError
from SegHiResCAMLib.io.images import read_mask
from SegHiResCAMLib.volume import Volume, ijk_to_ras_from_itk

SHAPE = (6, 7, 8)  # K, J, I


def volume_from_itk(image: sitk.Image) -> Volume:
    return Volume(sitk.GetArrayFromImage(image), ijk_to_ras_from_itk(image.GetOrigin(), image.GetSpacing(),
                                                                     image.GetDirection()))


def like(image: sitk.Image, array: np.ndarray) -> sitk.Image:
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    return out


@pytest.fixture
def reference():
    return make_image(SHAPE)


def write(tmp_path, name: str, image: sitk.Image):
    path = tmp_path / name
    sitk.WriteImage(image, str(path))
    return path


def soft_region() -> np.ndarray:
    weights = np.zeros(SHAPE, np.float32)
    weights[1:4, 2:5, 3:7] = 0.5
    weights[2, 3, 4] = 0.75
    return weights


def test_half_weight_file_is_a_weight_map_not_label_zero(tmp_path, reference):
    # Before: int(0.5) == 0 made "label 0" the only label, and the region became every voxel that is 0.
    path = write(tmp_path, "half.nrrd", like(reference, soft_region()))
    region = read_mask(path, volume_from_itk(reference))
    assert region.dtype == np.float32
    np.testing.assert_array_equal(region, soft_region())  # the weights themselves, on the same grid
    assert np.count_nonzero(region) == 3 * 3 * 4


def test_probability_map_is_used_as_weights_and_never_listed_as_labels(tmp_path, reference):
    rng = np.random.default_rng(0)
    probabilities = rng.random(SHAPE).astype(np.float32)  # values in [0, 1), nearly all non-integer
    path = write(tmp_path, "prob.nii.gz", like(reference, probabilities))
    np.testing.assert_array_equal(read_mask(path, volume_from_itk(reference)), probabilities)


def test_weight_map_with_a_label_choice_is_refused(tmp_path, reference):
    path = write(tmp_path, "half.nrrd", like(reference, soft_region()))
    with pytest.raises(InputError, match="weight map.*label choice 1 does not apply.*leave --roi-label out"):
        read_mask(path, volume_from_itk(reference), label=1)


@pytest.mark.parametrize("bad, message", [
    (np.nan, "1 NaN or infinite value.*replace them"),
    (np.inf, "1 NaN or infinite value"),
    (1.5, "non-integer values from 0 to 1.5.*rescale it to \\[0, 1\\]"),
    (-0.25, "non-integer values from -0.25 to 0.75"),
])
def test_weights_that_are_not_finite_or_leave_0_1_are_refused(tmp_path, reference, bad, message):
    weights = soft_region()
    weights[0, 0, 0] = bad
    path = write(tmp_path, "bad.nrrd", like(reference, weights))
    with pytest.raises(InputError, match=message):
        read_mask(path, volume_from_itk(reference))


def test_float_file_of_whole_numbers_is_a_label_map(tmp_path, reference):
    labels = np.zeros(SHAPE, np.float32)
    labels[1:3, 1:3, 1:3] = 2.0
    labels[4, 4, 4] = 5.0
    path = write(tmp_path, "labels_float.nii.gz", like(reference, labels))
    mask = read_mask(path, volume_from_itk(reference), label=2)
    assert mask.dtype == np.bool_
    np.testing.assert_array_equal(mask, labels == 2)
    with pytest.raises(InputError, match=r"several labels \(2, 5\)"):
        read_mask(path, volume_from_itk(reference))


def test_label_zero_is_never_picked_implicitly(tmp_path, reference):
    path = write(tmp_path, "empty.nrrd", like(reference, np.zeros(SHAPE, np.uint8)))
    with pytest.raises(InputError, match="empty"):
        read_mask(path, volume_from_itk(reference))
    labels = np.zeros(SHAPE, np.uint8)
    labels[2:4, 2:4, 2:4] = 3
    path = write(tmp_path, "one.nrrd", like(reference, labels))
    np.testing.assert_array_equal(read_mask(path, volume_from_itk(reference)), labels == 3)
    # asked for by name, label 0 (everything unlabelled) is what the user chose
    np.testing.assert_array_equal(read_mask(path, volume_from_itk(reference), label=0), labels == 0)


def test_segment_name_in_a_plain_label_map_says_there_are_no_names(tmp_path, reference):
    labels = np.zeros(SHAPE, np.uint8)
    labels[1, 1, 1] = 4
    path = write(tmp_path, "labels.nrrd", like(reference, labels))
    with pytest.raises(InputError, match="no segment names.*choose a label value: 4"):
        read_mask(path, volume_from_itk(reference), label="tumor")


def test_missing_region_file_is_named_as_the_region(tmp_path, reference):
    # Before: "the image ... does not exist", about a file given as the region.
    with pytest.raises(InputError, match="the region file .*absent.nrrd does not exist"):
        read_mask(tmp_path / "absent.nrrd", volume_from_itk(reference))


def coarse_and_fine() -> tuple[sitk.Image, sitk.Image]:
    coarse = sitk.Image(8, 8, 8, sitk.sitkFloat32)
    coarse.SetSpacing((2.0, 2.0, 2.0))
    coarse.SetOrigin((1.0, -3.0, 5.0))
    fine = sitk.Image(16, 16, 16, sitk.sitkFloat32)
    fine.SetSpacing((1.0, 1.0, 1.0))
    fine.SetOrigin((0.5, -3.5, 4.5))  # fine voxel centres 2i, 2i+1 straddle coarse centre i
    return coarse, fine


def test_weight_map_on_another_grid_is_resampled_linearly_with_a_warning(tmp_path):
    from SegHiResCAMLib.errors import SegHiResCAMWarning

    coarse, fine = coarse_and_fine()
    weights = np.zeros((16, 16, 16), np.float32)
    weights[4:10, 2:8, 6:14] = 0.5
    weights[5, 5, 9] = 0.25
    path = write(tmp_path, "soft.nrrd", like(fine, weights))
    with pytest.warns(SegHiResCAMWarning, match="resampled onto the image's grid \\(linearly\\)"):
        region = read_mask(path, volume_from_itk(coarse))
    # oracle: SimpleITK's own linear resampling of the weights onto the coarse grid
    expected = sitk.GetArrayFromImage(
        sitk.Resample(like(fine, weights), coarse, sitk.Transform(), sitk.sitkLinear, 0, sitk.sitkFloat32))
    np.testing.assert_array_equal(region, expected)
    assert region.dtype == np.float32 and 0.0 < region.max() <= 0.5
    assert np.unique(region).size > 2  # weights between the stored ones: interpolated, not nearest


def test_label_map_on_a_cropped_aligned_grid_is_placed_exactly_without_a_warning(tmp_path, reference):
    # Slicer saves a segmentation cropped to its extent: same spacing and direction, whole-voxel offset.
    labels = np.zeros(SHAPE, np.uint8)
    labels[2:5, 1:4, 3:6] = 1
    cropped = sitk.RegionOfInterest(like(reference, labels), size=(5, 4, 4), index=(2, 1, 1))  # (i, j, k)
    assert cropped.GetSize() != reference.GetSize() and cropped.GetOrigin() != reference.GetOrigin()
    path = write(tmp_path, "cropped.nrrd", cropped)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mask = read_mask(path, volume_from_itk(reference))
    np.testing.assert_array_equal(mask, labels == 1)


def test_region_outside_the_image_is_refused_like_an_empty_file(tmp_path, reference):
    far = sitk.Image(4, 4, 4, sitk.sitkUInt8)
    far.SetOrigin((500.0, 500.0, 500.0))
    far[1, 1, 1] = 1
    path = write(tmp_path, "far.nrrd", far)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused, not warned about
        with pytest.raises(InputError, match="label 1 of far.nrrd covers no voxel of the image.*outside"):
            read_mask(path, volume_from_itk(reference))


def test_region_arrays_follow_the_same_rule():
    from SegHiResCAMLib.region import region_weights

    labels = np.array([[[0, 2], [3, 0]]], np.int16)
    np.testing.assert_array_equal(region_weights(labels), labels != 0)
    assert region_weights(labels.astype(np.float64)).dtype == np.bool_  # whole numbers stored as floats
    soft = np.array([[[0.0, 0.5], [1.0, 0.25]]])
    assert region_weights(soft).dtype == np.float32
    np.testing.assert_array_equal(region_weights(soft), soft)
    with pytest.raises(InputError, match="NaN"):
        region_weights(np.array([[[0.5, np.nan]]]))
    with pytest.raises(InputError, match="from 0.5 to 2.5"):
        region_weights(np.array([[[0.5, 2.5]]]))


# --- Slicer .seg.nrrd files with overlapping segments (several layers) ----------------------------

@pytest.fixture
def overlapping_seg(tmp_path):
    """A real .seg.nrrd written by Slicer's storage node: three segments, two of them overlapping."""
    slicer = pytest.importorskip("slicer")
    from mrml_helpers import add_segment, add_segmentation, box_mask, oblique_ijk_to_ras

    from SegHiResCAMLib.mrml.scene import new_scene

    scene = new_scene()
    matrix = oblique_ijk_to_ras()
    shape = (6, 8, 10)
    masks = {
        "tumor": box_mask(shape, (1, 1, 1), (4, 5, 6)),
        "edema": box_mask(shape, (2, 3, 4), (5, 7, 9)),  # overlaps the tumour
        "vessel": box_mask(shape, (0, 0, 7), (2, 2, 10)),  # overlaps neither
    }
    segmentation = add_segmentation(scene)
    ids = {"tumor": "Segment_1", "edema": "Segment_2", "vessel": "Segment_3"}
    for name, mask in masks.items():
        add_segment(segmentation, mask, matrix, ids[name], name)
    assert segmentation.GetSegmentation().GetNumberOfLayers() == 2  # the overlap forces a second layer
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    segmentation.SetAndObserveStorageNodeID(storage.GetID())
    path = tmp_path / "brain.seg.nrrd"
    storage.SetFileName(str(path))
    assert storage.WriteData(segmentation)
    assert sitk.ReadImage(str(path)).GetNumberOfComponentsPerPixel() == 2  # stored as layers
    return path, Volume(np.zeros(shape, np.float32), matrix), masks, ids


def test_each_overlapping_segment_reads_back_as_its_own_labelmap(overlapping_seg):
    # Before: refused ("stores overlapping segments in several layers; export the one segment ...").
    path, reference, masks, ids = overlapping_seg
    for name, mask in masks.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # Slicer's cropped extent is placed exactly, without resampling
            by_name = read_mask(path, reference, label=name)
        np.testing.assert_array_equal(by_name, mask, err_msg=name)
        np.testing.assert_array_equal(read_mask(path, reference, label=ids[name]), mask, err_msg=ids[name])
    assert (masks["tumor"] & masks["edema"]).any()  # the two really overlap


def test_multi_segment_file_without_a_choice_asks_which(overlapping_seg):
    path, reference, _, _ = overlapping_seg
    with pytest.raises(InputError, match="holds 3 segments \\('tumor' \\(ID 'Segment_1'\\), 'edema'.*--roi-label"):
        read_mask(path, reference)
    with pytest.raises(InputError, match="no segment named 'csf'; segments: 'tumor'"):
        read_mask(path, reference, label="csf")
    # label value 1 is the tumour in layer 0 and the oedema in layer 1: ambiguous, so refused
    with pytest.raises(InputError, match="2 segments of brain.seg.nrrd match 1.*choose one by its name or ID"):
        read_mask(path, reference, label=1)
