"""Read and write image volumes and ROI masks with SimpleITK (NRRD, NIfTI, DICOM series).

Everything here returns :class:`~SegHiResCAMLib.volume.Volume` objects: a KJI array plus the
IJK-to-RAS matrix, the same pair the Slicer side gets from a volume node, so files and nodes
go through one pipeline. Geometry is copied exactly: a map written with :func:`write_image`
has the origin, spacing and direction of the volume it was computed on.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..volume import Volume, ijk_to_ras_from_itk, itk_geometry_from_ijk_to_ras

# Formats a heatmap can be written in (SimpleITK picks the writer from the name).
WRITABLE_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")

# Two grids closer than this (mm, or direction cosine) are the same grid.
GEOMETRY_TOLERANCE = 1e-4


def _itk_reason(error: BaseException) -> str:
    """The sentence of a SimpleITK error that a user can read (it puts it last, after source locations)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = lines[-1] if lines else type(error).__name__
    return reason.split("ERROR:", 1)[-1].strip()


def _read_dicom_series(folder: Path) -> sitk.Image:
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError(
            f"the folder {folder} holds no DICOM series; give an image file (.nrrd, .nii.gz) or a folder of DICOM slices"
        )
    if len(series) > 1:
        raise InputError(
            f"the folder {folder} holds {len(series)} DICOM series ({', '.join(series)}); "
            "put the series to explain in a folder of its own"
        )
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return reader.Execute()


def read_itk_image(path: str | Path) -> sitk.Image:
    """Read a file or a DICOM series folder as a SimpleITK image, with errors a user can act on.

    Raises:
        InputError: the path is missing or cannot be read as an image.
    """
    source = Path(path)
    if not source.exists():
        raise InputError(f"the image {source} does not exist; check the path")
    try:
        if source.is_dir():
            return _read_dicom_series(source)
        return sitk.ReadImage(str(source))
    except RuntimeError as error:  # SimpleITK reports every reading problem as RuntimeError
        raise InputError(
            f"cannot read {source} as an image ({_itk_reason(error)}); use NRRD, NIfTI or a DICOM series folder"
        ) from error


def _check_scalar_3d(image: sitk.Image, source: Path) -> None:
    dimension = image.GetDimension()
    if dimension > 3:
        raise InputError(
            f"{source.name} is a {dimension}D image of size {'x'.join(map(str, image.GetSize()))} (a time series "
            "or several volumes); extract the one 3D volume to explain (for example with Slicer's "
            "Sequences module or SimpleITK's Extract) and try again"
        )
    if dimension < 3:
        raise InputError(
            f"{source.name} is a {dimension}D image; SegHiResCAM explains 3D volumes, so stack the slices "
            "into a volume first (a 2D model is then applied slice by slice)"
        )
    components = image.GetNumberOfComponentsPerPixel()
    if components > 1:
        raise InputError(
            f"{source.name} has {components} values per voxel (a colour, vector or multi-volume image); "
            "convert it to a single scalar volume (for example one channel, or greyscale) and try again"
        )


def _volume_from_itk(image: sitk.Image) -> Volume:
    matrix = ijk_to_ras_from_itk(image.GetOrigin(), image.GetSpacing(), image.GetDirection())
    return Volume(sitk.GetArrayFromImage(image), matrix)


def _itk_from_volume(volume: Volume, array: np.ndarray | None = None) -> sitk.Image:
    image = sitk.GetImageFromArray(volume.array if array is None else array)
    origin, spacing, direction = itk_geometry_from_ijk_to_ras(volume.ijk_to_ras)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


def read_image(path: str | Path) -> Volume:
    """Read a scalar 3D image: NRRD, NIfTI, anything SimpleITK reads, or a DICOM series folder.

    Args:
        path: an image file, or a folder holding exactly one DICOM series.

    Returns:
        A :class:`Volume` with the voxels in KJI order (the file's own type) and the IJK-to-RAS matrix.

    Raises:
        InputError: missing or unreadable file, or an image that is not one scalar 3D volume
            (4D, 2D, colour or vector images), with what to do about it.
    """
    source = Path(path)
    image = read_itk_image(source)
    _check_scalar_3d(image, source)
    return _volume_from_itk(image)


def check_output_path(path: str | Path) -> Path:
    """Fail early (before a long computation) when ``path`` cannot take a written volume.

    Raises:
        InputError: unknown file type, or a folder that does not exist.
    """
    target = Path(path)
    name = target.name.lower()
    if not name.endswith(WRITABLE_SUFFIXES):
        raise InputError(
            f"cannot write {target}: the file type is unknown; use one of {', '.join(WRITABLE_SUFFIXES)}"
        )
    if not target.parent.is_dir():
        raise InputError(f"cannot write {target}: the folder {target.parent} does not exist")
    return target


def write_image(volume: Volume, path: str | Path, *, compress: bool = True) -> Path:
    """Write a single-channel volume with its exact geometry (format from the extension).

    Args:
        volume: a ``(K, J, I)`` array and its IJK-to-RAS matrix.
        path: ``.nrrd``, ``.nii``, ``.nii.gz``, ``.mha`` ... (any SimpleITK writer).
        compress: compress the voxel data where the format allows.

    Returns:
        The path written.

    Raises:
        InputError: the array is not 3D, or the file cannot be written.
    """
    target = Path(path)
    if volume.array.ndim != 3:
        raise InputError(
            f"only single-channel 3D volumes can be written, got an array of shape {volume.array.shape}"
        )
    array = volume.array
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    image = _itk_from_volume(volume, array)
    if target.parent and not target.parent.exists():
        raise InputError(f"cannot write {target}: the folder {target.parent} does not exist")
    # Write beside the target, then rename: an interrupted run never leaves a partial heatmap.
    partial = target.with_name(f".{target.name}.partial{''.join(target.suffixes)}")
    try:
        sitk.WriteImage(image, str(partial), useCompression=compress)
        os.replace(partial, target)
    except RuntimeError as error:
        raise InputError(f"cannot write {target} ({_itk_reason(error)}); use a .nrrd or .nii.gz file name") from error
    finally:
        partial.unlink(missing_ok=True)
    return target


def same_grid(a: Volume | sitk.Image, b: Volume, tolerance: float = GEOMETRY_TOLERANCE) -> bool:
    """Whether ``a`` lies on exactly the voxel grid of ``b`` (shape and IJK-to-RAS)."""
    if isinstance(a, sitk.Image):
        shape = tuple(reversed(a.GetSize()))
        matrix = ijk_to_ras_from_itk(a.GetOrigin(), a.GetSpacing(), a.GetDirection())
    else:
        shape, matrix = a.spatial_shape, a.ijk_to_ras
    return shape == tuple(b.spatial_shape) and bool(np.allclose(matrix, b.ijk_to_ras, atol=tolerance, rtol=0))


def segment_label_values(image: sitk.Image) -> dict[str, int]:
    """Segment name -> label value, from the header Slicer writes in ``.seg.nrrd`` files (empty if none)."""
    keys = set(image.GetMetaDataKeys())
    labels: dict[str, int] = {}
    index = 0
    while f"Segment{index}_Name" in keys:
        value_key = f"Segment{index}_LabelValue"
        if value_key in keys:
            labels[image.GetMetaData(f"Segment{index}_Name")] = int(image.GetMetaData(value_key))
        index += 1
    return labels


def _label_value(image: sitk.Image, array: np.ndarray, label: int | str | None, source: Path) -> int:
    present = sorted(int(v) for v in np.unique(array) if v != 0)
    if isinstance(label, str) and not label.lstrip("-").isdigit():
        names = segment_label_values(image)
        if label not in names:
            known = ", ".join(repr(n) for n in names) or "none (the file has no segment names)"
            raise InputError(f"{source.name} has no segment named {label!r}; segments: {known}")
        return names[label]
    if label is None:
        if not present:
            raise InputError(f"the ROI file {source.name} is empty (all voxels are 0); draw the region first")
        if len(present) > 1:
            shown = ", ".join(map(str, present[:20])) + (" ..." if len(present) > 20 else "")
            raise InputError(f"the ROI file {source.name} holds several labels ({shown}); choose one with --roi-label")
        return present[0]
    value = int(label)
    if value not in present:
        shown = ", ".join(map(str, present[:20])) or "none (all voxels are 0)"
        raise InputError(f"label {value} does not occur in {source.name}; labels present: {shown}")
    return value


def read_mask(path: str | Path, reference: Volume, *, label: int | str | None = None) -> np.ndarray:
    """Read a label file as a boolean mask on the reference volume's grid.

    Args:
        path: a labelmap or Slicer ``.seg.nrrd`` (one layer), NRRD/NIfTI/...
        reference: the image the mask belongs to; the mask comes back in its ``(K, J, I)`` grid.
        label: the label value to use, or a segment name from a ``.seg.nrrd`` header; None takes
            the single non-zero label of the file (and refuses files with several).

    Returns:
        A bool array of ``reference.spatial_shape``. When the file's grid differs from the
        reference's, the mask is resampled by nearest neighbour (a warning says so).

    Raises:
        InputError: missing or unreadable file, a 4D/vector file, a label that is absent.
    """
    source = Path(path)
    image = read_itk_image(source)
    if image.GetDimension() == 3 and image.GetNumberOfComponentsPerPixel() > 1:
        raise InputError(
            f"{source.name} stores overlapping segments in several layers; export the one segment to explain "
            "as a labelmap (Slicer: Segmentations > Export to files, or right-click > Export visible segments "
            "to binary labelmap) and try again"
        )
    _check_scalar_3d(image, source)
    array = sitk.GetArrayViewFromImage(image)
    value = _label_value(image, array, label, source)
    mask = array == value
    if same_grid(image, reference):
        return np.ascontiguousarray(mask)
    selected = sitk.GetImageFromArray(mask.astype(np.uint8))
    selected.CopyInformation(image)
    grid = _itk_from_volume(reference, np.zeros(reference.spatial_shape, np.uint8))
    resampled = sitk.Resample(selected, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    warnings.warn(
        f"the ROI {source.name} lies on another voxel grid than the image; it was resampled onto the image's grid "
        "(nearest neighbour)",
        stacklevel=2,
    )
    return sitk.GetArrayFromImage(resampled).astype(bool)
