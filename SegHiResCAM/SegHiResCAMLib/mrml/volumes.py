"""Volume nodes <-> :class:`~SegHiResCAMLib.volume.Volume`, and volume files through MRML storage nodes.

Arrays are numpy in KJI order (as ``slicer.util.arrayFromVolume`` gives them) and always
copies: changing a returned array never changes a node. Geometry is the node's own
IJK-to-RAS matrix; a parent transform, if any, is not applied (the heatmap node is placed
under the same transform as its reference instead).
"""

from __future__ import annotations

import os

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from ..errors import InputError, MissingFileError, StorageError
from ..volume import Volume

VOLUME_FILE_EXTENSIONS = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")


def matrix_to_numpy(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    """A 4x4 vtkMatrix4x4 as a float numpy array (a copy)."""
    return np.array([[matrix.GetElement(row, col) for col in range(4)] for row in range(4)])


def numpy_to_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    """A 4x4 numpy array as a new vtkMatrix4x4."""
    array = np.asarray(array, dtype=float)
    if array.shape != (4, 4):
        raise InputError(f"a 4x4 matrix is needed, got shape {array.shape}")
    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for col in range(4):
            matrix.SetElement(row, col, array[row, col])
    return matrix


def ijk_to_ras_of_node(node: slicer.vtkMRMLVolumeNode) -> np.ndarray:
    """The node's 4x4 IJK-to-RAS matrix (parent transforms not applied)."""
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return matrix_to_numpy(matrix)


def array_from_node(node: slicer.vtkMRMLVolumeNode) -> np.ndarray:
    """A copy of the node's voxels: ``(K, J, I)``, or ``(C, K, J, I)`` for several components.

    Raises:
        InputError: the node is not a volume or holds no image.
    """
    if node is None or not node.IsA("vtkMRMLVolumeNode"):
        raise InputError("a volume node is needed; select an image volume and try again")
    image = node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        raise InputError(f"the volume '{node.GetName()}' holds no image; load the image again")
    i_size, j_size, k_size = image.GetDimensions()
    components = image.GetNumberOfScalarComponents()
    flat = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    if components == 1:
        return flat.reshape(k_size, j_size, i_size).copy()
    # VTK stores components last; Volume keeps channels first.
    return np.moveaxis(flat.reshape(k_size, j_size, i_size, components), -1, 0).copy()


def volume_from_node(node: slicer.vtkMRMLVolumeNode) -> Volume:
    """The node's voxels (a copy, KJI order) with its IJK-to-RAS matrix.

    Args:
        node: a scalar (or vector) volume node holding an image.

    Returns:
        Volume with ``array`` ``(K, J, I)`` (or ``(C, K, J, I)``) and ``ijk_to_ras``.

    Raises:
        InputError: the node is not a volume or holds no image.
    """
    return Volume(array_from_node(node), ijk_to_ras_of_node(node))


def image_data_from_array(array: np.ndarray) -> vtk.vtkImageData:
    """A new vtkImageData (origin 0, spacing 1, as MRML expects) holding a copy of ``array``.

    Args:
        array: ``(K, J, I)`` or ``(C, K, J, I)``; bool becomes uint8.
    """
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if array.ndim == 3:
        components = 1
        voxels_last = array
    elif array.ndim == 4:
        components = array.shape[0]
        voxels_last = np.moveaxis(array, 0, -1)
    else:
        raise InputError(f"a volume array must be (K, J, I) or (C, K, J, I), got shape {array.shape}")
    k_size, j_size, i_size = voxels_last.shape[:3]
    flat = np.ascontiguousarray(voxels_last).reshape(-1, components)
    if components == 1:
        flat = flat.ravel()
    scalars = numpy_support.numpy_to_vtk(flat, deep=True)
    image = vtk.vtkImageData()
    image.SetDimensions(i_size, j_size, k_size)
    image.GetPointData().SetScalars(scalars)
    return image


def update_node_from_volume(node: slicer.vtkMRMLVolumeNode, volume: Volume) -> None:
    """Replace the node's voxels and IJK-to-RAS matrix by ``volume``'s (copied), in one update.

    Args:
        node: the volume node to change (its display and storage nodes are kept).
        volume: the new voxels (KJI order) and geometry.
    """
    if node is None or not node.IsA("vtkMRMLVolumeNode"):
        raise InputError("a volume node is needed to receive the image")
    image = image_data_from_array(volume.array)
    was_modifying = node.StartModify()
    try:
        node.SetIJKToRASMatrix(numpy_to_matrix(volume.ijk_to_ras))
        node.SetAndObserveImageData(image)
    finally:
        node.EndModify(was_modifying)


def _check_volume_path(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not path.lower().endswith(VOLUME_FILE_EXTENSIONS):
        raise InputError(f"'{path}' is not a volume file name; use one ending in {', '.join(VOLUME_FILE_EXTENSIONS)}")
    return path


def write_volume_node(node: slicer.vtkMRMLVolumeNode, path: str | os.PathLike, compress: bool = True) -> str:
    """Write the node's image and geometry to a NRRD or NIfTI file (Slicer's own writer).

    The node and its storage node, if any, are not changed.

    Args:
        node: the volume node to write.
        path: file name; the extension picks the format (.nrrd, .nii, .nii.gz, ...).
        compress: compress the voxels (NRRD gzip encoding).

    Returns:
        The path written, as a string.

    Raises:
        InputError: the node holds no image or the extension is not a volume format.
        StorageError: the file could not be written (an OSError).
    """
    path = _check_volume_path(path)
    array_from_node(node)  # same clear error for an empty node
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(path)
    storage.SetUseCompression(1 if compress else 0)
    if not storage.WriteData(node):
        raise StorageError(f"could not write the volume '{node.GetName()}' to '{path}': {_storage_errors(storage)}")
    return path


def read_volume_node(
    scene: slicer.vtkMRMLScene,
    path: str | os.PathLike,
    name: str | None = None,
    labelmap: bool = False,
) -> slicer.vtkMRMLVolumeNode:
    """Read a NRRD or NIfTI file into a new volume node of ``scene`` (with display and storage nodes).

    Args:
        scene: the scene that receives the node.
        path: the file to read.
        name: node name; defaults to the file name without extension.
        labelmap: create a labelmap volume node instead of a scalar volume node.

    Returns:
        The new node. On failure nothing is left in the scene.

    Raises:
        MissingFileError: the file does not exist (a FileNotFoundError).
        InputError: the extension is not a volume format.
        StorageError: the file could not be read (an OSError).
    """
    path = _check_volume_path(path)
    if not os.path.isfile(path):
        raise MissingFileError(f"the volume file '{path}' does not exist")
    if name is None:
        base = os.path.basename(path)
        name = base[: -len(".nii.gz")] if base.lower().endswith(".nii.gz") else os.path.splitext(base)[0]
    node = slicer.vtkMRMLLabelMapVolumeNode() if labelmap else slicer.vtkMRMLScalarVolumeNode()
    node.SetName(name)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(path)
    scene.AddNode(storage)
    scene.AddNode(node)
    try:
        node.SetAndObserveStorageNodeID(storage.GetID())
        if not storage.ReadData(node):
            raise StorageError(f"could not read the volume file '{path}': {_storage_errors(storage)}")
        node.CreateDefaultDisplayNodes()
    except BaseException:
        for display_index in reversed(range(node.GetNumberOfDisplayNodes())):
            display = node.GetNthDisplayNode(display_index)
            if display is not None:
                scene.RemoveNode(display)
        scene.RemoveNode(node)
        scene.RemoveNode(storage)
        raise
    return node


def _storage_errors(storage: slicer.vtkMRMLStorageNode) -> str:
    messages = storage.GetUserMessages() if hasattr(storage, "GetUserMessages") else None
    text = messages.GetAllMessagesAsString() if messages is not None else ""
    return text.strip() or "no details given; check that the folder exists and is writable"


def write_mask_like(mask: np.ndarray, reference_volume_node: slicer.vtkMRMLVolumeNode,
                    path: str | os.PathLike) -> str:
    """Write a boolean ``(K, J, I)`` mask as a uint8 label file (1 inside) with the reference's geometry.

    The label node lives outside any scene, so writing it leaves the user's scene untouched.
    """
    node = slicer.vtkMRMLLabelMapVolumeNode()
    update_node_from_volume(node, Volume(np.asarray(mask).astype(np.uint8), ijk_to_ras_of_node(reference_volume_node)))
    return write_volume_node(node, path)


def read_volume_array(path: str | os.PathLike) -> np.ndarray:
    """The voxels (KJI order) of a volume file, read through a private scene, not the user's."""
    scratch = slicer.vtkMRMLScene()
    try:
        return array_from_node(read_volume_node(scratch, path))
    finally:
        scratch.Clear(1)
