"""Render one slice view to a PNG file offscreen, with Slicer's own slice-view pipeline.

The picture comes from ``vtkMRMLSliceLogic``: it reslices each layer along the slice plane,
maps it through the layer's display settings (colour table, window/level, threshold) and
blends foreground over background, exactly as a Slicer slice view does. Its output is an
image, so no OpenGL context is needed: this works on headless machines and in CI.
Meant for use outside the Slicer GUI: the tests check with it what Slicer's slice views show of
a heatmap (``heatmap_display``), headless. Inside Slicer, grab the real view instead
(``slicer.util.setSliceViewerLayers`` + ScreenCapture). The pictures of ``explain --png``, the
demo and the evaluation report are drawn by :mod:`SegHiResCAMLib.pictures` instead (letters,
colour bar, title, region outline), which needs no slicer-core.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from ..errors import DisplayError, InputError, MissingFileError, StorageError
from .scene import ensure_orientation_presets, node_ids, remove_nodes_added_since
from .volumes import matrix_to_numpy

ORIENTATIONS = ("Axial", "Sagittal", "Coronal")


def render_slice_png(
    scene: slicer.vtkMRMLScene,
    background_node: slicer.vtkMRMLVolumeNode,
    foreground_node: slicer.vtkMRMLVolumeNode | None,
    path: str | os.PathLike,
    orientation: str = "Axial",
    offset_ras: float | Sequence[float] | None = None,
    size: tuple[int, int] = (512, 512),
    opacity: float = 0.5,
) -> str:
    """Render a slice of ``background_node`` with ``foreground_node`` blended over it, save as RGB PNG.

    The field of view fits the background volume. The volumes' display nodes decide the
    look (a heatmap from ``show_heatmap`` brings its colour table and threshold). The
    temporary view nodes this needs are removed before returning.

    Args:
        scene: the scene holding both volumes.
        background_node: the image (for example the CT or MR volume).
        foreground_node: the overlay (for example the heatmap), or None for the image alone.
        path: PNG file to write.
        orientation: "Axial", "Sagittal" or "Coronal".
        offset_ras: where the slice is: None for the middle of the background volume, a
            number for the slice offset in mm along the slice normal, or an (R, A, S)
            point the slice passes through.
        size: (width, height) in pixels.
        opacity: foreground opacity (0..1).

    Returns:
        The path written, as a string.

    Raises:
        InputError: a node or option cannot be used as given.
        StorageError: the PNG could not be written (an OSError).
    """
    rgb = render_slice_rgb(scene, background_node, foreground_node, orientation, offset_ras, size, opacity)
    return write_png(rgb, path)


def render_slice_rgb(
    scene: slicer.vtkMRMLScene,
    background_node: slicer.vtkMRMLVolumeNode,
    foreground_node: slicer.vtkMRMLVolumeNode | None,
    orientation: str = "Axial",
    offset_ras: float | Sequence[float] | None = None,
    size: tuple[int, int] = (512, 512),
    opacity: float = 0.5,
    xy_to_ras: np.ndarray | None = None,
) -> np.ndarray:
    """Like :func:`render_slice_png`, but return the picture as a ``(height, width, 3)`` uint8 array.

    Row 0 is the top of the picture (as in the PNG). When ``xy_to_ras`` is a 4x4 numpy
    array it receives the pixel-to-RAS matrix of the view: pixel (column c, row r) lies at
    ``xy_to_ras @ (c, height - 1 - r, 0, 1)``.
    """
    _check_inputs(scene, background_node, foreground_node, orientation, size, opacity)
    width, height = int(size[0]), int(size[1])
    layout_name = _unused_layout_name(scene)
    ids_before = node_ids(scene)
    logic = slicer.vtkMRMLSliceLogic()
    logic.SetMRMLScene(scene)
    try:
        slice_node = logic.AddSliceNode(layout_name)
        composite_node = logic.GetSliceCompositeNode()
        ensure_orientation_presets(slice_node)
        slice_node.SetOrientation(orientation)
        composite_node.SetBackgroundVolumeID(background_node.GetID())
        composite_node.SetForegroundVolumeID(foreground_node.GetID() if foreground_node is not None else None)
        composite_node.SetForegroundOpacity(float(opacity))
        slice_node.SetDimensions(width, height, 1)
        logic.FitSliceToBackground(width, height)
        _move_slice(logic, slice_node, offset_ras)
        logic.UpdatePipeline()
        rgb = _blend_as_rgb(logic, width, height)
        if xy_to_ras is not None:
            xy_to_ras[...] = matrix_to_numpy(slice_node.GetXYToRAS())
    finally:
        logic.SetMRMLScene(None)
        # The slice, composite and slice-model nodes of this temporary view.
        remove_nodes_added_since(scene, ids_before)
    return rgb


def write_png(rgb: np.ndarray, path: str | os.PathLike) -> str:
    """Write a ``(height, width, 3)`` uint8 array (row 0 at the top) to a PNG file with VTK.

    Missing folders on the way are created, as the volume writer does.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise StorageError(f"could not create the folder '{folder}' for the picture '{path}': {error}") from error
    height, width = rgb.shape[:2]
    image = vtk.vtkImageData()
    image.SetDimensions(width, height, 1)
    # VTK's row 0 is the bottom of the picture.
    flat = np.ascontiguousarray(rgb[::-1]).reshape(-1, 3)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(flat, deep=True, array_type=vtk.VTK_UNSIGNED_CHAR))
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(path)
    writer.SetInputData(image)
    writer.Write()
    if writer.GetErrorCode() != 0 or not os.path.isfile(path):
        raise StorageError(f"could not write the picture '{path}'; check that the folder exists and is writable")
    return path


def read_png(path: str | os.PathLike) -> np.ndarray:
    """Read a PNG file with VTK as ``(height, width, channels)`` uint8, row 0 at the top."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingFileError(f"the picture '{path}' does not exist")
    reader = vtk.vtkPNGReader()
    reader.SetFileName(path)
    reader.Update()
    image = reader.GetOutput()
    width, height, _ = image.GetDimensions()
    channels = image.GetNumberOfScalarComponents()
    pixels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, channels)
    return pixels[::-1].copy()


def _check_inputs(scene, background_node, foreground_node, orientation, size, opacity) -> None:
    if (
        background_node is None
        or not background_node.IsA("vtkMRMLVolumeNode")
        or background_node.GetImageData() is None
    ):
        raise InputError("a background image volume is needed to render a slice")
    for node in (background_node, foreground_node):
        if node is not None and node.GetScene() is not scene:
            raise InputError(f"the volume '{node.GetName()}' is not in the scene given")
        if node is not None and node.GetDisplayNode() is None:
            raise InputError(
                f"the volume '{node.GetName()}' has no display settings; call CreateDefaultDisplayNodes() on it first"
            )
    if orientation not in ORIENTATIONS:
        raise InputError(f"orientation must be one of {', '.join(ORIENTATIONS)}, got '{orientation}'")
    if len(size) != 2 or min(int(size[0]), int(size[1])) < 1:
        raise InputError(f"size must be (width, height) in pixels, got {size}")
    if not 0.0 <= float(opacity) <= 1.0:
        raise InputError(f"opacity must be between 0 and 1, got {opacity}")


def _unused_layout_name(scene) -> str:
    used = {
        scene.GetNthNodeByClass(index, "vtkMRMLSliceNode").GetLayoutName()
        for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode"))
    }
    number = 1
    while f"SegHiResCAMRender{number}" in used:
        number += 1
    return f"SegHiResCAMRender{number}"


def _move_slice(logic, slice_node, offset_ras) -> None:
    if offset_ras is None:
        return
    if np.ndim(offset_ras) == 0:
        logic.SetSliceOffset(float(offset_ras))
        return
    point = np.asarray(offset_ras, dtype=float).ravel()
    if point.shape != (3,):
        raise InputError(f"offset_ras must be a number or an (R, A, S) point, got {offset_ras}")
    # Keep the fitted field of view; only move the plane through the point.
    slice_node.JumpSliceByOffsetting(*point)


def _blend_as_rgb(logic, width: int, height: int) -> np.ndarray:
    connection = logic.GetImageDataConnection()
    if connection is None:
        raise DisplayError("the slice logic produced no picture; is the background volume empty?")
    producer = connection.GetProducer()
    producer.Update()
    image = producer.GetOutputDataObject(connection.GetIndex())
    columns, rows, _ = image.GetDimensions()
    channels = image.GetNumberOfScalarComponents()
    pixels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(rows, columns, channels)
    if (columns, rows) != (width, height):
        raise DisplayError(f"the slice logic produced a {columns}x{rows} picture instead of {width}x{height}")
    return np.ascontiguousarray(pixels[::-1, :, :3]).astype(np.uint8)

