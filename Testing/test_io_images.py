"""Image and mask files through SimpleITK: geometry is kept exactly, bad inputs say what to do."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from SegHiResCAMLib.errors import InputError
from SegHiResCAMLib.io.images import check_output_path, read_image, read_mask, same_grid, write_image
from SegHiResCAMLib.volume import Volume
from tolerances import geometry_atol

ORIGIN = (-12.5, 30.25, 7.0)
SPACING = (0.7, 1.3, 2.9)


def oblique_direction() -> tuple[float, ...]:
    """A proper rotation (about an oblique axis), row-major, as ITK wants it."""
    a, b = np.deg2rad(17.0), np.deg2rad(-31.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return tuple((rz @ rx).ravel())


def make_image(shape=(6, 7, 8), dtype=np.float32, seed=0) -> sitk.Image:
    rng = np.random.default_rng(seed)
    image = sitk.GetImageFromArray((rng.random(shape) * 100).astype(dtype))
    image.SetOrigin(ORIGIN)
    image.SetSpacing(SPACING)
    image.SetDirection(oblique_direction())
    return image


def assert_same_itk_geometry(a: sitk.Image, b: sitk.Image, stored=np.float64) -> None:
    """Same grid, to the rounding of the geometry as stored (float64 NRRD text, float32 NIfTI)."""
    assert a.GetSize() == b.GetSize()
    for get in (sitk.Image.GetOrigin, sitk.Image.GetSpacing, sitk.Image.GetDirection):
        np.testing.assert_allclose(get(a), get(b), rtol=0, atol=geometry_atol(get(b), stored))


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz"])
def test_read_image_maps_every_voxel_to_the_itk_physical_point_in_ras(tmp_path, suffix):
    path = tmp_path / f"t1{suffix}"
    sitk.WriteImage(make_image(), str(path))
    stored = sitk.ReadImage(str(path))
    volume = read_image(path)
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(stored))
    for ijk in [(0, 0, 0), (7, 0, 0), (0, 6, 0), (0, 0, 5), (3, 4, 2)]:
        lps = np.array(stored.TransformIndexToPhysicalPoint(ijk))
        ras = volume.ijk_to_ras @ np.array([*ijk, 1.0])
        # ITK and our matrix place the voxel with the same float64 products, in other orders
        np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], rtol=0,
                                   atol=geometry_atol(np.abs(volume.ijk_to_ras) @ np.abs([*ijk, 1.0])))


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".nii"])
def test_written_image_has_the_input_origin_spacing_and_direction(tmp_path, suffix):
    source = tmp_path / f"in{suffix}"
    sitk.WriteImage(make_image(), str(source))
    volume = read_image(source)
    heat = volume.with_array(np.linspace(0, 1, volume.array.size, dtype=np.float32).reshape(volume.array.shape))
    written = write_image(heat, tmp_path / f"heat{suffix}")
    back = sitk.ReadImage(str(written))
    assert_same_itk_geometry(back, sitk.ReadImage(str(source)), np.float32 if ".nii" in suffix else np.float64)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), heat.array)
    assert back.GetPixelID() == sitk.sitkFloat32


def test_write_then_read_is_the_identity_on_array_and_matrix(tmp_path):
    matrix = np.array([[0.0, -1.5, 0.2, 10.0], [2.0, 0.0, 0.0, -4.0], [0.0, 0.3, 0.9, 2.5], [0, 0, 0, 1]])
    # columns must be orthogonal for ITK: orthogonalise, keep the lengths as spacing
    q, _ = np.linalg.qr(matrix[:3, :3])
    matrix[:3, :3] = q * np.array([0.5, 1.25, 3.0])
    volume = Volume(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6), matrix)
    back = read_image(write_image(volume, tmp_path / "v.nrrd"))
    np.testing.assert_array_equal(back.array, volume.array)
    np.testing.assert_allclose(back.ijk_to_ras, matrix, rtol=0, atol=geometry_atol(matrix))  # NRRD: float64


def test_missing_file_is_an_input_error_that_names_it(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_image(tmp_path / "nothere.nrrd")


def test_file_that_is_not_an_image_is_an_input_error(tmp_path):
    path = tmp_path / "notes.nrrd"
    path.write_text("this is not an image\n")
    with pytest.raises(InputError, match="cannot read .*notes.nrrd"):
        read_image(path)


def test_4d_image_is_refused_with_what_to_do(tmp_path):
    series = sitk.JoinSeries([make_image(seed=s) for s in range(3)])
    path = tmp_path / "fmri.nii.gz"
    sitk.WriteImage(series, str(path))
    with pytest.raises(InputError, match="4D image.*extract"):
        read_image(path)


def test_colour_image_is_refused_with_what_to_do(tmp_path):
    vector = sitk.Compose([make_image(seed=s) for s in range(3)])
    path = tmp_path / "rgb.nrrd"
    sitk.WriteImage(vector, str(path))
    with pytest.raises(InputError, match="3 values per voxel.*scalar"):
        read_image(path)


def test_2d_image_is_refused(tmp_path):
    path = tmp_path / "slice.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 6), np.float32)), str(path))
    with pytest.raises(InputError, match="2D image"):
        read_image(path)


def write_dicom_series(folder, image: sitk.Image) -> None:
    folder.mkdir()
    series_uid = "1.2.826.0.1.3680043.2.1125.1.99"
    direction = image.GetDirection()
    for k in range(image.GetDepth()):
        part = image[:, :, k]
        origin = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": "MR",
            "0020|000d": series_uid + ".0",
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in origin),
            "0020|0037": "\\".join(f"{v:.8f}" for v in (direction[0], direction[3], direction[6],
                                                        direction[1], direction[4], direction[7])),
            "0028|0030": f"{image.GetSpacing()[1]:.6f}\\{image.GetSpacing()[0]:.6f}",
            "0018|0050": f"{image.GetSpacing()[2]:.6f}",
        }
        for key, value in tags.items():
            part.SetMetaData(key, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(part)


def test_dicom_series_folder_is_read_as_one_volume(tmp_path):
    image = sitk.Cast(make_image(shape=(5, 6, 7)), sitk.sitkInt16)
    image.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))
    write_dicom_series(tmp_path / "series", image)
    volume = read_image(tmp_path / "series")
    assert volume.array.shape == (5, 6, 7)
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(image))
    # the series stores positions and spacings as decimal text with 6 decimals (write_dicom_series):
    # each within 0.5e-6, a spacing taken between two positions within 1e-6
    np.testing.assert_allclose(volume.origin_ras, np.array(ORIGIN) * [-1, -1, 1], rtol=0,
                               atol=0.5e-6 + geometry_atol(ORIGIN))
    np.testing.assert_allclose(volume.spacing, SPACING, rtol=0, atol=1e-6 + geometry_atol(ORIGIN))


def test_folder_without_dicom_is_an_input_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no DICOM series"):
        read_image(tmp_path / "empty")


# --- masks -----------------------------------------------------------------------------------


def labels_like(image: sitk.Image, array: np.ndarray) -> sitk.Image:
    labels = sitk.GetImageFromArray(array.astype(np.uint8))
    labels.CopyInformation(image)
    return labels


def test_mask_on_the_same_grid_is_the_chosen_label_exactly(tmp_path):
    image = make_image()
    labels = np.zeros((6, 7, 8), np.uint8)
    labels[1:3, 2:5, 3:6] = 2
    labels[4, 4, 4] = 1
    sitk.WriteImage(labels_like(image, labels), str(tmp_path / "seg.nrrd"))
    sitk.WriteImage(image, str(tmp_path / "t1.nrrd"))
    reference = read_image(tmp_path / "t1.nrrd")
    mask = read_mask(tmp_path / "seg.nrrd", reference, label=2)
    assert mask.dtype == np.bool_
    np.testing.assert_array_equal(mask, labels == 2)
    np.testing.assert_array_equal(read_mask(tmp_path / "seg.nrrd", reference, label="1"), labels == 1)


def test_mask_with_several_labels_needs_a_label(tmp_path):
    image = make_image()
    labels = np.zeros((6, 7, 8), np.uint8)
    labels[0, 0, 0], labels[1, 1, 1] = 1, 3
    sitk.WriteImage(labels_like(image, labels), str(tmp_path / "seg.nrrd"))
    reference = Volume(np.zeros((6, 7, 8)), np.eye(4))
    with pytest.raises(InputError, match=r"several labels \(1, 3\).*--roi-label"):
        read_mask(tmp_path / "seg.nrrd", reference)
    with pytest.raises(InputError, match="label 2 does not occur.*1, 3"):
        read_mask(tmp_path / "seg.nrrd", reference, label=2)


def test_single_label_mask_needs_no_label(tmp_path):
    image = make_image()
    labels = np.zeros((6, 7, 8), np.uint8)
    labels[2:4, 2:4, 2:4] = 7
    sitk.WriteImage(labels_like(image, labels), str(tmp_path / "roi.nii.gz"))
    sitk.WriteImage(image, str(tmp_path / "t1.nii.gz"))
    reference = read_image(tmp_path / "t1.nii.gz")
    np.testing.assert_array_equal(read_mask(tmp_path / "roi.nii.gz", reference), labels == 7)


def test_mask_on_a_finer_grid_is_resampled_by_nearest_neighbour(tmp_path):
    coarse = sitk.Image(8, 8, 8, sitk.sitkFloat32)
    coarse.SetSpacing((2.0, 2.0, 2.0))
    coarse.SetOrigin((1.0, -3.0, 5.0))
    fine = sitk.Image(16, 16, 16, sitk.sitkUInt8)
    fine.SetSpacing((1.0, 1.0, 1.0))
    fine.SetOrigin((0.5, -3.5, 4.5))  # fine voxel centres 2i, 2i+1 straddle coarse centre i
    fine_array = np.zeros((16, 16, 16), np.uint8)
    fine_array[4:10, 2:8, 6:14] = 1
    labels = sitk.GetImageFromArray(fine_array)
    labels.CopyInformation(fine)
    sitk.WriteImage(labels, str(tmp_path / "roi.nrrd"))
    sitk.WriteImage(coarse, str(tmp_path / "t1.nrrd"))
    reference = read_image(tmp_path / "t1.nrrd")
    with pytest.warns(UserWarning, match="resampled"):
        mask = read_mask(tmp_path / "roi.nrrd", reference)
    # oracle: SimpleITK's own nearest-neighbour resampling of the label file onto the coarse grid
    expected = sitk.GetArrayFromImage(
        sitk.Resample(labels, coarse, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    ).astype(bool)
    np.testing.assert_array_equal(mask, expected)
    assert mask.shape == (8, 8, 8) and 0 < mask.sum() < fine_array.sum()


def test_segment_of_a_slicer_seg_nrrd_can_be_chosen_by_name(tmp_path):
    image = make_image()
    labels = np.zeros((6, 7, 8), np.uint8)
    labels[1:3, 1:3, 1:3] = 1
    labels[3:5, 3:5, 3:5] = 2
    seg = labels_like(image, labels)
    for index, (name, value) in enumerate([("grey matter", 1), ("white matter", 2)]):
        seg.SetMetaData(f"Segment{index}_Name", name)
        seg.SetMetaData(f"Segment{index}_LabelValue", str(value))
        seg.SetMetaData(f"Segment{index}_Layer", "0")
    sitk.WriteImage(seg, str(tmp_path / "brain.seg.nrrd"))
    sitk.WriteImage(image, str(tmp_path / "t1.nrrd"))
    reference = read_image(tmp_path / "t1.nrrd")
    np.testing.assert_array_equal(read_mask(tmp_path / "brain.seg.nrrd", reference, label="white matter"), labels == 2)
    with pytest.raises(InputError, match="no segment named 'csf'.*'grey matter', 'white matter'"):
        read_mask(tmp_path / "brain.seg.nrrd", reference, label="csf")


def test_same_grid_tells_grids_apart():
    volume = Volume(np.zeros((3, 4, 5)), np.diag([1.0, 2.0, 3.0, 1.0]))
    assert same_grid(Volume(np.ones((3, 4, 5)), np.diag([1.0, 2.0, 3.0, 1.0])), volume)
    assert not same_grid(Volume(np.ones((3, 4, 6)), np.diag([1.0, 2.0, 3.0, 1.0])), volume)
    assert not same_grid(Volume(np.ones((3, 4, 5)), np.diag([1.0, 2.0, 3.1, 1.0])), volume)


def test_output_path_check_names_the_problem(tmp_path):
    assert check_output_path(tmp_path / "heat.nii.gz") == tmp_path / "heat.nii.gz"
    with pytest.raises(InputError, match="file type is unknown; use one of .nrrd"):
        check_output_path(tmp_path / "heat.txt")
    with pytest.raises(InputError, match="folder .*missing does not exist"):
        check_output_path(tmp_path / "missing" / "heat.nrrd")
