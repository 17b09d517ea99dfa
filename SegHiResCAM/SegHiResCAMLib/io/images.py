"""Read and write image volumes with SimpleITK (NRRD, NIfTI, DICOM series).

Everything here returns :class:`~SegHiResCAMLib.volume.Volume` objects: a KJI array plus the
IJK-to-RAS matrix, the same pair the Slicer side gets from a volume node, so files and nodes
go through one pipeline. Geometry is copied exactly: a map written with :func:`write_image`
has the origin, spacing and direction of the volume it was computed on. Region files are read
by :mod:`.regions`, outputs are checked by :mod:`.outputs`; their public names are also
importable from here.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..volume import Volume
from .itk import GEOMETRY_TOLERANCE, check_scalar_3d, itk_from_volume, itk_reason, read_itk_image, same_grid
from .itk import volume_from_itk
from .outputs import WRITABLE_SUFFIXES, check_output_path
from .regions import read_mask

__all__ = [
    "GEOMETRY_TOLERANCE", "WRITABLE_SUFFIXES", "check_output_path", "read_image", "read_itk_image", "read_mask",
    "same_grid", "write_image",
]


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
    check_scalar_3d(image, source)
    return volume_from_itk(image)


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
    image = itk_from_volume(volume, array)
    if target.parent and not target.parent.exists():
        raise InputError(f"cannot write {target}: the folder {target.parent} does not exist")
    # Write beside the target, then rename: an interrupted run never leaves a partial heatmap.
    partial = target.with_name(f".{target.name}.partial{''.join(target.suffixes)}")
    try:
        sitk.WriteImage(image, str(partial), useCompression=compress)
        os.replace(partial, target)
    except (RuntimeError, OSError) as error:
        reason = itk_reason(error) if isinstance(error, RuntimeError) else (error.strerror or str(error))
        known = target.name.lower().endswith(WRITABLE_SUFFIXES)
        advice = "check that its folder is writable and has free space" if known else (
            f"use one of {', '.join(WRITABLE_SUFFIXES)}")
        raise InputError(f"cannot write {target} ({reason}); {advice}") from error
    finally:
        partial.unlink(missing_ok=True)
    return target
