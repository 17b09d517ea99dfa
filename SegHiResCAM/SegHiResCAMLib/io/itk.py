"""SimpleITK helpers shared by the image and region readers: reading with clear errors, grids.

Geometry travels as the IJK-to-RAS matrix of :class:`~SegHiResCAMLib.volume.Volume`;
these helpers convert to and from ITK's LPS origin, spacing and direction exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..volume import Volume, ijk_to_ras_from_itk, itk_geometry_from_ijk_to_ras

# Two grids closer than this (mm, or direction cosine) are the same grid.
GEOMETRY_TOLERANCE = 1e-4


def itk_reason(error: BaseException) -> str:
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


def read_itk_image(path: str | Path, role: str = "image") -> sitk.Image:
    """Read a file or a DICOM series folder as a SimpleITK image, with errors a user can act on.

    Args:
        path: an image file or a DICOM series folder.
        role: what the file is to the user ("image", "region file"), named in the messages.

    Raises:
        InputError: the path is missing or cannot be read as an image.
    """
    source = Path(path)
    if not source.exists():
        raise InputError(f"the {role} {source} does not exist; check the path")
    try:
        if source.is_dir():
            return _read_dicom_series(source)
        return sitk.ReadImage(str(source))
    except RuntimeError as error:  # SimpleITK reports every reading problem as RuntimeError
        raise InputError(
            f"cannot read the {role} {source} ({itk_reason(error)}); use NRRD, NIfTI or a DICOM series folder"
        ) from error


def check_scalar_3d(image: sitk.Image, source: Path) -> None:
    """Refuse anything but one scalar 3D volume (4D, 2D, colour or vector images), saying what to do."""
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


def ijk_to_ras_of(image: sitk.Image) -> np.ndarray:
    """The IJK-to-RAS matrix of a SimpleITK image."""
    return ijk_to_ras_from_itk(image.GetOrigin(), image.GetSpacing(), image.GetDirection())


def volume_from_itk(image: sitk.Image) -> Volume:
    """A :class:`Volume` holding a copy of the image's voxels (KJI) and its geometry."""
    return Volume(sitk.GetArrayFromImage(image), ijk_to_ras_of(image))


def itk_from_volume(volume: Volume, array: np.ndarray | None = None) -> sitk.Image:
    """A SimpleITK image of ``array`` (default: the volume's) on the volume's grid."""
    image = sitk.GetImageFromArray(volume.array if array is None else array)
    origin, spacing, direction = itk_geometry_from_ijk_to_ras(volume.ijk_to_ras)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


def same_grid(a: Volume | sitk.Image, b: Volume, tolerance: float = GEOMETRY_TOLERANCE) -> bool:
    """Whether ``a`` lies on exactly the voxel grid of ``b`` (shape and IJK-to-RAS)."""
    if isinstance(a, sitk.Image):
        shape, matrix = tuple(reversed(a.GetSize())), ijk_to_ras_of(a)
    else:
        shape, matrix = a.spatial_shape, a.ijk_to_ras
    return shape == tuple(b.spatial_shape) and bool(np.allclose(matrix, b.ijk_to_ras, atol=tolerance, rtol=0))


def voxel_offset_on(image: sitk.Image, reference: Volume, tolerance: float = GEOMETRY_TOLERANCE) -> np.ndarray | None:
    """The whole-voxel offset (i, j, k) of ``image``'s grid inside ``reference``'s, or None if not aligned.

    Slicer saves a segmentation cropped to its extent: the same spacing and direction as the
    image, shifted by whole voxels. Nearest-neighbour and linear resampling are then exact copies
    of the stored voxels, so reading such a file needs no warning.
    """
    matrix = ijk_to_ras_of(image)
    if not np.allclose(matrix[:3, :3], reference.ijk_to_ras[:3, :3], atol=tolerance, rtol=0):
        return None
    offset = np.linalg.solve(reference.ijk_to_ras[:3, :3], matrix[:3, 3] - reference.ijk_to_ras[:3, 3])
    whole = np.round(offset)
    # The offset is in voxels; a shift of a tolerance's worth of millimetres is the same grid.
    spacing = np.linalg.norm(reference.ijk_to_ras[:3, :3], axis=0)
    return whole if bool(np.all(np.abs(offset - whole) * spacing <= tolerance)) else None
