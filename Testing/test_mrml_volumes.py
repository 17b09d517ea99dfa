"""Volume nodes <-> Volume, and volume files through MRML storage nodes (real slicer-core nodes)."""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

from mrml_helpers import add_volume, oblique_ijk_to_ras  # noqa: E402

from SegHiResCAMLib.errors import InputError  # noqa: E402
from SegHiResCAMLib.mrml.scene import new_scene, node_ids  # noqa: E402
from SegHiResCAMLib.mrml.volumes import (  # noqa: E402
    read_volume_node,
    update_node_from_volume,
    volume_from_node,
    write_volume_node,
)
from SegHiResCAMLib.volume import LPS_TO_RAS, Volume  # noqa: E402
from tolerances import geometry_atol  # noqa: E402


@pytest.fixture
def scene():
    return new_scene()


def _ramp(shape=(5, 6, 7), dtype=np.float32):
    return np.arange(np.prod(shape), dtype=dtype).reshape(shape) * 0.5 - 3.0


def test_volume_from_node_gives_kji_array_and_ijk_to_ras(scene):
    array = _ramp()
    node = add_volume(scene, array, oblique_ijk_to_ras())
    volume = volume_from_node(node)
    np.testing.assert_array_equal(volume.array, array)
    assert volume.array.dtype == np.float32
    # KJI: I (fastest in VTK memory) is the last numpy axis.
    assert node.GetImageData().GetDimensions() == (7, 6, 5)
    assert node.GetImageData().GetScalarComponentAsDouble(3, 2, 1, 0) == array[1, 2, 3]
    # the node splits the matrix into origin, spacing and directions (float64) and rebuilds it
    np.testing.assert_allclose(volume.ijk_to_ras, oblique_ijk_to_ras(), rtol=0,
                               atol=geometry_atol(oblique_ijk_to_ras()))


def test_volume_from_node_returns_a_copy(scene):
    node = add_volume(scene, _ramp(), np.eye(4))
    volume = volume_from_node(node)
    volume.array[:] = 99.0
    np.testing.assert_array_equal(volume_from_node(node).array, _ramp())


def test_returned_matrix_inverts_slicer_ras_to_ijk(scene):
    """Slicer's RAS-to-IJK (a separate accessor) undoes the matrix that volume_from_node returns."""
    import vtk

    node = add_volume(scene, _ramp(), oblique_ijk_to_ras())
    ijk_to_ras = volume_from_node(node).ijk_to_ras
    ras_to_ijk = vtk.vtkMatrix4x4()
    node.GetRASToIJKMatrix(ras_to_ijk)
    for ijk in [(0, 0, 0), (6, 5, 4), (2, 3, 1)]:
        ras = ijk_to_ras @ np.array([*ijk, 1.0])
        # an inverted float64 matrix times a point: within a few roundings of the RAS magnitudes, scaled back
        # to voxels by the inverse's norm (at most 1 / the smallest spacing, 0.7 mm)
        bound = geometry_atol(np.abs(ijk_to_ras) @ np.abs([*ijk, 1.0])) * np.linalg.norm(
            np.linalg.inv(ijk_to_ras[:3, :3]), 2)
        np.testing.assert_allclose(ras_to_ijk.MultiplyPoint(list(ras))[:3], ijk, rtol=0, atol=bound)


@pytest.mark.parametrize("extension", [".nrrd", ".nii.gz", ".nii"])
def test_oblique_geometry_round_trips_node_volume_node_file_node(scene, tmp_path, extension):
    array = _ramp()
    source = add_volume(scene, array, oblique_ijk_to_ras(), name="source")
    copy = slicer.vtkMRMLScalarVolumeNode()
    scene.AddNode(copy)
    update_node_from_volume(copy, volume_from_node(source))
    path = write_volume_node(copy, tmp_path / f"image{extension}")
    loaded = read_volume_node(scene, path)
    result = volume_from_node(loaded)
    stored = np.float32 if ".nii" in extension else np.float64  # NIfTI keeps float32 geometry
    np.testing.assert_allclose(result.ijk_to_ras, oblique_ijk_to_ras(), rtol=0,
                               atol=geometry_atol(oblique_ijk_to_ras(), stored))
    np.testing.assert_array_equal(result.array, array)
    assert result.array.dtype == np.float32
    assert loaded.GetName() == "image"
    assert loaded.GetDisplayNode() is not None
    assert loaded.GetStorageNode().GetFileName() == path


@pytest.mark.parametrize("extension", [".nrrd", ".nii.gz"])
def test_written_file_has_the_same_geometry_for_simpleitk(scene, tmp_path, extension):
    """An independent reader (ITK, LPS) places every voxel at the same RAS point."""
    sitk = pytest.importorskip("SimpleITK")
    array = _ramp()
    node = add_volume(scene, array, oblique_ijk_to_ras())
    path = write_volume_node(node, tmp_path / f"image{extension}")
    image = sitk.ReadImage(path)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), array)
    for ijk in [(0, 0, 0), (6, 5, 4), (1, 4, 2)]:
        lps = np.array(image.TransformIndexToPhysicalPoint(ijk))
        ras = (LPS_TO_RAS @ np.array([*lps, 1.0]))[:3]
        stored = np.float32 if ".nii" in extension else np.float64
        magnitude = np.abs(oblique_ijk_to_ras()) @ np.abs([*ijk, 1.0])
        np.testing.assert_allclose(ras, (oblique_ijk_to_ras() @ np.array([*ijk, 1.0]))[:3], rtol=0,
                                   atol=geometry_atol(magnitude, stored))


def test_update_node_from_volume_replaces_voxels_and_geometry_in_place(scene):
    node = add_volume(scene, _ramp(), np.eye(4))
    display_id = node.GetDisplayNodeID()
    ids = node_ids(scene)
    new_array = np.ones((3, 4, 5), dtype=np.int16)
    update_node_from_volume(node, Volume(new_array, oblique_ijk_to_ras()))
    result = volume_from_node(node)
    np.testing.assert_array_equal(result.array, new_array)
    assert result.array.dtype == np.int16
    np.testing.assert_allclose(result.ijk_to_ras, oblique_ijk_to_ras(), rtol=0,
                               atol=geometry_atol(oblique_ijk_to_ras()))
    assert node.GetDisplayNodeID() == display_id
    assert node_ids(scene) == ids


def test_multi_component_volume_keeps_channels_first(scene):
    array = np.stack([_ramp(), -_ramp(), 2 * _ramp()])
    node = slicer.vtkMRMLVectorVolumeNode()
    scene.AddNode(node)
    update_node_from_volume(node, Volume(array, np.eye(4)))
    assert node.GetImageData().GetNumberOfScalarComponents() == 3
    assert node.GetImageData().GetScalarComponentAsDouble(3, 2, 1, 1) == array[1, 1, 2, 3]
    np.testing.assert_array_equal(volume_from_node(node).array, array)


def test_boolean_mask_is_stored_as_uint8(scene):
    mask = np.zeros((3, 4, 5), dtype=bool)
    mask[1, 2, 3] = True
    node = slicer.vtkMRMLLabelMapVolumeNode()
    scene.AddNode(node)
    update_node_from_volume(node, Volume(mask, np.eye(4)))
    result = volume_from_node(node).array
    assert result.dtype == np.uint8
    np.testing.assert_array_equal(result, mask.astype(np.uint8))


def test_empty_node_raises_input_error_naming_it(scene):
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName("empty one")
    scene.AddNode(node)
    with pytest.raises(InputError, match="empty one"):
        volume_from_node(node)


def test_write_rejects_a_non_volume_file_name(scene, tmp_path):
    node = add_volume(scene, _ramp(), np.eye(4))
    with pytest.raises(InputError, match=r"\.nrrd"):
        write_volume_node(node, tmp_path / "image.png")


def test_write_creates_missing_folders(scene, tmp_path):
    node = add_volume(scene, _ramp(), np.eye(4))
    path = write_volume_node(node, tmp_path / "new" / "folder" / "image.nrrd")
    np.testing.assert_array_equal(volume_from_node(read_volume_node(scene, path)).array, _ramp())


def test_write_where_no_folder_can_be_made_raises_os_error(scene, tmp_path):
    node = add_volume(scene, _ramp(), np.eye(4))
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match="could not write"):
        write_volume_node(node, blocker / "image.nrrd")


def test_read_missing_file_raises_and_adds_nothing(scene, tmp_path):
    before = node_ids(scene)
    with pytest.raises(FileNotFoundError):
        read_volume_node(scene, tmp_path / "missing.nrrd")
    assert node_ids(scene) == before


def test_read_corrupt_file_raises_and_adds_nothing(scene, tmp_path):
    path = tmp_path / "corrupt.nrrd"
    path.write_bytes(b"NRRD0004\nthis is not a valid header\n")
    before = node_ids(scene)
    with pytest.raises(OSError):
        read_volume_node(scene, path)
    assert node_ids(scene) == before


def test_file_errors_are_the_familys_and_still_the_built_ins(scene, tmp_path):
    from SegHiResCAMLib.errors import MissingFileError, SegHiResCAMError, StorageError

    node = add_volume(scene, _ramp(), np.eye(4))
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(StorageError) as raised:
        write_volume_node(node, tmp_path / "a_file" / "image.nrrd")
    assert isinstance(raised.value, OSError) and isinstance(raised.value, SegHiResCAMError)
    with pytest.raises(MissingFileError) as raised:
        read_volume_node(scene, tmp_path / "missing.nrrd")
    assert isinstance(raised.value, FileNotFoundError) and isinstance(raised.value, StorageError)
